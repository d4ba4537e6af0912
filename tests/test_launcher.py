"""The launcher seam: the job store keeps a backend name and an opaque handle, and a jobs.db written before the
seam (Ray jobs in ray_job_id / ray_address columns, devices 'ray') still opens with its Ray jobs seen."""

from __future__ import annotations

import sqlite3

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.jobs.launcher import BACKENDS, backend_for, launcher_class, read_handle
from lmtuner_core.jobs.service import JobService
from lmtuner_core.paths import AllowedRoots

# The jobs table as the releases before the seam created it.
OLD_SCHEMA = """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    pid INTEGER, pid_started_at REAL, run_dir TEXT NOT NULL, model TEXT NOT NULL, method TEXT NOT NULL,
    output_dir TEXT NOT NULL, error TEXT, exit_code INTEGER, cancel_requested INTEGER NOT NULL DEFAULT 0,
    devices TEXT NOT NULL DEFAULT 'cpu', claimed_at REAL, ray_job_id TEXT, ray_address TEXT
);
"""
# Port 9 of this machine: nothing answers, so the cluster is "unreachable" and the job stays as last seen.
GONE_CLUSTER = "http://127.0.0.1:9"


def test_old_jobs_db_opens_and_its_ray_jobs_are_followed_through_their_handle(tmp_path):
    home = tmp_path / "home"
    (home / "runs" / "20260101-000000-aaaa").mkdir(parents=True)
    with sqlite3.connect(home / "jobs.db") as db:
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO jobs VALUES ('20260101-000000-aaaa', 'running', 1, 1, NULL, NULL, NULL, ?, 'm', 'lora', '/o',"
            " NULL, NULL, 0, 'ray', 1, 'lmtuner-20260101-000000-aaaa', ?)",
            (str(home / "runs" / "20260101-000000-aaaa"), GONE_CLUSTER),
        )
        db.execute(
            "INSERT INTO jobs VALUES ('20260101-000000-bbbb', 'completed', 2, 1, 3, 4242, 1.0, '/r', 'm', 'lora', '/o',"
            " NULL, 0, 0, 'cpu', 1, NULL, NULL)"
        )
    service = JobService(home, AllowedRoots([tmp_path]))
    ray_job = service.get("20260101-000000-aaaa")  # polls the cluster, which does not answer: still running
    assert ray_job.backend == "ray" and ray_job.status == "running"
    assert read_handle(ray_job) == {"address": GONE_CLUSTER, "job_id": "lmtuner-20260101-000000-aaaa"}
    shown = service.progress(ray_job)
    assert shown.devices == "ray" and shown.ray is not None and shown.ray.job_id == "lmtuner-20260101-000000-aaaa"
    local_job = service.get("20260101-000000-bbbb")
    assert local_job.backend == "local" and local_job.handle is None and service.progress(local_job).ray is None
    # Opening it again changes nothing (the migration runs once per row).
    again = JobService(home, AllowedRoots([tmp_path])).store.get("20260101-000000-aaaa")
    assert again is not None and again.handle == ray_job.handle


def test_the_config_block_picks_the_backend_and_every_backend_is_registered(tmp_path):
    local = parse_train_config({"model": "/m", "dataset": "/d.jsonl"})
    ray = parse_train_config({"model": "/m", "dataset": "/d.jsonl", "ray": {"address": GONE_CLUSTER}})
    assert backend_for(local) == "local" and backend_for(ray) == "ray"
    for backend in BACKENDS:  # each entry imports and names itself as the store will record it
        assert launcher_class(backend.name).name == backend.name
    with pytest.raises(Exception, match="backend: 'nowhere' is not a launcher"):
        launcher_class("nowhere")
