"""ServerStore: the SQLite table of vLLM servers, in the same $LMTUNER_HOME/jobs.db as the jobs.

Read and written through system.sqlite.SqliteTable, as the jobs are: one connection per thread, WAL journal, a busy
timeout, so the MCP server, the CLI and tests can share the file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from lmtuner_core.system.sqlite import SqliteTable

ServerStatus = Literal["starting", "running", "stopped", "failed"]
SERVER_STATUSES = get_args(ServerStatus)
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


class ServerStore(SqliteTable[ServerRecord]):
    table, key, record, schema = "servers", "server_id", ServerRecord, _SCHEMA

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
