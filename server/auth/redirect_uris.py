"""The one rule for redirect URIs, used wherever a client names one: registration (RFC 7591), a Client ID Metadata
Document's list, and the consent page before it sends the owner's browser anywhere. OAuth 2.1 §2.3.1 / RFC 8252:
https, or http back to this machine (native and test clients); a host; no userinfo (`https://claude.ai:443@evil.
example/cb` goes to evil.example, whatever it looks like); no fragment (RFC 6749 §3.1.2). Anything else
(`javascript:`, `data:`, `file:`, `vbscript:`, custom schemes) is refused: the approval answers 303 to it."""

from __future__ import annotations

from urllib.parse import urlsplit

from server.auth.limits import MAX_URI_CHARS
from server.http import is_loopback


def redirect_uri_problem(uri: str) -> str | None:
    """Why `uri` may not be a redirect URI (a sentence naming what is accepted), or None when it may."""
    if len(uri) > MAX_URI_CHARS:
        return f"is longer than {MAX_URI_CHARS} characters"
    if any(ord(c) < 0x21 or 0x7F <= ord(c) <= 0x9F for c in uri):
        return "contains spaces or control characters"
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("https", "http"):
        scheme = f"{parts.scheme}:" if parts.scheme else "(none)"
        return f"uses the scheme {scheme}; only https (or http to a loopback host) is accepted"
    if "@" in parts.netloc:
        return "contains userinfo (user@host); give the host alone, e.g. https://app.example/callback"
    if not host:
        return "has no host"
    if parts.scheme == "http" and not is_loopback(host):
        return "must use https (http is accepted only for a loopback host: 127.0.0.1, ::1, localhost)"
    if parts.fragment or uri.endswith("#"):
        return "must not contain a fragment (#…)"
    return None
