"""A wrong file through analyze_dataset (issue #18): a JSONL file whose line 1 is a 50 MB row, analyzed with the
tiny model by a real lmtuner-mcp over stdio, while list_jobs and job_status are called on the same session every
0.5 s. Prints the call's wall time, the server's RSS before, at peak and 2 s after, and the slowest concurrent calls.
`--mix` adds two 3.9M-character rows and 2,000 ordinary ones, so that the analysis has real work to do.

Before the row limits (commit 159ed88): 233 s, peak 14,975 MiB, 1,924 MiB after, list_jobs/job_status waited up
to 19 s. Run it alone, under a memory limit, on code that old (`prlimit --as=20000000000 -- ...`).

    .venv/bin/python bench/huge_row.py [--mix] [--work /tmp/huge-row]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtuner_core.training.tiny_model import make_tiny_model
from tests.helpers import stdio_client


def server_process() -> psutil.Process:
    return next(p for p in psutil.Process().children(recursive=True) if "lmtuner-mcp" in " ".join(p.cmdline()))


async def measure(work: Path, model: Path, data: Path) -> dict:
    home = work / "home"
    home.mkdir(exist_ok=True)
    async with stdio_client(home, [work]) as client:
        await client.call_tool("list_jobs", {})
        server = server_process()
        before = server.memory_info().rss
        peak = [before]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.05)

        latencies: list[tuple[float, str]] = []

        async def poll() -> None:
            await asyncio.sleep(1.0)
            while not done.is_set():
                for tool, arguments in (("list_jobs", {}), ("job_status", {"job_id": "20260101-000000-abcd"})):
                    started = time.monotonic()
                    await client.call_tool(tool, arguments)
                    latencies.append((round(time.monotonic() - started, 2), tool))
                await asyncio.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()
        poller = asyncio.create_task(poll())
        started = time.monotonic()
        result = await client.call_tool("analyze_dataset", {"dataset": str(data), "model": str(model)})
        elapsed = time.monotonic() - started
        done.set()
        await poller
        await asyncio.sleep(2)
        return {
            "analyze_s": round(elapsed, 2),
            "is_error": result.is_error,
            "answer": result.content[0].text[:400],
            "rss_before_mib": before >> 20,
            "rss_peak_mib": peak[0] >> 20,
            "rss_after_mib": server.memory_info().rss >> 20,
            "concurrent_calls": len(latencies),
            "slowest_concurrent": sorted(latencies)[-4:],
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mix", action="store_true", help="Add long rows under the limit and 2,000 ordinary rows.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmtuner-huge-row"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "tiny"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    data = args.work / ("mixed.jsonl" if args.mix else "huge-row.jsonl")
    if not data.exists():
        rows = [{"instruction": "x", "input": "", "output": "a" * 50_000_000}]
        if args.mix:
            rows += [{"instruction": "y", "input": "", "output": "the cat sat. " * 300_000}] * 2
            rows += [{"instruction": f"question {i}", "input": "", "output": f"answer {i} " * 20} for i in range(2000)]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(json.dumps(asyncio.run(measure(args.work, model, data)), indent=1))


if __name__ == "__main__":
    main()
