"""The consent page of `--auth oauth`: /authorize sends the owner's browser here; the page names the client, where
it will be sent back and the scopes asked for, and the owner approves by typing the server's owner token (the
bearer token of `--auth token`) into the field `owner_token`, or denies. The SDK leaves this page to the server."""

from __future__ import annotations

import hmac
import html
import logging
import time
from urllib.parse import urlsplit

from mcp.server.auth.provider import construct_redirect_uri
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from server.auth.limits import SlidingWindow, address_key
from server.auth.oauth import CONSENT_SECONDS, OwnerAuthorizationServer
from server.auth.redirect_uris import redirect_uri_problem
from server.auth.scopes import SCOPE_DESCRIPTIONS
from server.text import printable

# Wrong owner tokens lock out the address that sent them, not the page: anyone can open a consent request, so a
# page-wide lock let anyone lock the owner out. An address is what uvicorn reports: behind a reverse proxy on this
# machine, the client's address from X-Forwarded-For (uvicorn trusts it from 127.0.0.1 only); IPv6 by its /64.
MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 300

logger = logging.getLogger("lmtuner.auth")

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",  # no clickjacking of the approve button
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' https: http:; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class ConsentPage:
    def __init__(self, provider: OwnerAuthorizationServer, owner_token: str):
        self.provider = provider
        self.owner_token = owner_token.encode()
        self.failures = SlidingWindow(MAX_FAILURES, FAILURE_WINDOW_SECONDS)

    async def handle(self, request: Request) -> Response:
        if request.method == "GET":
            request_id = request.query_params.get("request", "")
            return self._page(request_id, status=200) if self._pending(request_id) else _expired()
        form = await request.form()
        request_id = str(form.get("request", ""))
        consent = self._pending(request_id)
        if consent is None:
            return _expired()
        data = consent.data
        problem = redirect_uri_problem(data["redirect_uri"])
        if problem:  # registered before this rule, or stored by hand: never send the browser there, either answer
            return _expired(f"The client's redirect URI {data['redirect_uri']!r} {problem}; it cannot be approved.")
        if form.get("decision") == "deny":
            self.provider.store.delete(request_id)
            target = construct_redirect_uri(
                data["redirect_uri"], error="access_denied", error_description="the owner denied access",
                state=data["state"], iss=self.provider.issuer,
            )  # fmt: skip
            return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        address = address_key(request.client.host if request.client else None)
        wait = self.failures.retry_after(address)
        if wait:
            error = f"Too many wrong owner tokens from this address. Try again in {wait} s."
            return self._page(request_id, status=429, headers={"Retry-After": str(wait)}, error=error)
        given = str(form.get("owner_token", "")).strip().encode()
        if not hmac.compare_digest(given, self.owner_token):
            left = self.failures.record(address)
            if not left:
                logger.warning(
                    "consent: %d wrong owner tokens from %s (last for client %s) within %d s; that address is refused "
                    "for %d s. If this was not you, someone who can reach this server is guessing the owner token.",
                    MAX_FAILURES, address, printable(consent.client_id), FAILURE_WINDOW_SECONDS,
                    FAILURE_WINDOW_SECONDS,
                )  # fmt: skip
            return self._page(request_id, status=401, error=f"Wrong owner token ({left} attempts left).")
        issued = self.provider.issue_code(request_id)
        if issued is None:
            return _expired()
        code, data = issued
        target = construct_redirect_uri(data["redirect_uri"], code=code, state=data["state"], iss=self.provider.issuer)
        return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})

    def _pending(self, request_id: str):
        consent = self.provider.store.get(request_id, "consent") if request_id else None
        return consent if consent is not None and consent.expires_at > time.time() else None

    def _page(self, request_id: str, *, status: int, error: str = "", headers: dict | None = None) -> HTMLResponse:
        consent = self.provider.store.get(request_id, "consent")
        assert consent is not None
        stored = self.provider.store.client(consent.client_id)
        info = stored[0] if stored else {}
        name = printable(info.get("client_name") or consent.client_id)
        redirect_host = printable(urlsplit(consent.data["redirect_uri"]).netloc)
        scopes = "".join(
            f"<li><code>{html.escape(s)}</code>: {html.escape(SCOPE_DESCRIPTIONS.get(s, ''))}</li>"
            for s in consent.scopes
        )
        e = html.escape
        body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Allow {e(name)} to use lmtuner?</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;line-height:1.5}}
.error{{color:#b00020;font-weight:600}} input[type=password]{{width:100%;padding:.5rem;font-size:1rem}}
button{{padding:.5rem 1.2rem;font-size:1rem;margin-right:.5rem}} code{{background:#eee;padding:0 .2rem}}</style>
</head><body>
<h1>Allow <span id="client-name">{e(name)}</span> to use lmtuner?</h1>
<p>Client: <code id="client-id">{e(printable(consent.client_id))}</code><br>
It will be sent back to <strong id="redirect-host">{e(redirect_host)}</strong>.</p>
<p>It asks for:</p><ul id="scopes">{scopes}</ul>
<p>Only approve a connection you started yourself. Enter this server's owner token (<code>LMTUNER_TOKEN</code>,
the <code>--token-file</code>, or <code>$LMTUNER_HOME/http-token</code>) to approve.</p>
{f'<p class="error" id="error" role="alert">{e(error)}</p>' if error else ""}
<form method="post" action="consent">
<input type="hidden" name="request" value="{e(request_id)}">
<label for="owner_token">Owner token</label>
<input type="password" id="owner_token" name="owner_token" autocomplete="current-password" autofocus>
<p><button type="submit" name="decision" value="approve" id="approve">Approve</button>
<button type="submit" name="decision" value="deny" id="deny" formnovalidate>Deny</button></p>
</form></body></html>"""
        return HTMLResponse(body, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def _expired(reason: str = "") -> HTMLResponse:
    text = reason or (
        f"This authorization request is unknown or has expired (requests last {CONSENT_SECONDS // 60} minutes). "
        "Start connecting again from your agent."
    )
    return HTMLResponse(
        f"<!doctype html><title>Request refused</title><p>{html.escape(printable(text))}</p>",
        status_code=400,
        headers=PAGE_HEADERS,
    )
