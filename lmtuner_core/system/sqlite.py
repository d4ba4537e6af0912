"""The SQLite tables under $LMTUNER_HOME (jobs.db): the job store and the inference-server table share this base.

One connection per thread, kept open (opening one and parsing the schema cost about as much as a job_status
answer), in autocommit mode with a WAL journal and a busy timeout, so several server processes (stdio and HTTP at
once) and the CLI can share one file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Generic, TypeVar

R = TypeVar("R")


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
