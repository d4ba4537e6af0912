"""Streamable HTTP for remote and IDE agents: bearer-token auth in front of the SDK's /mcp app.

The SDK's transport security checks Host and Origin (DNS rebinding); this module adds the token check, which
the MCP spec leaves to the server, and refuses to listen beyond loopback without a token. `--auth oauth|oidc`
replaces the token check with the SDK's OAuth machinery (server/auth).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from lmtuner_core.errors import LmtunerError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str | None:
    """The bearer token from --token-file, else $LMTUNER_TOKEN; None when neither is set."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise LmtunerError(f"--token-file: cannot read {token_file} ({exc.strerror})") from None
        if not token:
            raise LmtunerError(f"--token-file: {token_file} is empty")
        return token
    return os.environ.get("LMTUNER_TOKEN") or None


class BearerAuth:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>`."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        if scheme.lower() != b"bearer" or not value:
            await _reject(send, 401, "missing bearer token: send 'Authorization: Bearer <token>'")
            return
        if not hmac.compare_digest(value.strip(), self.token):
            await _reject(send, 401, "invalid bearer token")
            return
        await self.app(scope, receive, send)


async def _reject(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="lmtuner"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def generated_token(home: Path) -> str:
    """A fresh random token in $LMTUNER_HOME/http-token (mode 0600), for loopback use without a configured one."""
    token = secrets.token_urlsafe(32)
    path = home / "http-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def build_http_app(
    server: MCPServer,
    *,
    host: str,
    port: int,
    token: str | None,
    public_url: str | None = None,
    auth_routes: list[Any] | None = None,
) -> Any:
    """The ASGI app: SDK Streamable HTTP at /mcp, Host/Origin checked; with `token`, that bearer token is
    required, else the server's own OAuth/OIDC auth (server/auth), whose `auth_routes` take precedence."""
    app = server.streamable_http_app(transport_security=_security(host, port, public_url), host=host)
    if token is not None:
        return BearerAuth(app, token)
    app.router.routes[0:0] = auth_routes or []
    return app


def _security(host: str, port: int, public_url: str | None = None) -> TransportSecuritySettings:
    names = ["127.0.0.1", "localhost", "[::1]"] + ([] if is_loopback(host) else [host])
    hosts = [f"{name}:{port}" for name in names]
    origins = [f"http://{name}:{port}" for name in names]
    if public_url:  # behind a reverse proxy or tunnel, requests carry the public host name
        public = urlsplit(public_url)
        hosts.append(public.netloc)
        origins.append(f"{public.scheme}://{public.netloc}")
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def resolve_token(host: str, token: str | None, home: Path) -> tuple[str, bool]:
    """(token, generated). Beyond loopback a configured token is mandatory; on loopback one is generated."""
    if token is None and not is_loopback(host):
        raise LmtunerError(
            f"--host {host} is not a loopback address; set LMTUNER_TOKEN or --token-file so that only holders of "
            "the token can start jobs on this machine"
        )
    if token is not None:
        return token, False
    return generated_token(home), True


# On SIGTERM, requests still open this long afterwards (a long-poll, an SSE stream, a hung client) are cancelled.
GRACEFUL_SHUTDOWN_SECONDS = 2.0
# And the process ends this long after SIGTERM whatever is left: a worker thread blocked in a tool or a name
# lookup cannot be cancelled, and asyncio would wait for it at exit. Jobs run in their own processes and go on.
EXIT_DEADLINE_SECONDS = 4.0


def serve_http(server: MCPServer, *, host: str, port: int, token: str | None, **auth: Any) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            _exit_after(EXIT_DEADLINE_SECONDS)
            await super().shutdown(sockets)

    app = build_http_app(server, host=host, port=port, token=token, **auth)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS
    )
    Server(config).run()


def _exit_after(seconds: float) -> None:
    def exit_now() -> None:
        busy = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
        logging.getLogger(__name__).warning(
            "still running %g s after the stop signal (threads: %s); exiting now", seconds, ", ".join(busy) or "none"
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(0)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()
