"""ServerStore: the SQLite table of vLLM servers, in the same $LMTUNER_HOME/jobs.db as the jobs.

Same habits as JobStore: one short-lived connection per operation, WAL journal, a busy timeout, so the MCP
server, the CLI and tests can share the file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

SERVER_STATUSES = ("starting", "running", "stopped", "failed")
LIVE = ("starting", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    server_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    ready_at REAL,
    stopped_at REAL,
    pid INTEGER,
    pid_started_at REAL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    model TEXT NOT NULL,
    served_model_name TEXT NOT NULL,
    adapters TEXT NOT NULL DEFAULT '{}',
    python TEXT NOT NULL,
    log_path TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS servers_status ON servers(status);
"""


@dataclass
class ServerRecord:
    server_id: str
    status: str
    created_at: float
    ready_at: float | None
    stopped_at: float | None
    pid: int | None
    pid_started_at: float | None
    host: str
    port: int
    model: str
    served_model_name: str
    adapters: str  # JSON {served name: adapter folder}
    python: str
    log_path: str
    error: str | None

    @property
    def adapter_map(self) -> dict[str, str]:
        return json.loads(self.adapters or "{}")

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"


_COLUMNS = [f.name for f in fields(ServerRecord)]


class ServerStore:
    def __init__(self, home: Path):
        self.path = home / "jobs.db"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def create(
        self, *, server_id: str, host: str, port: int, model: str, served_model_name: str,
        adapters: dict[str, str], python: str, log_path: Path,
    ) -> ServerRecord:  # fmt: skip
        with self._connect() as db:
            db.execute(
                "INSERT INTO servers (server_id, status, created_at, host, port, model, served_model_name, adapters, "
                "python, log_path) VALUES (?, 'starting', ?, ?, ?, ?, ?, ?, ?, ?)",
                (server_id, time.time(), host, port, model, served_model_name, json.dumps(adapters), python,
                 str(log_path)),
            )  # fmt: skip
        return self.get(server_id)  # type: ignore[return-value]

    def get(self, server_id: str) -> ServerRecord | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM servers WHERE server_id = ?", (server_id,)).fetchone()
        return ServerRecord(*row) if row else None

    def list(self, statuses: tuple[str, ...] | None = None) -> list[ServerRecord]:
        """Servers, newest first, optionally only those in the given statuses."""
        query = f"SELECT {', '.join(_COLUMNS)} FROM servers"
        args: tuple = ()
        if statuses:
            query += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args = statuses
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at DESC", args).fetchall()
        return [ServerRecord(*row) for row in rows]

    def update(self, server_id: str, *, only_if_status: tuple[str, ...] | None = None, **values) -> bool:
        """Sets columns; with only_if_status, only while the server is still in one of those states."""
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown server columns: {unknown}")
        query = f"UPDATE servers SET {', '.join(f'{k} = ?' for k in values)} WHERE server_id = ?"
        args = [*values.values(), server_id]
        if only_if_status:
            query += f" AND status IN ({', '.join('?' * len(only_if_status))})"
            args += list(only_if_status)
        with self._connect() as db:
            return db.execute(query, args).rowcount > 0
