"""JobStore: the SQLite table of jobs under $LMTUNER_HOME (see lmtuner_core.system.sqlite). The run folder holds the
details; this holds the index: each job's status, the backend that runs it (jobs/launcher.py) and that backend's
opaque handle, and for this machine's queue the devices booked and the supervisor's pid.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from lmtuner_core.system.sqlite import SqliteTable

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
STATUSES = get_args(JobStatus)
TERMINAL = frozenset({"completed", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pid INTEGER,
    pid_started_at REAL,
    run_dir TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    error TEXT,
    exit_code INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    devices TEXT NOT NULL DEFAULT 'cpu',
    claimed_at REAL,
    backend TEXT NOT NULL DEFAULT 'local',
    handle TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""

_ADDED_COLUMNS = {
    "devices": "TEXT NOT NULL DEFAULT 'cpu'",
    "claimed_at": "REAL",
    "backend": "TEXT NOT NULL DEFAULT 'local'",
    "handle": "TEXT",
}


@dataclass
class JobRecord:
    job_id: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    pid: int | None
    pid_started_at: float | None
    run_dir: str
    model: str
    method: str
    output_dir: str
    error: str | None
    exit_code: int | None
    cancel_requested: int
    devices: str  # 'cpu' or GPU indices '0,1' (booked by this machine's queue), or a cluster backend's name
    claimed_at: float | None  # when a scheduler took it off the queue (before its process exists)
    backend: str = "local"  # the launcher that runs it (jobs/launcher.py BACKENDS)
    handle: str | None = None  # that launcher's reference to it, JSON only the launcher reads (e.g. a Ray job id)


class JobStore(SqliteTable[JobRecord]):
    table, key, record, schema = "jobs", "job_id", JobRecord, _SCHEMA

    def _migrate(self, db: sqlite3.Connection) -> None:
        have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        # Columns added after the first release: older databases gain them in place.
        for column, ddl in _ADDED_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {ddl}")
        if "ray_job_id" in have:
            # Before the launcher seam a Ray job kept its submission id and cluster in columns of their own, and
            # devices 'ray': it becomes backend 'ray' with the handle the Ray launcher reads. The old columns stay
            # (unread) so that an older server sharing the file keeps working.
            db.execute(
                "UPDATE jobs SET backend = 'ray', handle = CASE WHEN ray_job_id IS NULL THEN NULL ELSE "
                "json_object('address', COALESCE(ray_address, ''), 'job_id', ray_job_id) END "
                "WHERE (backend = 'local' AND (ray_job_id IS NOT NULL OR devices = 'ray')) "
                "OR (backend = 'ray' AND handle IS NULL AND ray_job_id IS NOT NULL)"
            )

    def create(
        self, *, job_id: str, run_dir: Path, model: str, method: str, output_dir: Path, devices: str = "cpu",
        backend: str = "local",
    ) -> JobRecord:  # fmt: skip
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (job_id, status, created_at, run_dir, model, method, output_dir, devices, backend) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, time.time(), str(run_dir), model, method, str(output_dir), devices, backend),
            )
        return self.get(job_id)  # type: ignore[return-value]

    def count(self, status: str) -> int:
        with self._connect() as db:
            (n,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()
        return n

    def queue_position(self, record: JobRecord) -> int:
        """1 for the next queued job to start, 2 for the one after, ..."""
        with self._connect() as db:
            (ahead,) = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND created_at < ?", (record.created_at,)
            ).fetchone()
        return ahead + 1

    def claim_startable(self, cpu_slots: int) -> list[str]:
        """Marks as running (not yet spawned) this machine's queued jobs (backend 'local') whose devices are free,
        oldest first, and returns their ids. One IMMEDIATE transaction: concurrent schedulers in other processes
        wait instead of double-booking a device. A cluster backend's jobs are queued by their cluster."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                busy_gpus: set[str] = set()
                cpu_jobs = 0
                for (devices,) in db.execute("SELECT devices FROM jobs WHERE status = 'running' AND backend = 'local'"):
                    if devices == "cpu":
                        cpu_jobs += 1
                    else:
                        busy_gpus |= set(devices.split(","))
                claimed = []
                queued = db.execute(
                    "SELECT job_id, devices FROM jobs WHERE status = 'queued' AND backend = 'local' ORDER BY created_at"
                )
                for job_id, devices in queued.fetchall():
                    if devices == "cpu":
                        if cpu_jobs >= cpu_slots:
                            continue
                        cpu_jobs += 1
                    else:
                        wanted = set(devices.split(","))
                        free = not (wanted & busy_gpus)
                        busy_gpus |= wanted  # held or reserved: later jobs do not jump ahead of this one
                        if not free:
                            continue
                    db.execute(
                        "UPDATE jobs SET status = 'running', claimed_at = ? WHERE job_id = ? AND status = 'queued'",
                        (now, job_id),
                    )
                    claimed.append(job_id)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return claimed
