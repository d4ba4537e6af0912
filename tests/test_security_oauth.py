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

from tests.helpers import TOKEN, http_client
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
from tests.test_oauth import LMTUNER, mcp_status, run_cli

# Bounds the issue sets (not tuning): another client is answered within 2 s while the attack runs, and SIGTERM
# ends the server within 5 s.
ANSWER_SECONDS = 2.0
STOP_SECONDS = 5.0
# The attacker's server gives up on its own after this long, so a test of the unfixed code ends too.
TRICKLE_SECONDS = 15.0


class HostileServer(ThreadingHTTPServer):
    """An attacker's web server on 127.0.0.1: Client ID Metadata Documents served at once, plus paths that answer
    a byte at a time (`/slow/…`: a 60 kB Content-Length, under any cap, then a byte every 0.2 s; `/trickle/…`: a
    document that way) or send 300 MB (`/big/…`, declared; `/endless/…`, undeclared). Records what it sent and
    how many slow answers are in progress."""

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


def test_fetches_stop_at_the_size_cap_and_within_a_total_deadline(lmtuner_home, evil):
    keys = ClientKeys()
    declared = evil.publish_client("declared", jwks_path="/big/jwks.json")  # Content-Length: 300 MB
    undeclared = evil.publish_client("undeclared", jwks_path="/endless/jwks.json")  # 300 MB, no length
    trickled = f"{evil.base}/trickle/client.json"  # the document itself, a byte every 0.2 s
    evil.documents["/trickle/client.json"] = json.dumps(
        {"client_id": trickled, "redirect_uris": [REDIRECT_URI]}
    ).encode()
    _, challenge = pkce_pair()
    with oauth_server(lmtuner_home) as (base, _, _):
        refusals = {}
        for client_id in (declared, undeclared):
            assert httpx.get(authorize_url(base, client_id, challenge)).status_code == 302
            form = {"grant_type": "authorization_code", "code": "c", "redirect_uri": REDIRECT_URI,
                    "code_verifier": "v" * 43, "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": keys.assertion(client_id, f"{base}/token")}  # fmt: skip
            refusals[client_id] = httpx.post(f"{base}/token", data=form, timeout=60)
        slow_document = httpx.get(authorize_url(base, trickled, challenge), timeout=60)
    for refusal in refusals.values():
        assert refusal.status_code == 401 and "larger than 65536 bytes" in refusal.json()["error_description"]
    print(f"\nbytes the attacker's server got out before the fetch hung up: {evil.sent}")
    # Refused on its declared length, or read up to the cap, then the connection dropped: what got out is what
    # the sockets' buffers hold, not 300 MB.
    assert evil.sent["/big/jwks.json"] < 10_000_000 and evil.sent["/endless/jwks.json"] < 10_000_000
    assert slow_document.status_code == 400
    assert "did not arrive in full within 5 s" in slow_document.json()["error_description"]


BAD_REDIRECTS = [
    "javascript:alert(document.domain)//",
    "data:text/html,<script>alert(1)</script>",
    "file:///etc/passwd",
    "vbscript:msgbox(1)",
    "https://claude.ai:443@evil.example/cb",
    "http://evil.example/cb",
    "https://app.example/cb#frag",
]


def test_redirect_uris_must_be_web_addresses_in_registrations_and_metadata_documents(lmtuner_home, evil):
    _, challenge = pkce_pair()
    documents = [evil.publish_client(f"doc-{i}", redirect_uris=[uri]) for i, uri in enumerate(BAD_REDIRECTS)]
    body = {"client_name": "x", "grant_types": ["authorization_code"], "token_endpoint_auth_method": "none"}
    with oauth_server(lmtuner_home) as (base, _, _):
        registered = [httpx.post(f"{base}/register", json=body | {"redirect_uris": [uri]}) for uri in BAD_REDIRECTS]
        fetched = [httpx.get(authorize_url(base, client_id, challenge)) for client_id in documents]
        listed = run_cli("--json", "clients")
    for uri, answer in zip(BAD_REDIRECTS, registered, strict=True):
        assert answer.status_code == 400, (uri, answer.text)
        assert "redirect_uris[0]" in answer.json()["error_description"], (uri, answer.text)
    for uri, answer in zip(BAD_REDIRECTS, fetched, strict=True):
        assert answer.status_code == 400 and "redirect_uris[0]" in answer.json()["error_description"], (
            uri,
            answer.text,
        )
        assert "location" not in answer.headers
    assert listed == []  # nothing was stored


def test_a_registration_flood_is_refused_and_stores_nothing(lmtuner_home):
    def db_bytes() -> int:
        return sum(path.stat().st_size for path in lmtuner_home.glob("oauth.db*"))

    body = {"client_name": "agent", "redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "none"}
    with oauth_server(lmtuner_home) as (base, url, _), httpx.Client(base_url=base) as http:
        honest = tokens_for(base, register(base)["client_id"])["access_token"]  # the owner's agent, approved
        before = db_bytes()
        huge = [http.post("/register", json=body | {"client_name": "A" * 3_900_000}) for _ in range(5)]
        long_name = http.post("/register", json=body | {"client_name": "A" * 5000})
        many_uris = http.post("/register", json=body | {"redirect_uris": [REDIRECT_URI] * 50})
        until_limited = [http.post("/register", json=body).status_code for _ in range(5)]
        after = db_bytes()
        # Other addresses (a proxy on this machine names them in X-Forwarded-For) still register, up to a global cap.
        others = [
            http.post("/register", json=body, headers={"X-Forwarded-For": f"198.51.100.{i // 10}"}).status_code
            for i in range(100)
        ]
        # A client never approved goes after 30 minutes (aged here by hand), on the next registration.
        with sqlite3.connect(lmtuner_home / "oauth.db") as db:
            db.execute("UPDATE clients SET created_at = created_at - 3600")
        purged_by = http.post("/register", json=body, headers={"X-Forwarded-For": "203.0.113.9"})
        remaining = run_cli("--json", "clients")
        still_answers = mcp_status(url, honest)
    assert [r.status_code for r in huge] == [413] * 5 and "client_name" in huge[0].json()["error_description"]
    assert long_name.status_code == 400 and "client_name: 5000 characters" in long_name.json()["error_description"]
    assert many_uris.status_code == 400 and "redirect_uris: 50 entries" in many_uris.json()["error_description"]
    assert until_limited[:2] == [201, 201] and until_limited[2:] == [429] * 3  # 10 per address per 10 minutes
    assert after - before < 200_000, (before, after)
    assert others.count(201) == 100 - 10 and others[-1] == 429  # 100 per 10 minutes in all (10 used above)
    assert purged_by.status_code == 429  # the global cap holds for a new address too
    assert [c["client_name"] for c in remaining] == ["test agent"]  # only the approved client is left
    assert still_answers == 200


def test_wrong_owner_tokens_lock_out_the_guesser_not_the_owner(lmtuner_home):
    with oauth_server(lmtuner_home) as (base, _, _):
        _, challenge = pkce_pair()
        client_id = register(base)["client_id"]
        guesser = {"X-Forwarded-For": "198.51.100.7"}  # as a reverse proxy on this machine names the sender
        start = httpx.get(authorize_url(base, client_id, challenge))
        page_url = start.headers["location"]
        request_id = page_url.split("request=")[1]
        guesses = [
            httpx.post(page_url.split("?")[0], data={"request": request_id, "owner_token": f"guess-{i}",
                                                     "decision": "approve"}, headers=guesser).status_code
            for i in range(7)
        ]  # fmt: skip
        guesser_with_the_token = httpx.post(
            page_url.split("?")[0], data={"request": request_id, "owner_token": TOKEN, "decision": "approve"},
            headers=guesser,
        )  # fmt: skip
        owner = consent(authorize_url(base, client_id, challenge))
    log = (lmtuner_home / "logs" / "server.log").read_text()
    assert guesses == [401] * 5 + [429] * 2
    assert guesser_with_the_token.status_code == 429
    assert owner.status_code == 303 and "code" in redirect_params(owner)
    assert "wrong owner tokens from 198.51.100.7" in log


def test_a_retried_refresh_keeps_the_grant_and_a_late_replay_still_ends_it(lmtuner_home):
    with oauth_server(lmtuner_home) as (base, url, _):
        client_id = register(base)["client_id"]
        first = tokens_for(base, client_id)
        refresh = {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": first["refresh_token"]}
        answers: list[httpx.Response] = []
        racers = [threading.Thread(target=lambda: answers.append(token_request(base, **refresh))) for _ in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=30)
        retried = token_request(base, **refresh)  # the client lost both answers and tries once more
        assert [a.status_code for a in answers] == [200, 200] and retried.status_code == 200, [a.text for a in answers]
        pairs = [a.json() for a in [*answers, retried]]
        assert [mcp_status(url, pair["access_token"]) for pair in pairs] == [200, 200, 200]
        # Much later (aged by hand past the 60 s leeway), the spent token is a replay: the grant ends.
        with sqlite3.connect(lmtuner_home / "oauth.db") as db:
            db.execute("UPDATE secrets SET used_at = used_at - 120 WHERE kind = 'refresh' AND used = 1")
        late = token_request(base, **refresh)
        after_late = mcp_status(url, pairs[-1]["access_token"])
    assert late.status_code == 400 and late.json()["error"] == "invalid_grant"
    assert after_late == 401


ESCAPES = "\x1b]52;c;ZXZpbA==\x07\x1b]0;owned\x07\x1b[2J\x9b31m\x7fevil\u202eagent\r\n"


def test_client_names_reach_the_terminal_and_the_consent_page_without_control_characters(lmtuner_home):
    body = {"client_name": f"{ESCAPES}Snake agent 🐍", "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none"}  # fmt: skip
    with oauth_server(lmtuner_home) as (base, _, _):
        client_id = httpx.post(f"{base}/register", json=body).json()["client_id"]
        _, challenge = pkce_pair()
        page = httpx.get(httpx.get(authorize_url(base, client_id, challenge)).headers["location"]).text
        printed = run_cli("clients")
        as_json = subprocess.run([LMTUNER, "--json", "clients"], capture_output=True, text=True, timeout=120).stdout
    for shown in (printed, page, as_json):
        assert not any(c in shown for c in "\x1b\x07\x9b\x7f\u202e\r"), repr(shown)
    assert "Snake agent 🐍" in printed and "Snake agent 🐍" in page
    assert json.loads(as_json)[0]["client_name"] == body["client_name"]  # JSON keeps the data, escaped
