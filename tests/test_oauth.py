"""`--auth oauth` through the front door: a real `lmtuner-mcp --http --auth oauth` process on 127.0.0.1, the SDK's
own OAuth client, real HTTP for every refusal, a restart, and the owner's CLI (`lmtuner clients`)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx2 as httpx
import mcp
import pytest
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from tests.helpers import INIT, LMTUNER_MCP, MCP_HEADERS, READ_ONLY_TOOLS, free_port, http_client
from tests.oauth_helpers import (
    ASSERTION_TYPE,
    REDIRECT_URI,
    ClientKeys,
    authorize_url,
    consent,
    document_server,
    oauth_server,
    pkce_pair,
    redirect_params,
    register,
    token_request,
    tokens_for,
)

LMTUNER = str(Path(sys.executable).parent / "lmtuner")


def mcp_status(url: str, access_token: str | None) -> int:
    headers = MCP_HEADERS | ({"Authorization": f"Bearer {access_token}"} if access_token else {})
    return httpx.post(url, json=INIT, headers=headers).status_code


async def tool_names_and_jobs(url: str, access_token: str) -> tuple[list[str], mcp.types.CallToolResult]:
    async with http_client(url, token=access_token) as client:
        tools = await client.list_tools()
        return [t.name for t in tools.tools], await client.call_tool("list_jobs", {})


class MemoryStorage:
    def __init__(self):
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client

    async def set_client_info(self, client_info):
        self.client = client_info


def test_metadata_and_the_401_point_agents_at_the_authorization_server(lmtuner_home):
    with oauth_server(lmtuner_home) as (base, url, _):
        challenge = httpx.post(url, json=INIT, headers=MCP_HEADERS)
        resource = httpx.get(f"{base}/.well-known/oauth-protected-resource/mcp").json()
        root_variant = httpx.get(f"{base}/.well-known/oauth-protected-resource").json()
        server = httpx.get(f"{base}/.well-known/oauth-authorization-server").json()
    assert challenge.status_code == 401
    assert (
        f'resource_metadata="{base}/.well-known/oauth-protected-resource/mcp"' in challenge.headers["www-authenticate"]
    )
    assert resource == root_variant
    assert resource["resource"] == url and resource["authorization_servers"] == [base]
    assert resource["scopes_supported"] == ["lmtuner:read", "lmtuner:train"]
    assert server["code_challenge_methods_supported"] == ["S256"]
    assert {"none", "private_key_jwt"} <= set(server["token_endpoint_auth_methods_supported"])
    assert server["client_id_metadata_document_supported"] is True
    assert server["registration_endpoint"] == f"{base}/register" and server["revocation_endpoint"] == f"{base}/revoke"


def test_the_sdk_oauth_client_registers_gets_consent_and_calls_a_tool(lmtuner_home):
    async def scenario(url: str):
        seen: dict[str, str] = {}

        async def redirect_handler(authorization_url: str) -> None:
            seen["authorization_url"] = authorization_url

        async def callback_handler() -> AuthorizationCodeResult:
            answer = await anyio.to_thread.run_sync(consent, seen["authorization_url"])
            return AuthorizationCodeResult(**redirect_params(answer))

        auth = OAuthClientProvider(
            server_url=url,
            client_metadata=OAuthClientMetadata(
                client_name="SDK agent",
                redirect_uris=[REDIRECT_URI],
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                token_endpoint_auth_method="none",
            ),
            storage=(storage := MemoryStorage()),
            redirect_handler=redirect_handler,
            callback_handler=callback_handler,
        )
        http = create_mcp_http_client(auth=auth)
        async with http, mcp.Client(streamable_http_client(url, http_client=http)) as client:
            tools = await client.list_tools()
            jobs = await client.call_tool("list_jobs", {})
        return [t.name for t in tools.tools], jobs, storage, seen

    with oauth_server(lmtuner_home) as (_, url, _):
        names, jobs, storage, seen = anyio.run(scenario, url)
    assert "resource=" in seen["authorization_url"] and "code_challenge_method=S256" in seen["authorization_url"]
    assert set(READ_ONLY_TOOLS) < set(names) and "start_training" in names
    assert not jobs.is_error and jobs.structured_content == {"jobs": []}
    assert storage.tokens.refresh_token and storage.tokens.scope == "lmtuner:read lmtuner:train"
    # Only hashes are stored: neither token appears in the database file.
    db = b"".join(path.read_bytes() for path in lmtuner_home.glob("oauth.db*"))
    assert len(db) > 0
    assert storage.tokens.access_token.encode() not in db and storage.tokens.refresh_token.encode() not in db


def test_every_refusal_is_a_clear_status_or_error(lmtuner_home):
    with oauth_server(lmtuner_home) as (base, url, _):
        client_id = register(base)["client_id"]
        verifier, challenge = pkce_pair()

        # no token; a made-up token
        assert mcp_status(url, None) == 401 and mcp_status(url, "made-up") == 401

        # unregistered redirect: no redirect to it, an error page instead
        unregistered = httpx.get(authorize_url(base, client_id, challenge, redirect_uri="https://evil.example/cb"))
        assert unregistered.status_code == 400 and "not registered" in unregistered.json()["error_description"]

        # a resource that is not this server
        other = redirect_params_of(
            httpx.get(authorize_url(base, client_id, challenge, resource="https://x.example/mcp"))
        )
        assert other["error"] == "invalid_target"

        # the owner denies
        denied = redirect_params(consent(authorize_url(base, client_id, challenge), decision="deny"))
        assert denied["error"] == "access_denied" and denied["state"] == "st-1"

        # wrong PKCE verifier
        code = redirect_params(consent(authorize_url(base, client_id, challenge)))["code"]
        exchange = {"grant_type": "authorization_code", "client_id": client_id, "redirect_uri": REDIRECT_URI}
        wrong_verifier = token_request(base, **exchange, code=code, code_verifier=pkce_pair()[0])
        assert wrong_verifier.status_code == 400 and wrong_verifier.json()["error"] == "invalid_grant"
        assert "code_verifier" in wrong_verifier.json()["error_description"]

        # a code is single-use; replaying it also ends the tokens it gave
        first = token_request(base, **exchange, code=code, code_verifier=verifier)
        assert first.status_code == 200
        replay = token_request(base, **exchange, code=code, code_verifier=verifier)
        assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
        assert mcp_status(url, first.json()["access_token"]) == 401

        # refresh tokens rotate; the old one, presented again, ends the grant
        tokens = tokens_for(base, client_id)
        refresh = {"grant_type": "refresh_token", "client_id": client_id}
        renewed = token_request(base, **refresh, refresh_token=tokens["refresh_token"])
        assert renewed.status_code == 200 and renewed.json()["refresh_token"] != tokens["refresh_token"]
        assert mcp_status(url, tokens["access_token"]) == 401  # the rotated-out access token ends too
        assert mcp_status(url, renewed.json()["access_token"]) == 200
        reused = token_request(base, **refresh, refresh_token=tokens["refresh_token"])
        assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
        assert mcp_status(url, renewed.json()["access_token"]) == 401

        # revocation
        tokens = tokens_for(base, client_id)
        assert mcp_status(url, tokens["access_token"]) == 200
        revoked = httpx.post(f"{base}/revoke", data={"token": tokens["access_token"], "client_id": client_id})
        assert revoked.status_code == 200 and mcp_status(url, tokens["access_token"]) == 401
        assert token_request(base, **refresh, refresh_token=tokens["refresh_token"]).status_code == 400

        # a read-only token: sees only read tools; a training tool is refused naming the scope
        read_client = register(base, scope="lmtuner:read")["client_id"]
        read_token = tokens_for(base, read_client, scope="lmtuner:read")["access_token"]
        names, result = anyio.run(read_only_view, url, read_token)
        assert names == READ_ONLY_TOOLS
        assert result.is_error and "lmtuner:train" in result.content[0].text
        assert "insufficient_scope" in result.content[0].text
        bigger = httpx.get(authorize_url(base, read_client, challenge, scope="lmtuner:read lmtuner:train"))
        assert redirect_params_of(bigger)["error"] == "invalid_scope"

        # wrong owner tokens: counted, then refused for a while even with the right one
        pending = authorize_url(base, client_id, challenge)
        statuses = [consent(pending, owner_token=f"guess-{i}").status_code for i in range(5)]
        locked = consent(pending)
    assert statuses == [401] * 5
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert "Too many wrong owner tokens" in locked.text


async def read_only_view(url: str, access_token: str):
    async with http_client(url, token=access_token) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        result = await client.call_tool("start_training", {"config": {"model": "m", "dataset": "d"}})
    return names, result


def redirect_params_of(response: httpx.Response) -> dict[str, str]:
    from urllib.parse import parse_qs, urlsplit

    assert response.status_code == 302, response.text
    return {key: values[0] for key, values in parse_qs(urlsplit(response.headers["location"]).query).items()}


def test_an_expired_access_token_is_refused_and_the_refresh_token_renews_it(lmtuner_home):
    with oauth_server(lmtuner_home, "--access-token-ttl", "1") as (base, url, _):
        client_id = register(base)["client_id"]
        tokens = tokens_for(base, client_id)
        assert tokens["expires_in"] == 1
        time.sleep(2.1)
        expired = mcp_status(url, tokens["access_token"])
        renewed = token_request(
            base, grant_type="refresh_token", client_id=client_id, refresh_token=tokens["refresh_token"]
        )
        assert renewed.status_code == 200
        assert mcp_status(url, renewed.json()["access_token"]) == 200
    assert expired == 401


def test_a_restart_keeps_clients_connected_and_the_owner_can_list_and_revoke_them(lmtuner_home):
    port = free_port()
    with oauth_server(lmtuner_home, port=port) as (base, url, _):
        client_id = register(base)["client_id"]
        tokens = tokens_for(base, client_id)
    with oauth_server(lmtuner_home, port=port) as (base, url, _):
        names, jobs = anyio.run(tool_names_and_jobs, url, tokens["access_token"])
        assert "start_training" in names and not jobs.is_error
        renewed = token_request(
            base, grant_type="refresh_token", client_id=client_id, refresh_token=tokens["refresh_token"]
        )
        assert renewed.status_code == 200
        listed = run_cli("--json", "clients")
        assert [c["client_id"] for c in listed] == [client_id]
        assert listed[0]["client_name"] == "test agent" and listed[0]["active_grants"] == 1
        access = renewed.json()["access_token"]
        assert mcp_status(url, access) == 200
        run_cli("revoke-client", client_id)
        assert mcp_status(url, access) == 401
        assert run_cli("--json", "clients") == []
    # Tokens are bound to the public URL: served under another one, a token issued before is refused.
    other = tokens_for_fresh_client(lmtuner_home, port)
    with oauth_server(lmtuner_home, port=port, public_url=f"http://localhost:{port}/mcp") as (_, url, _):
        assert mcp_status(url, other) == 401


def tokens_for_fresh_client(home: Path, port: int) -> str:
    with oauth_server(home, port=port) as (base, url, _):
        access = tokens_for(base, register(base)["client_id"])["access_token"]
        assert mcp_status(url, access) == 200
    return access


def run_cli(*args: str):
    out = subprocess.run([LMTUNER, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if args[0] == "--json" else out.stdout


@pytest.fixture
def documents():
    with document_server() as server:
        yield server


def test_a_client_id_metadata_document_client_connects(lmtuner_home, documents, monkeypatch):
    # A replica of ChatGPT's document: a public client that signs client assertions with a published key.
    client_id, keys = documents.publish_signing_client("Document agent", REDIRECT_URI)
    documents.documents["/oauth/other.json"] = {"client_id": client_id, "redirect_uris": [REDIRECT_URI]}
    documents.documents["/oauth/foreign-keys.json"] = {
        "client_id": f"{documents.base}/oauth/foreign-keys.json",
        "redirect_uris": [REDIRECT_URI],
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks_uri": "https://keys.example/jwks.json",
    }
    verifier, challenge = pkce_pair()
    # Production rule: an http (or loopback) client_id URL is refused, with the reason.
    with oauth_server(lmtuner_home) as (base, url, _):
        refused = httpx.get(authorize_url(base, client_id, challenge))
    assert refused.status_code == 400 and "must use https" in refused.json()["error_description"]

    monkeypatch.setenv("LMTUNER_OAUTH_ALLOW_LOOPBACK_CLIENT_IDS", "1")  # test mode: documents on 127.0.0.1
    with oauth_server(lmtuner_home) as (base, url, _):
        page = httpx.get(httpx.get(authorize_url(base, client_id, challenge)).headers["location"])
        assert "Document agent" in page.text and "127.0.0.1:9" in page.text
        code = redirect_params(consent(authorize_url(base, client_id, challenge)))["code"]
        exchange = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
                    "code_verifier": verifier, "client_assertion_type": ASSERTION_TYPE}  # fmt: skip
        unsigned = token_request(base, **{**exchange, "client_id": client_id, "client_assertion_type": ""})
        forged = token_request(
            base, **exchange, client_assertion=keys.assertion(client_id, f"{base}/token", key=ClientKeys().key)
        )
        # RFC 7523: the assertion alone names the client (no client_id field), as ChatGPT may send it.
        assertion = keys.assertion(client_id, f"{base}/token")
        tokens = token_request(base, **exchange, client_assertion=assertion)
        assert tokens.status_code == 200, tokens.text
        names, jobs = anyio.run(tool_names_and_jobs, url, tokens.json()["access_token"])
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens.json()["refresh_token"],
                   "client_id": client_id, "client_assertion_type": ASSERTION_TYPE}  # fmt: skip
        replayed = token_request(base, **refresh, client_assertion=assertion)
        refreshed = token_request(base, **refresh, client_assertion=keys.assertion(client_id, base))
        wrong_redirect = httpx.get(authorize_url(base, client_id, challenge, redirect_uri="https://evil.example/cb"))
        mismatched = httpx.get(authorize_url(base, f"{documents.base}/oauth/other.json", challenge))
        missing = httpx.get(authorize_url(base, f"{documents.base}/oauth/none.json", challenge))
        foreign_keys = httpx.get(authorize_url(base, f"{documents.base}/oauth/foreign-keys.json", challenge))
    assert unsigned.status_code == 401 and "private_key_jwt" in unsigned.json()["error_description"]
    assert forged.status_code == 401 and forged.json()["error"] == "invalid_client"
    assert "start_training" in names and not jobs.is_error
    assert replayed.status_code == 401 and "already used" in replayed.json()["error_description"]
    assert refreshed.status_code == 200, refreshed.text
    assert wrong_redirect.status_code == 400 and "not registered" in wrong_redirect.json()["error_description"]
    assert mismatched.status_code == 400 and "must equal its URL" in mismatched.json()["error_description"]
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["error_description"]
    assert foreign_keys.status_code == 400 and "document's own host" in foreign_keys.json()["error_description"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--http", "--auth", "oauth"], "--public-url is required"),
        (["--http", "--auth", "oauth", "--public-url", "http://lmtuner.example.com/mcp"], "must be https"),
        (["--http", "--auth", "oauth", "--public-url", "https://lmtuner.example.com/api"], "the path must be /mcp"),
        (["--http", "--auth", "oidc", "--public-url", "https://lmtuner.example.com/mcp"], "--issuer is required"),
        (["--auth", "oauth"], "apply to --http"),
        (["--http", "--public-url", "https://lmtuner.example.com/mcp"], "--public-url applies to --auth oauth or oidc"),
        (["--http", "--auth", "oauth", "--issuer", "https://idp.example"], "--issuer applies to --auth oidc"),
    ],
)
def test_bad_auth_options_are_refused_naming_the_option(lmtuner_home, args, expected):
    out = subprocess.run([LMTUNER_MCP, *args, "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and expected in out.stderr, out.stderr


def test_oauth_beyond_loopback_still_needs_a_configured_owner_token(lmtuner_home, monkeypatch):
    monkeypatch.delenv("LMTUNER_TOKEN", raising=False)
    args = ["--http", "--host", "0.0.0.0", "--auth", "oauth", "--public-url", "https://lmtuner.example.com/mcp"]
    out = subprocess.run([LMTUNER_MCP, *args, "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "LMTUNER_TOKEN" in out.stderr


def test_clients_the_owner_never_approved_are_dropped_after_a_day(tmp_path):
    from server.auth.store import AuthStore

    store = AuthStore(tmp_path / "oauth.db")
    for client_id in ("approved", "pending", "fresh"):
        store.save_client(client_id, {"client_id": client_id, "redirect_uris": [REDIRECT_URI]}, "registered")
    store.mark_approved("approved")
    with sqlite3.connect(tmp_path / "oauth.db") as db:  # two of them registered two days ago
        db.execute("UPDATE clients SET created_at = created_at - 172800 WHERE client_id != 'fresh'")
    store.purge_expired()
    assert sorted(c["client_id"] for c in store.clients()) == ["approved", "fresh"]
