"""`--auth oidc`: a real `lmtuner-mcp` verifying JWT access tokens from a small identity provider the test runs on
127.0.0.1 (discovery document + JWKS, RSA keys made here); same scopes as `--auth oauth`."""

from __future__ import annotations

import time

import anyio
import httpx2 as httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp.shared.exceptions import MCPError

from tests.helpers import INIT, MCP_HEADERS, READ_ONLY_TOOLS, free_port, http_client, http_server
from tests.oauth_helpers import document_server


class Issuer:
    """Signs tokens with a key published in its JWKS; `foreign_key` signs tokens the JWKS does not vouch for."""

    def __init__(self, server):
        self.url = server.base
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.foreign_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True) | {"kid": "k1", "use": "sig"}
        server.documents["/.well-known/openid-configuration"] = {"issuer": self.url, "jwks_uri": f"{self.url}/jwks"}
        server.documents["/jwks"] = {"keys": [jwk]}

    def token(self, audience: str, scope: str = "lmtuner:read lmtuner:train", *, key=None, **claims) -> str:
        now = int(time.time())
        body = {"iss": self.url, "sub": "alice", "aud": audience, "iat": now, "exp": now + 600, "scope": scope}
        return jwt.encode(body | claims, key or self.key, algorithm="RS256", headers={"kid": "k1"})


def status(url: str, token: str | None) -> int:
    headers = MCP_HEADERS | ({"Authorization": f"Bearer {token}"} if token else {})
    return httpx.post(url, json=INIT, headers=headers).status_code


async def view(url: str, token: str):
    async with http_client(url, token=token) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        jobs = await client.call_tool("list_jobs", {})
        training = await client.call_tool("start_training", {"config": {"model": "m", "dataset": "d"}})
    return names, jobs, training


async def train_only_view(url: str, token: str):
    async with http_client(url, token=token) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        with pytest.raises(MCPError) as refused:
            await client.list_resources()
    return names, str(refused.value)


def test_jwts_from_the_issuer_are_verified_with_its_jwks_and_scoped(lmtuner_home):
    port = free_port()
    public_url = f"http://127.0.0.1:{port}/mcp"
    with document_server() as idp:
        issuer = Issuer(idp)
        args = ["--auth", "oidc", "--public-url", public_url, "--issuer", issuer.url]
        with http_server(lmtuner_home, *args, port=port, token=None) as (url, _):
            challenge = httpx.post(url, json=INIT, headers=MCP_HEADERS)
            resource = httpx.get(f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp").json()
            full = anyio.run(view, url, issuer.token(public_url))
            read_only = anyio.run(view, url, issuer.token(public_url, scope="lmtuner:read"))
            train_only = anyio.run(train_only_view, url, issuer.token(public_url, scope="lmtuner:train"))
            refused = {
                "expired": status(url, issuer.token(public_url, exp=int(time.time()) - 60)),
                "wrong audience": status(url, issuer.token("https://other.example/mcp")),
                "wrong issuer": status(url, issuer.token(public_url, iss="https://evil.example")),
                "unknown key": status(url, issuer.token(public_url, key=issuer.foreign_key)),
                "not a JWT": status(url, "opaque-token"),
            }
        with http_server(lmtuner_home, *args, "--audience", "api://lmtuner", port=port, token=None) as (url, _):
            custom_audience = status(url, issuer.token("api://lmtuner")), status(url, issuer.token(public_url))

    assert challenge.status_code == 401 and "resource_metadata=" in challenge.headers["www-authenticate"]
    assert resource["authorization_servers"] == [issuer.url] and resource["resource"] == public_url
    names, jobs, training = full
    assert "start_training" in names and not jobs.is_error
    assert training.is_error and "insufficient_scope" not in training.content[0].text  # refused on its config only
    names, jobs, training = read_only
    assert names == READ_ONLY_TOOLS and not jobs.is_error
    assert training.is_error and "needs the scope lmtuner:train" in training.content[0].text
    names, resources_error = train_only
    assert "start_training" in names and not set(names) & set(READ_ONLY_TOOLS)
    assert "resources/list needs the scope lmtuner:read" in resources_error
    assert refused == dict.fromkeys(refused, 401)
    assert custom_audience == (200, 401)
