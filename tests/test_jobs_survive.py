"""Jobs outlive their controller: server killed mid-job, queue advanced by the job that ends, lost claims."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import anyio

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.jobs.service import JobService, check_config
from lmtuner_core.paths import AllowedRoots
from tests.helpers import call_ok, http_client, http_server, quick_config


def wait_for_state(run_dir: Path, predicate, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads((run_dir / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if predicate(state):
            return state
        time.sleep(0.3)
    raise AssertionError(f"state never matched: {state}")


def test_second_cpu_job_is_queued_and_started_by_the_first_when_it_ends(
    tiny_model, tmp_path, lmtuner_home, monkeypatch
):
    monkeypatch.setenv("LMTUNER_MAX_CPU_JOBS", "1")
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=32)
    service = JobService(lmtuner_home, AllowedRoots([tmp_path, tiny_model]))
    first, _, _ = service.submit(parse_train_config(quick_config(tiny_model, data, max_steps=6)))
    second, _, warnings = service.submit(parse_train_config(quick_config(tiny_model, data, max_steps=3)))
    assert first.status == "running" and second.status == "queued"
    assert any("queued" in w for w in warnings)
    assert service.progress(second).queue_position == 1

    # Nobody polls: the first job's supervisor must start the second when the first ends.
    state = wait_for_state(Path(second.run_dir), lambda s: s.get("status") == "completed", timeout=240)
    assert state["step"] == 3
    first_done = json.loads(Path(first.run_dir, "state.json").read_text())
    second_started = service.store.get(second.job_id).started_at
    assert first_done["updated_at"] <= second_started + 1.0, "the second job started before the first ended"
    assert service.get(first.job_id).status == "completed"
    assert service.get(second.job_id).status == "completed"


def test_a_queued_job_starts_when_the_job_ahead_of_it_was_killed_and_only_the_queued_one_is_watched(
    tiny_model, tmp_path, lmtuner_home, monkeypatch
):
    """The job ahead is killed outright (its supervisor too, so nothing advances the queue); a client that follows
    only the queued job must still see it start."""
    monkeypatch.setenv("LMTUNER_MAX_CPU_JOBS", "1")
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=32)
    service = JobService(lmtuner_home, AllowedRoots([tmp_path, tiny_model]))
    first, _, _ = service.submit(parse_train_config(quick_config(tiny_model, data, max_steps=400, batch_size=2)))
    second, _, _ = service.submit(parse_train_config(quick_config(tiny_model, data, max_steps=2)))
    assert first.status == "running" and second.status == "queued"
    wait_for_state(Path(first.run_dir), lambda s: s.get("step", 0) >= 1)
    os.killpg(first.pid, signal.SIGKILL)  # the supervisor leads the job's process group

    deadline = time.monotonic() + 60
    while service.get(second.job_id).status == "queued" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert service.get(second.job_id).status in ("running", "completed")
    wait_for_state(Path(second.run_dir), lambda s: s.get("status") == "completed")
    assert service.store.get(first.job_id).status == "failed"


def test_a_claim_whose_starter_died_is_queued_again_and_runs(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    service = JobService(lmtuner_home, AllowedRoots([tmp_path, tiny_model]))
    run = service.run_dir("20260101-000000-dead")
    config, _ = check_config(parse_train_config(quick_config(tiny_model, data, max_steps=2)), service.roots, run)
    run.root.mkdir(parents=True)
    run.config.write_text(config.to_json())
    service.store.create(job_id="20260101-000000-dead", run_dir=run.root, model=config.model, method="lora",
                         output_dir=run.default_output)  # fmt: skip
    # A server that claimed it and was killed before spawning: 'running' with no process, claimed long ago.
    service.store.update("20260101-000000-dead", status="running", claimed_at=time.time() - 600)

    record = service.get("20260101-000000-dead")
    assert record.status == "running" and record.pid is not None, "re-queued and started again"
    wait_for_state(run.root, lambda s: s.get("status") == "completed")
    assert service.get("20260101-000000-dead").status == "completed"


def test_server_killed_mid_job_then_restarted_reattaches(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=32)
    roots = ["--root", str(tmp_path), "--root", str(tiny_model)]
    # Long enough that the job is still running when the second server answers (40 steps once finished first).
    config = quick_config(tiny_model, data, max_steps=120, batch_size=2)

    async def start(url):
        async with http_client(url) as client:
            return await call_ok(client, "start_training", {"config": config})

    async def status(url, job_id):
        async with http_client(url) as client:
            return await call_ok(client, "job_status", {"job_id": job_id})

    with http_server(lmtuner_home, *roots) as (url, proc):
        started = anyio.run(start, url)
        run_dir = Path(started["run_dir"])
        wait_for_state(run_dir, lambda s: s.get("step", 0) >= 1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    with http_server(lmtuner_home, *roots) as (url, _):
        seen = anyio.run(status, url, started["job_id"])
        assert seen["status"] == "running", seen
        time.sleep(2)
        later = anyio.run(status, url, started["job_id"])
        assert later["status"] == "completed" or later["step"] > seen["step"], (seen, later)
        wait_for_state(run_dir, lambda s: s.get("status") == "completed")
        final = anyio.run(status, url, started["job_id"])
    assert final["status"] == "completed" and final["step"] == 120


def test_job_that_finishes_while_the_server_is_down_is_reported_completed(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    roots = ["--root", str(tmp_path), "--root", str(tiny_model)]

    async def start(url):
        async with http_client(url) as client:
            return await call_ok(client, "start_training", {"config": quick_config(tiny_model, data, max_steps=3)})

    async def status(url, job_id):
        async with http_client(url) as client:
            return await call_ok(client, "job_status", {"job_id": job_id})

    with http_server(lmtuner_home, *roots) as (url, proc):
        started = anyio.run(start, url)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    wait_for_state(Path(started["run_dir"]), lambda s: s.get("status") == "completed")
    with http_server(lmtuner_home, *roots) as (url, _):
        final = anyio.run(status, url, started["job_id"])
    assert final["status"] == "completed" and final["step"] == 3 and final["error"] is None
