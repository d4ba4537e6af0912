"""How close propose_config's time estimate comes to the measured wall time (issue 25: within ±30% for three CPU jobs
of different sizes). Each job is planned by propose_config and run as planned, through the real server over stdio;
the estimate is compared with job_status's elapsed time (start of the training process to completed), and the
phases (training, result report, the rest: imports, loading, replay answers, saving) are printed so the constants
of lmtuner_core/planning/throughput.py can be refitted on another machine. Trains SmolLM2: run under the lock.

    flock /tmp/lmtuner-heavy.lock .venv/bin/python bench/estimate_accuracy.py [--only tiny,mid,smol-small,smol-large]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anyio
import mcp
from mcp.client.stdio import StdioServerParameters

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmtuner_core.data.sample_data import (  # noqa: E402
    SMOLLM2_GGUF,
    write_capitals_dataset,
    write_demo_dataset,
)

# A home of its own whose models/ holds SmolLM2 converted once (the study's home has it: reuse, do not convert again).
HOME = Path(os.environ.get("LMTUNER_BENCH_HOME", "~/.cache/lmtuner/estimate-home")).expanduser()
STUDY_MODELS = Path("~/.cache/lmtuner/study-home/models").expanduser()


def jobs(scratch: Path) -> dict[str, dict]:
    """Sizes: the tiny test model (0.6M parameters) on 60 rows; a random 11M Llama on 40 rows; SmolLM2 (135M) on 48
    short answers and on 96 longer rows. The first two train for about a minute (no lock needed); SmolLM2 needs it."""
    from lmtuner_core.training.tiny_model import make_tiny_model

    mid = make_tiny_model(scratch / "mid", hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2)
    return {
        "tiny": {"model": str(make_tiny_model(scratch / "tiny")), "dataset": str(write_demo_dataset(
            scratch / "tiny.jsonl", 60)), "goal": None},
        "mid": {"model": str(mid), "dataset": str(write_demo_dataset(scratch / "mid.jsonl", 40)), "goal": None},
        "smol-small": {"model": str(SMOLLM2_GGUF), "dataset": str(write_capitals_dataset(scratch / "capitals.jsonl")),
                       "goal": "answer with the capital's name alone"},
        "smol-large": {"model": str(SMOLLM2_GGUF), "dataset": str(write_demo_dataset(scratch / "demo.jsonl", 96)),
                       "goal": None},
    }  # fmt: skip


async def call(client, tool: str, arguments: dict) -> dict:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool}: {result.content[0].text}")
    return result.structured_content


async def run_one(client, name: str, job: dict) -> dict:
    shutil.rmtree(HOME / "cache" / "base_answers", ignore_errors=True)  # the estimate is for a first run of a model
    plan = await call(client, "propose_config", {k: v for k, v in job.items() if v is not None})
    started = await call(client, "start_training", {"config": plan["config"], "confirmed": True})
    while True:
        status = await call(client, "job_status", {"job_id": started["job_id"], "wait_seconds": 30, "log_lines": 0})
        if status["status"] in ("completed", "failed", "cancelled"):
            break
    if status["status"] != "completed":
        raise RuntimeError(f"{name}: {status['status']}: {status['error']}")
    run = Path(status["run_dir"])
    state = json.loads((run / "state.json").read_text())
    report = status.get("report") or {}
    measured = status["elapsed_seconds"]
    estimate = plan["estimate"]
    train_s = state.get("train_seconds")
    return {
        "job": name, "rows": sum(1 for _ in open(job["dataset"])), "measured_s": measured,
        "estimate_s": estimate["wall_seconds"], "error": round((estimate["wall_seconds"] - measured) / measured, 3),
        "estimate_at_start_s": status["estimate"]["wall_seconds"], "error_at_start": status["estimate_error"],
        "train_s": train_s, "estimate_train_s": estimate["train_seconds"], "report_s": report.get("seconds"),
        "tokens_per_second": status["tokens_per_second"], "estimate_tokens_per_second": estimate["tokens_per_second"],
        "train_tokens_estimated": estimate["train_tokens"], "steps": status["step"], "basis": estimate["basis"],
        "config": {k: plan["config"].get(k) for k in ("method", "num_epochs", "max_steps", "batch_size",
                                                      "gradient_accumulation_steps", "max_seq_len", "replay")},
    }  # fmt: skip


async def main_async(only: list[str]) -> None:
    HOME.mkdir(parents=True, exist_ok=True)
    if not (HOME / "models").exists() and STUDY_MODELS.is_dir():
        (HOME / "models").symlink_to(STUDY_MODELS)
    scratch = Path(tempfile.mkdtemp(prefix="lmtuner-estimate-"))
    params = StdioServerParameters(
        command=str(Path(sys.executable).parent / "lmtuner-mcp"),
        args=["--root", str(scratch), "--root", str(SMOLLM2_GGUF.parent)],
        env={**os.environ, "LMTUNER_HOME": str(HOME), "PYTHONPATH": str(REPO)},
    )
    try:
        all_jobs = jobs(scratch)
        async with mcp.Client(params) as client:
            for name in only:
                begun = time.monotonic()
                row = await run_one(client, name, all_jobs[name])
                print(json.dumps(row), flush=True)
                print(f"# {name}: estimated {row['estimate_s']:.0f}s, measured {row['measured_s']:.0f}s "
                      f"({row['error']:+.0%}); at start {row['estimate_at_start_s']:.0f}s "
                      f"({row['error_at_start']:+.0%});"
                      f" bench {time.monotonic() - begun:.0f}s", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="tiny,mid,smol-small,smol-large")
    anyio.run(main_async, parser.parse_args().only.split(","))


if __name__ == "__main__":
    main()
