"""Spawn → `tools/list` answered, for lmtuner-mcp against a bare SDK server with one tool (the floor the
mcp SDK sets on this machine), run alternately in one invocation. Prints medians and the ratio (issue 25: within
1.1x).

lmtuner-mcp is timed three ways: with the LMTUNER_HOME of earlier starts (what a user's agent launches every session:
the tool listing is read from $LMTUNER_HOME/cache); with a fresh LMTUNER_HOME each run, the listing kept in the user's
cache folder (as `make install` leaves it); and on the very first start (a fresh home and a fresh cache folder each
run: every tool schema is built). This checkout's code runs (PYTHONPATH).

    .venv/bin/python bench/mcp_latency.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import mcp
from mcp.client.stdio import StdioServerParameters

BARE_SERVER = """
from mcp.server.mcpserver import MCPServer
server = MCPServer("bare")
@server.tool()
def ping() -> str:
    return "pong"
server.run()
"""


async def time_to_tools_list(params: StdioServerParameters) -> float:
    started = time.perf_counter()
    async with mcp.Client(params) as client:
        await client.list_tools()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    scratch = Path(tempfile.mkdtemp(prefix="lmtuner-bench-"))
    bin_dir = Path(sys.executable).parent
    code = str(Path(__file__).resolve().parents[1])  # this checkout, through the installed entry point

    def lmtuner(home: Path, cache: Path) -> StdioServerParameters:
        env = {"LMTUNER_HOME": str(home), "LMTUNER_CACHE_DIR": str(cache), "PYTHONPATH": code}
        return StdioServerParameters(command=str(bin_dir / "lmtuner-mcp"), env=env)

    bare = StdioServerParameters(command=sys.executable, args=["-c", BARE_SERVER], env={"PYTHONPATH": code})
    shared = scratch / "cache"
    anyio.run(time_to_tools_list, lmtuner(scratch / "home", shared))  # the earlier start that keeps the listing
    rows = ("bare SDK server", "lmtuner-mcp", "lmtuner-mcp, new home", "lmtuner-mcp, first start")
    times: dict[str, list[float]] = {name: [] for name in rows}
    for run in range(runs):
        times["bare SDK server"].append(anyio.run(time_to_tools_list, bare))
        times["lmtuner-mcp"].append(anyio.run(time_to_tools_list, lmtuner(scratch / "home", shared)))
        new_home = lmtuner(scratch / f"new-{run}", shared)
        times["lmtuner-mcp, new home"].append(anyio.run(time_to_tools_list, new_home))
        first = lmtuner(scratch / f"fresh-{run}", scratch / f"fresh-cache-{run}")
        times["lmtuner-mcp, first start"].append(anyio.run(time_to_tools_list, first))
    for name, values in times.items():
        print(f"{name:<25} spawn -> tools/list: median {statistics.median(values):.2f}s "
              f"(min {min(values):.2f}, max {max(values):.2f}, n={runs})")  # fmt: skip
    bare_median = statistics.median(times["bare SDK server"])
    for name in rows[1:]:
        print(f"ratio {name} / bare SDK: {statistics.median(times[name]) / bare_median:.2f}")


if __name__ == "__main__":
    main()
