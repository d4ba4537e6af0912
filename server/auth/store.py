"""SQLite persistence for `--auth oauth`: clients, pending consents, codes and tokens, so a server restart keeps
connected agents logged in. Codes and tokens are stored only as SHA-256 hashes: a copy of the database lets no
one call the server. (They are 256-bit random strings, so a fast hash is enough; no salt or KDF is needed.)"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    info TEXT NOT NULL,            -- OAuthClientInformationFull as JSON
    source TEXT NOT NULL,          -- 'registered' (RFC 7591) or 'metadata_document' (a Client ID Metadata Document)
    created_at REAL NOT NULL,
    fetched_at REAL,               -- when the metadata document was last fetched
    approved_at REAL               -- when the owner last approved it (NULL: never)
);
CREATE TABLE IF NOT EXISTS secrets (
    hash TEXT PRIMARY KEY,         -- sha256 of the code, token or consent request id
    kind TEXT NOT NULL,            -- 'consent', 'code', 'access', 'refresh'
    client_id TEXT NOT NULL,
    grant_id TEXT NOT NULL,        -- one owner approval: its code and every token issued from it
    scopes TEXT NOT NULL,
    resource TEXT,
    expires_at REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL DEFAULT '{}',
    used_at REAL                   -- when a code or refresh token was spent, an access token first used
);
CREATE INDEX IF NOT EXISTS secrets_by_grant ON secrets (grant_id);
CREATE INDEX IF NOT EXISTS secrets_by_client ON secrets (client_id);
"""


def secret_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_secret() -> str:
    """A code or token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class StoredSecret:
    kind: str
    client_id: str
    grant_id: str
    scopes: list[str]
    resource: str | None
    expires_at: float
    used: bool
    data: dict[str, Any]
    used_at: float | None = None


class AuthStore:
    """`$LMTUNER_HOME/oauth.db` (mode 0600). One short connection per call: the server's calls are few and quick."""

    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            if "used_at" not in {row[1] for row in db.execute("PRAGMA table_info(secrets)")}:
                db.execute("ALTER TABLE secrets ADD COLUMN used_at REAL")  # a database from before the column

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    # clients

    def save_client(self, client_id: str, info: dict[str, Any], source: str) -> None:
        now = time.time()
        with self._connect() as db:
            db.execute(
                "INSERT INTO clients (client_id, info, source, created_at, fetched_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (client_id) DO UPDATE SET info = excluded.info, fetched_at = excluded.fetched_at",
                (client_id, json.dumps(info), source, now, now if source == "metadata_document" else None),
            )

    def client(self, client_id: str) -> tuple[dict[str, Any], str, float | None] | None:
        """(info, source, fetched_at) of a known client, or None."""
        with self._connect() as db:
            row = db.execute(
                "SELECT info, source, fetched_at FROM clients WHERE client_id = ?", (client_id,)
            ).fetchone()
        return (json.loads(row[0]), row[1], row[2]) if row else None

    def clients(self) -> list[dict[str, Any]]:
        """Every known client with how many live tokens it holds, newest first."""
        now = time.time()
        with self._connect() as db:
            rows = db.execute(
                "SELECT c.client_id, c.info, c.source, c.created_at, c.approved_at, "
                "  (SELECT COUNT(*) FROM secrets s WHERE s.client_id = c.client_id AND s.kind = 'refresh' "
                "   AND s.used = 0 AND s.expires_at > ?), "
                "  (SELECT MAX(s.expires_at) FROM secrets s WHERE s.client_id = c.client_id AND s.kind = 'access') "
                "FROM clients c ORDER BY c.created_at DESC",
                (now,),
            ).fetchall()
        return [
            {
                "client_id": client_id,
                "client_name": json.loads(info).get("client_name"),
                "redirect_uris": json.loads(info).get("redirect_uris") or [],
                "source": source,
                "created_at": created_at,
                "approved_at": approved_at,
                "active_grants": grants,
                "last_token_expires_at": last_expiry,
            }
            for client_id, info, source, created_at, approved_at, grants, last_expiry in rows
        ]

    def delete_client(self, client_id: str) -> bool:
        """Forgets the client and every code and token it holds; False when it was not known."""
        with self._connect() as db:
            db.execute("DELETE FROM secrets WHERE client_id = ?", (client_id,))
            return db.execute("DELETE FROM clients WHERE client_id = ?", (client_id,)).rowcount > 0

    # codes, tokens, pending consents

    def put(
        self,
        value: str,
        *,
        kind: str,
        client_id: str,
        grant_id: str,
        scopes: list[str],
        resource: str | None,
        expires_at: float,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO secrets (hash, kind, client_id, grant_id, scopes, resource, expires_at, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (secret_hash(value), kind, client_id, grant_id, " ".join(scopes), resource, expires_at,
                 json.dumps(data or {})),
            )  # fmt: skip

    def get(self, value: str, kind: str) -> StoredSecret | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT kind, client_id, grant_id, scopes, resource, expires_at, used, data, used_at FROM secrets "
                "WHERE hash = ? AND kind = ?",
                (secret_hash(value), kind),
            ).fetchone()
        if row is None:
            return None
        kind, client_id, grant_id, scopes, resource, expires_at, used, data, used_at = row
        return StoredSecret(
            kind, client_id, grant_id, scopes.split(), resource, expires_at, bool(used), json.loads(data), used_at
        )

    def mark_used(self, value: str) -> bool:
        """Marks a code or refresh token spent (an access token: used once at least); False when it already was."""
        with self._connect() as db:
            return (
                db.execute(
                    "UPDATE secrets SET used = 1, used_at = ? WHERE hash = ? AND used = 0",
                    (time.time(), secret_hash(value)),
                ).rowcount
                > 0
            )

    def used_since(self, grant_id: str, since: float) -> bool:
        """Whether a token of the grant was spent or first used after `since` (its holder has moved on)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT 1 FROM secrets WHERE grant_id = ? AND kind IN ('access', 'refresh') AND used = 1 "
                "AND used_at > ? LIMIT 1",
                (grant_id, since),
            ).fetchone()
        return row is not None

    def delete(self, value: str) -> bool:
        """False when it was already gone (another request took it first)."""
        with self._connect() as db:
            return db.execute("DELETE FROM secrets WHERE hash = ?", (secret_hash(value),)).rowcount > 0

    def revoke_grant(self, grant_id: str, keep_spent_codes: bool = True) -> None:
        """Ends one approval: its tokens go. Spent codes stay (marked used) so a replay is recognised."""
        with self._connect() as db:
            db.execute(
                "DELETE FROM secrets WHERE grant_id = ? AND NOT (kind = 'code' AND used = 1 AND ?)",
                (grant_id, keep_spent_codes),
            )

    def revoke_tokens_of_grant(self, grant_id: str, kind: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM secrets WHERE grant_id = ? AND kind = ?", (grant_id, kind))

    def mark_approved(self, client_id: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE clients SET approved_at = ? WHERE client_id = ?", (time.time(), client_id))

    def purge_unapproved(self, older_than_seconds: float) -> int:
        """Drops clients the owner never approved that appeared over `older_than_seconds` ago, with their pending
        consent requests; returns how many. Run on every registration: registration is open to anyone."""
        cutoff = time.time() - older_than_seconds
        with self._connect() as db:
            db.execute(
                "DELETE FROM secrets WHERE client_id IN "
                "(SELECT client_id FROM clients WHERE approved_at IS NULL AND created_at < ?)",
                (cutoff,),
            )
            return db.execute("DELETE FROM clients WHERE approved_at IS NULL AND created_at < ?", (cutoff,)).rowcount

    def purge_expired(self, grace_seconds: float = 86400) -> None:
        """Drops what expired over a day ago (spent codes are kept that long to recognise replays), and clients
        the owner never approved that are over a day old: registration is open to anyone, so it must not let
        anyone fill the database."""
        cutoff = time.time() - grace_seconds
        with self._connect() as db:
            db.execute("DELETE FROM secrets WHERE expires_at < ?", (cutoff,))
            db.execute("DELETE FROM clients WHERE approved_at IS NULL AND created_at < ?", (cutoff,))
