"""The consent page of `--auth oauth`: /authorize sends the owner's browser here; the page names the client, where
it will be sent back and the scopes asked for, and the owner approves by typing the server's owner token (the
bearer token of `--auth token`) into the field `owner_token`, or denies. The SDK leaves this page to the server."""

from __future__ import annotations

import hmac
import html
import time
from collections import deque
from urllib.parse import urlsplit

from mcp.server.auth.provider import construct_redirect_uri
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from server.auth.oauth import CONSENT_SECONDS, OwnerAuthorizationServer
from server.auth.scopes import SCOPE_DESCRIPTIONS

# No library we depend on limits attempts at a form field; this is a sliding window over recent failures.
# It is global, not per address: behind a reverse proxy every request comes from the proxy, and there is one
# owner token to guess.
MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 300

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",  # no clickjacking of the approve button
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' https: http:; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class FailureLimiter:
    """Counts wrong owner tokens; while MAX_FAILURES lie within the window, every attempt is refused."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_seconds: float = FAILURE_WINDOW_SECONDS):
        self.max_failures = max_failures
        self.window = window_seconds
        self.failures: deque[float] = deque()

    def retry_after(self) -> int:
        """Seconds until an attempt is allowed again (0 when allowed now)."""
        now = time.monotonic()
        while self.failures and self.failures[0] <= now - self.window:
            self.failures.popleft()
        if len(self.failures) < self.max_failures:
            return 0
        return max(1, int(self.failures[0] + self.window - now) + 1)

    def fail(self) -> int:
        """Records a failure; returns how many attempts are left in the window."""
        self.failures.append(time.monotonic())
        return max(0, self.max_failures - len(self.failures))


class ConsentPage:
    def __init__(self, provider: OwnerAuthorizationServer, owner_token: str, limiter: FailureLimiter | None = None):
        self.provider = provider
        self.owner_token = owner_token.encode()
        self.limiter = limiter or FailureLimiter()

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
        if form.get("decision") == "deny":
            self.provider.store.delete(request_id)
            target = construct_redirect_uri(
                data["redirect_uri"], error="access_denied", error_description="the owner denied access",
                state=data["state"], iss=self.provider.issuer,
            )  # fmt: skip
            return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        wait = self.limiter.retry_after()
        if wait:
            return self._page(request_id, status=429, headers={"Retry-After": str(wait)},
                              error=f"Too many wrong owner tokens. Try again in {wait} s.")  # fmt: skip
        given = str(form.get("owner_token", "")).strip().encode()
        if not hmac.compare_digest(given, self.owner_token):
            left = self.limiter.fail()
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
        name = info.get("client_name") or consent.client_id
        redirect_host = urlsplit(consent.data["redirect_uri"]).netloc
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
<p>Client: <code id="client-id">{e(consent.client_id)}</code><br>
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


def _expired() -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><title>Request expired</title><p>This authorization request is unknown or has expired "
        f"(requests last {CONSENT_SECONDS // 60} minutes). Start connecting again from your agent.</p>",
        status_code=400,
        headers=PAGE_HEADERS,
    )
