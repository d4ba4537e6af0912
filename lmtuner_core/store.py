"""JobStore: the SQLite table of jobs under $LMTUNER_HOME. The run folder holds the details; this holds the index.

One short-lived connection per operation, WAL journal and a busy timeout, so several server processes (stdio
and HTTP at once) and the CLI can share one file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

STATUSES = ("queued", "running", "completed", "failed", "cancelled")
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
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""


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


_COLUMNS = [f.name for f in fields(JobRecord)]


class JobStore:
    def __init__(self, home: Path):
        self.path = home / "jobs.db"
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    def create(self, *, job_id: str, run_dir: Path, model: str, method: str, output_dir: Path) -> JobRecord:
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (job_id, status, created_at, run_dir, model, method, output_dir) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, time.time(), str(run_dir), model, method, str(output_dir)),
            )
        return self.get(job_id)  # type: ignore[return-value]

    def get(self, job_id: str) -> JobRecord | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def list(self, status: str | None = None) -> list[JobRecord]:
        query = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        args: tuple = ()
        if status:
            query += " WHERE status = ?"
            args = (status,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at DESC", args).fetchall()
        return [JobRecord(*row) for row in rows]

    def update(self, job_id: str, *, only_if_status: tuple[str, ...] | None = None, **values) -> bool:
        """Sets columns; with only_if_status, only while the job is still in one of those states (so two
        processes noticing the same ending do not overwrite each other). Returns whether a row changed."""
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {unknown}")
        sets = ", ".join(f"{k} = ?" for k in values)
        query = f"UPDATE jobs SET {sets} WHERE job_id = ?"
        args = [*values.values(), job_id]
        if only_if_status:
            query += f" AND status IN ({', '.join('?' * len(only_if_status))})"
            args += list(only_if_status)
        with self._connect() as db:
            return db.execute(query, args).rowcount > 0
