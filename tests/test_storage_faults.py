"""Storage faults: a read-only and a full filesystem (real tmpfs mounts; needs root, as CI has) fail clearly
and harm nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.jobs.service import JobService
from lmtuner_core.paths import AllowedRoots
from tests.helpers import quick_config


@contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def wait_final(service: JobService, job_id: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = service.get(job_id)
        if record.status in ("completed", "failed", "cancelled"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end")


@pytest.fixture
def service(tiny_model, tmp_path, lmtuner_home) -> JobService:
    return JobService(lmtuner_home, AllowedRoots([tmp_path, tiny_model]))


def test_read_only_output_folder_is_refused_before_the_job_starts(service, tiny_model, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    with tmpfs(tmp_path / "readonly", "ro,size=1m") as folder:
        config = parse_train_config(quick_config(tiny_model, data, output_dir=str(folder / "adapter")))
        with pytest.raises(LmtunerError, match=r"output_dir: cannot write .*Read-only file system"):
            service.submit(config)
    assert service.store.list() == [] and not any((service.home / "runs").iterdir())


def test_full_disk_fails_the_job_with_the_reason_and_harms_nothing_else(service, tiny_model, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    before, _, _ = service.submit(parse_train_config(quick_config(tiny_model, data, max_steps=2)))
    assert wait_final(service, before.job_id).status == "completed"

    with tmpfs(tmp_path / "small", "size=64k") as folder:  # room for the write check, not for the adapter
        config = parse_train_config(quick_config(tiny_model, data, max_steps=2, output_dir=str(folder / "adapter")))
        full, _, _ = service.submit(config)
        failed = wait_final(service, full.job_id)
    assert failed.status == "failed"
    assert "No space left on device" in failed.error and "disk is full" in failed.error

    # The database and the other job are as they were, and new work still runs.
    again = service.get(before.job_id)
    assert again.status == "completed" and Path(again.output_dir, "adapter_model.safetensors").is_file()
    after, _, _ = service.submit(parse_train_config(quick_config(tiny_model, data, max_steps=2)))
    assert wait_final(service, after.job_id).status == "completed"
    statuses = {r.job_id: r.status for r in service.store.list()}
    assert statuses == {before.job_id: "completed", full.job_id: "failed", after.job_id: "completed"}
    assert json.loads(Path(failed.run_dir, "state.json").read_text())["status"] == "failed"
