"""JobStore: the SQLite table of jobs under $LMTUNER_HOME. The run folder holds the details; this holds the index.

One connection per thread, kept open (opening one and parsing the schema cost about as much as a job_status
answer), in autocommit mode with a WAL journal and a busy timeout, so several server processes (stdio and HTTP at
once) and the CLI can share one file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Generic, Literal, TypeVar, get_args

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
    ray_job_id TEXT,
    ray_address TEXT,
    kind TEXT NOT NULL DEFAULT 'train'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""


R = TypeVar("R")

_ADDED_COLUMNS = {
    "devices": "TEXT NOT NULL DEFAULT 'cpu'",
    "claimed_at": "REAL",
    "ray_job_id": "TEXT",
    "ray_address": "TEXT",
    "kind": "TEXT NOT NULL DEFAULT 'train'",
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
    devices: str  # 'cpu' or GPU indices '0,1'
    claimed_at: float | None  # when a scheduler took it off the queue (before its process exists)
    ray_job_id: str | None = None  # a job on a Ray cluster: its submission id there (no local process)
    ray_address: str | None = None  # and the cluster's address
    kind: str = "train"  # 'train', or 'sweep' (lmtuner_core/tuning: a Ray Tune driver whose trials are trainings)


class SqliteTable(Generic[R]):
    """One table of $LMTUNER_HOME/jobs.db, read into `record` dataclasses whose fields are its columns (in order).
    Subclasses name the table, its key column, record type and schema; JobStore and ServerStore share this."""

    table: str
    key: str
    record: type[R]
    schema: str

    def __init__(self, home: Path):
        self.path = home / "jobs.db"
        self._local = threading.local()
        self.columns = [f.name for f in fields(self.record)]  # type: ignore[arg-type]
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent in the file: readers never block the writer
            db.executescript(self.schema)
            self._migrate(db)

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Brings an older database's table up to date (nothing by default)."""

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection. Autocommit: no read holds a snapshot between calls; a failure inside an explicit
        transaction rolls it back, so the connection is clean for the next caller."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise

    def get(self, key: str) -> R | None:
        with self._connect() as db:
            row = db.execute(
                f"SELECT {', '.join(self.columns)} FROM {self.table} WHERE {self.key} = ?", (key,)
            ).fetchone()
        return self.record(*row) if row else None

    def list(self, statuses: tuple[str, ...] | None = None) -> list[R]:
        """Rows, newest first, optionally only those in the given statuses."""
        query = f"SELECT {', '.join(self.columns)} FROM {self.table}"
        args: tuple = ()
        if statuses:
            query += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args = statuses
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at DESC", args).fetchall()
        return [self.record(*row) for row in rows]

    def update(self, key: str, *, only_if_status: tuple[str, ...] | None = None, **values) -> bool:
        """Sets columns; with only_if_status, only while the row is still in one of those states (so two
        processes noticing the same ending do not overwrite each other). Returns whether a row changed."""
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f"unknown {self.table} columns: {unknown}")
        sets = ", ".join(f"{k} = ?" for k in values)
        query = f"UPDATE {self.table} SET {sets} WHERE {self.key} = ?"
        args = [*values.values(), key]
        if only_if_status:
            query += f" AND status IN ({', '.join('?' * len(only_if_status))})"
            args += list(only_if_status)
        with self._connect() as db:
            return db.execute(query, args).rowcount > 0


class JobStore(SqliteTable[JobRecord]):
    table, key, record, schema = "jobs", "job_id", JobRecord, _SCHEMA

    def _migrate(self, db: sqlite3.Connection) -> None:
        have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        # Columns added after the first release: older databases gain them in place.
        for column, ddl in _ADDED_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {ddl}")

    def create(
        self, *, job_id: str, run_dir: Path, model: str, method: str, output_dir: Path, devices: str = "cpu",
        kind: str = "train",
    ) -> JobRecord:  # fmt: skip
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (job_id, status, created_at, run_dir, model, method, output_dir, devices, kind) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, time.time(), str(run_dir), model, method, str(output_dir), devices, kind),
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
        """Marks as running (not yet spawned) the queued jobs whose devices are free, oldest first, and returns
        their ids. One IMMEDIATE transaction: concurrent schedulers in other processes wait instead of
        double-booking a device."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                busy_gpus: set[str] = set()
                cpu_jobs = 0
                for (devices,) in db.execute("SELECT devices FROM jobs WHERE status = 'running' AND devices != 'ray'"):
                    if devices == "cpu":
                        cpu_jobs += 1
                    else:
                        busy_gpus |= set(devices.split(","))
                claimed = []
                # Jobs on a Ray cluster ('ray') are submitted there at once; the cluster does their queueing.
                queued = db.execute(
                    "SELECT job_id, devices FROM jobs WHERE status = 'queued' AND devices != 'ray' ORDER BY created_at"
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
