"""resume_job: a cancelled job continues from its checkpoint with its step count, optimizer and schedule."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import anyio
import mcp

from lmtuner_core.data.sample_data import write_demo_dataset
from server.app import build_server
from tests.helpers import call_error, call_ok, quick_config


def test_cancelled_job_resumes_from_its_checkpoint_and_finishes(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=32)
    config = quick_config(tiny_model, data, max_steps=30, batch_size=2, lr_scheduler="cosine")

    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[tmp_path, tiny_model])) as client:
            job_id = (await call_ok(client, "start_training", {"config": config}))["job_id"]
            early = await call_error(client, "resume_job", {"job_id": job_id})
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status = await call_ok(client, "job_status", {"job_id": job_id, "wait_seconds": 5})
                if status["step"] >= 5:
                    break
            cancelled = await call_ok(client, "cancel_job", {"job_id": job_id})
            resumed = await call_ok(client, "resume_job", {"job_id": job_id})
            while True:
                final = await call_ok(client, "job_status", {"job_id": job_id, "wait_seconds": 10})
                if final["status"] not in ("queued", "running"):
                    break
            again = await call_error(client, "resume_job", {"job_id": job_id})
            return early, cancelled, resumed, final, again

    early, cancelled, resumed, final, again = anyio.run(scenario)
    assert "only failed or cancelled jobs resume" in early
    assert cancelled["status"] == "cancelled" and cancelled["checkpoints"]
    stopped_at = int(cancelled["checkpoints"][-1].rsplit("-", 1)[1])
    assert resumed["job_id"] == final["job_id"] and resumed["config"]["resume_from"].endswith(f"-{stopped_at}")
    assert final["status"] == "completed", final["error"]
    assert final["step"] == final["total_steps"] == 30
    assert "start a new job with resume_from" in again

    records = [json.loads(line) for line in Path(final["run_dir"], "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    # Each step exactly once: the resumed run began at stopped_at + 1 instead of starting over at 1.
    assert 5 <= stopped_at < 30 and steps == list(range(1, 31))
    # The cosine schedule continues too: no jump back to the peak learning rate after resuming.
    rates = [r["learning_rate"] for r in records if "loss" in r]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(rates))
    assert "resuming from" in Path(final["run_dir"], "train.log").read_text()
