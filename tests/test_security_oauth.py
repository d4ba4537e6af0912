"""Hostile tests of `--auth oauth` (issue 22) through a real `lmtuner-mcp --http --auth oauth` and raw HTTP, every
byte to 127.0.0.1: slow and huge documents behind client_id and jwks_uri URLs, redirect URIs that are not web
addresses, registration floods, owner-token guessing, concurrent refreshes, terminal escapes in client names."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import httpx2 as httpx
import pytest

from tests.helpers import http_client
from tests.oauth_helpers import (
    ASSERTION_TYPE,
    REDIRECT_URI,
    ClientKeys,
    authorize_url,
    consent,
    oauth_server,
    pkce_pair,
    redirect_params,
    register,
    token_request,
    tokens_for,
)
from tests.test_oauth import LMTUNER, mcp_status

# Bounds the issue sets (not tuning): another client is answered within 2 s while the attack runs, and SIGTERM
# ends the server within 5 s.
ANSWER_SECONDS = 2.0
STOP_SECONDS = 5.0
# The attacker's server gives up on its own after this long, so a test of the unfixed code ends too.
TRICKLE_SECONDS = 15.0


class HostileServer(ThreadingHTTPServer):
    """An attacker's web server on 127.0.0.1: Client ID Metadata Documents served at once, plus paths that answer
    a byte at a time (`/slow/…`: a 60 kB Content-Length, under any cap, then a byte every 0.2 s; `/trickle/…`: a
    document that way) or send 300 MB (`/big/…`, declared; `/endless/…`, undeclared). Records what it sent and how many slow answers are in progress."""

    daemon_threads = True

    def __init__(self):
        self.documents: dict[str, bytes] = {}
        self.sent: dict[str, int] = {}
        self.slow_started = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), HostileHandler)
        self.base = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def publish_client(self, name: str, jwks_path: str | None = None, redirect_uris=(REDIRECT_URI,)) -> str:
        client_id = f"{self.base}/clients/{name}.json"
        document = {"client_id": client_id, "client_name": name, "redirect_uris": list(redirect_uris)}
        if jwks_path:
            document |= {"token_endpoint_auth_method": "private_key_jwt", "jwks_uri": self.base + jwks_path}
        self.documents[f"/clients/{name}.json"] = json.dumps(document).encode()
        return client_id


class HostileHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        server: HostileServer = self.server
        body = server.documents.get(self.path)
        try:
            if body is not None and not self.path.startswith("/trickle/"):
                self._start(len(body))
                self.wfile.write(body)
            elif self.path.startswith(("/slow/", "/trickle/")):
                with server.lock:
                    server.slow_started += 1
                data = body or b"x" * 60_000
                self._start(len(data))
                deadline = time.monotonic() + TRICKLE_SECONDS
                for i in range(len(data)):
                    if server.stopping.is_set() or time.monotonic() > deadline:
                        break
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    self._count(1)
                    time.sleep(0.2)
            elif self.path.startswith(("/big/", "/endless/")):
                self._start(300_000_000 if self.path.startswith("/big/") else None)
                chunk = b" " * 65536
                for _ in range(300_000_000 // len(chunk)):
                    if server.stopping.is_set():
                        break
                    self.wfile.write(chunk)
                    self._count(len(chunk))
            else:
                self.send_response(404)
                self.end_headers()
        except OSError:  # the server under test hung up: what it stopped reading at is in `sent`
            pass

    def _start(self, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _count(self, n: int) -> None:
        with self.server.lock:
            self.server.sent[self.path] = self.server.sent.get(self.path, 0) + n

    def log_message(self, *args):
        pass


@contextmanager
def hostile_server():
    server = HostileServer()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def evil(monkeypatch):
    monkeypatch.setenv("LMTUNER_OAUTH_ALLOW_LOOPBACK_CLIENT_IDS", "1")  # the attacker's server is on 127.0.0.1
    with hostile_server() as server:
        yield server


async def timed_tool_calls(url: str, access_token: str) -> dict[str, float]:
    """Seconds each of two tools took for another, honest client: list_jobs (answered on the event loop) and
    list_servers (answered in a worker thread, the pool a fetch must never take)."""
    seconds = {}
    async with http_client(url, token=access_token) as client:
        for tool in ("list_jobs", "list_servers"):
            start = time.monotonic()
            result = await client.call_tool(tool, {})
            seconds[tool] = time.monotonic() - start
            assert not result.is_error, result.content[0].text
    return seconds


def stop_seconds(proc: subprocess.Popen) -> float:
    """Seconds from SIGTERM until the process ended (killed, and reported as over the bound, past 3x the bound)."""
    start = time.monotonic()
    proc.terminate()
    try:
        proc.wait(timeout=STOP_SECONDS * 3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    return time.monotonic() - start


def test_a_hundred_slow_jwks_fetches_freeze_nothing_and_sigterm_still_stops_the_server(lmtuner_home, evil):
    keys = ClientKeys()
    clients = [evil.publish_client(f"slow-{i}", jwks_path=f"/slow/{i}.json") for i in range(100)]
    with oauth_server(lmtuner_home) as (base, url, proc):
        _, challenge = pkce_pair()
        with httpx.Client() as http:  # the server fetches and keeps each document (fast: only the JWKS are slow)
            for client_id in clients:
                assert http.get(authorize_url(base, client_id, challenge)).status_code == 302
        honest = tokens_for(base, register(base)["client_id"])["access_token"]

        answers: list[object] = []

        def token_with_assertion(client_id: str) -> None:
            form = {"grant_type": "authorization_code", "code": "c", "redirect_uri": REDIRECT_URI,
                    "code_verifier": "v" * 43, "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": keys.assertion(client_id, f"{base}/token")}  # fmt: skip
            try:
                answers.append(httpx.post(f"{base}/token", data=form, timeout=TRICKLE_SECONDS + 5))
            except httpx.HTTPError as exc:
                answers.append(exc)

        attackers = [threading.Thread(target=token_with_assertion, args=(c,), daemon=True) for c in clients]
        for thread in attackers:
            thread.start()
        deadline = time.monotonic() + 10
        while evil.slow_started == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the attack is under way: slow JWKS answers are trickling in
        in_flight = evil.slow_started
        tool_seconds = anyio.run(timed_tool_calls, url, honest)
        stopped_in = stop_seconds(proc)
        for thread in attackers:
            thread.join(timeout=TRICKLE_SECONDS + 10)
    refused_at_once = [
        a for a in answers if isinstance(a, httpx.Response) and "too many documents" in a.text and a.status_code == 401
    ]
    print(f"\nslow JWKS answers started: {in_flight}; /token refused at once: {len(refused_at_once)} of 100; "
          f"tool calls: {tool_seconds}; SIGTERM to exit: {stopped_in:.2f} s")  # fmt: skip
    assert in_flight >= 1
    assert tool_seconds["list_jobs"] < ANSWER_SECONDS and tool_seconds["list_servers"] < ANSWER_SECONDS
    assert stopped_in < STOP_SECONDS
    assert refused_at_once, [getattr(a, "text", a) for a in answers[:5]]
