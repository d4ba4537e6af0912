"""Spawn → `tools/list` answered, for lmtuner-mcp against a bare SDK server with one tool (the floor the
mcp SDK sets on this machine), run alternately in one invocation. Prints medians and the ratio.

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
    home = Path(tempfile.mkdtemp(prefix="lmtuner-bench-"))
    bin_dir = Path(sys.executable).parent
    # This checkout's code (PYTHONPATH), through the installed entry point as an agent launches it.
    env = {"LMTUNER_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ours = StdioServerParameters(command=str(bin_dir / "lmtuner-mcp"), env=env)
    bare = StdioServerParameters(command=sys.executable, args=["-c", BARE_SERVER], env=env)
    times: dict[str, list[float]] = {"bare SDK server": [], "lmtuner-mcp": []}
    for _ in range(runs):
        times["bare SDK server"].append(anyio.run(time_to_tools_list, bare))
        times["lmtuner-mcp"].append(anyio.run(time_to_tools_list, ours))
    for name, values in times.items():
        print(f"{name:<16} spawn -> tools/list: median {statistics.median(values):.2f}s "
              f"(min {min(values):.2f}, max {max(values):.2f}, n={runs})")  # fmt: skip
    ratio = statistics.median(times["lmtuner-mcp"]) / statistics.median(times["bare SDK server"])
    print(f"ratio lmtuner / bare SDK: {ratio:.2f}")


if __name__ == "__main__":
    main()
