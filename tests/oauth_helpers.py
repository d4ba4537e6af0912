"""Helpers for the OAuth tests: a real `lmtuner-mcp --http --auth oauth` process, the owner's consent given over
real HTTP (the same form a browser submits), PKCE pairs and raw token requests."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx2 as httpx
import jwt

from tests.helpers import TOKEN, free_port, http_server

REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the tests read the code from the Location header


@contextmanager
def oauth_server(home: Path, *args: str, port: int | None = None, public_url: str | None = None):
    """(base URL, /mcp URL, process) of a server in --auth oauth mode whose owner token is TOKEN."""
    port = port or free_port()
    public_url = public_url or f"http://127.0.0.1:{port}/mcp"
    with http_server(home, "--auth", "oauth", "--public-url", public_url, *args, port=port) as (url, proc):
        yield f"http://127.0.0.1:{port}", url, proc


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def register(base: str, scope: str | None = None, redirect_uri: str = REDIRECT_URI) -> dict:
    body = {
        "client_name": "test agent",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    if scope:
        body["scope"] = scope
    response = httpx.post(f"{base}/register", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def authorize_url(base: str, client_id: str, challenge: str, **extra: str) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st-1",
        "resource": f"{base}/mcp",
        **extra,
    }
    return f"{base}/authorize?{urlencode(params)}"


def consent(authorization_url: str, owner_token: str = TOKEN, decision: str = "approve") -> httpx.Response:
    """Follows /authorize to the consent page and submits its form; returns the form's response."""
    start = httpx.get(authorization_url)
    assert start.status_code == 302, start.text
    page_url = start.headers["location"]
    page = httpx.get(page_url)
    assert page.status_code == 200 and 'name="owner_token"' in page.text, page.text
    request_id = parse_qs(urlsplit(page_url).query)["request"][0]
    form = {"request": request_id, "owner_token": owner_token, "decision": decision}
    return httpx.post(page_url.split("?")[0], data=form)


def redirect_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 303, response.text
    return {key: values[0] for key, values in parse_qs(urlsplit(response.headers["location"]).query).items()}


def token_request(base: str, **form: str) -> httpx.Response:
    return httpx.post(f"{base}/token", data=form)


def tokens_for(base: str, client_id: str, scope: str | None = None) -> dict:
    """Access and refresh token for a registered public client, through consent and the code exchange."""
    verifier, challenge = pkce_pair()
    extra = {"scope": scope} if scope else {}
    code = redirect_params(consent(authorize_url(base, client_id, challenge, **extra)))["code"]
    response = token_request(
        base, grant_type="authorization_code", code=code, client_id=client_id, redirect_uri=REDIRECT_URI,
        code_verifier=verifier, resource=f"{base}/mcp",
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


class DocumentServer(ThreadingHTTPServer):
    """Serves Client ID Metadata Documents on 127.0.0.1 (what chatgpt.com does over https in production), and
    records what arrives at an agent's redirect endpoints (`callbacks`: path -> query strings)."""

    def __init__(self):
        self.documents: dict[str, dict] = {}
        self.callbacks: dict[str, list[str]] = {}
        super().__init__(("127.0.0.1", 0), DocumentHandler)
        self.base = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def publish_signing_client(self, name: str, redirect_uri: str) -> tuple[str, ClientKeys]:
        """(client_id, keys) of a client shaped like ChatGPT's document at https://chatgpt.com/oauth/client.json:
        public, signing RFC 7523 client assertions with a key published on its own host."""
        client_id = f"{self.base}/oauth/client.json"
        keys = ClientKeys()
        self.documents["/oauth/jwks.json"] = keys.jwks
        self.documents["/oauth/client.json"] = {
            "client_id": client_id,
            "client_name": name,
            "client_uri": self.base,
            "redirect_uris": [redirect_uri],
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_signing_alg": "RS256",
            "jwks_uri": f"{self.base}/oauth/jwks.json",
        }
        return client_id, keys


class DocumentHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path in self.server.callbacks:  # an agent's OAuth redirect endpoint: keep what arrived
            self.server.callbacks[path].append(query)
            self._answer(200, b"<!doctype html><title>Connected</title><p id=done>Connected.</p>", "text/html")
            return
        document = self.server.documents.get(path)
        if document is None:
            self._answer(404, b"not found", "text/plain")
        else:
            self._answer(200, json.dumps(document).encode(), "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def document_server():
    server = DocumentServer()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class ClientKeys:
    """An agent's signing key, published as a JWKS, and RFC 7523 client assertions signed with it (what
    ChatGPT does with the key at https://chatgpt.com/oauth/jwks.json)."""

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwks = {"keys": [jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True) | {"kid": "a1"}]}

    def assertion(self, client_id: str, audience: str, *, key=None, jti: str | None = None) -> str:
        now = int(time.time())
        claims = {"iss": client_id, "sub": client_id, "aud": audience, "iat": now, "exp": now + 300,
                  "jti": jti or secrets.token_hex(8)}  # fmt: skip
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": "a1"})


ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
