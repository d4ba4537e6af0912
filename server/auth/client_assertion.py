"""RFC 7523 client assertions (`private_key_jwt`) for Client ID Metadata Document clients that publish keys, as
ChatGPT's document does. mcp 2.3's token and revocation handlers know only client secrets and 'none', so the
assertion is checked here, before them; PyJWT verifies the signature against the client's jwks_uri, fetched on the
event loop through the bounded fetcher (server/auth/jwks.py), never in a worker thread."""

from __future__ import annotations

from urllib.parse import urlencode

import jwt
from starlette.requests import Request

from server.auth.client_metadata import ClientMetadataError, check_fetch_url
from server.auth.fetch import FetchError
from server.auth.jwks import verify_jwt
from server.auth.store import AuthStore

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class ClientAssertionError(Exception):
    """Why a client did not authenticate; sent back as `invalid_client`."""


def asserted_client_id(form: dict[str, str]) -> str | None:
    """The client an assertion names (unverified; it is verified against that client's keys afterwards)."""
    assertion = form.get("client_assertion")
    if not assertion:
        return None
    try:
        return str(jwt.decode(assertion, options={"verify_signature": False}).get("sub") or "") or None
    except jwt.PyJWTError:
        return None


async def verify_client_assertion(
    store: AuthStore, client_id: str, jwks_uri: str, form: dict[str, str], audiences: list[str]
) -> None:
    """Raises ClientAssertionError unless `form` carries a fresh assertion signed by a key at `jwks_uri`, with
    iss = sub = client_id and an audience among `audiences` (the token endpoint or the issuer)."""
    assertion = form.get("client_assertion")
    if form.get("client_assertion_type") != ASSERTION_TYPE or not assertion:
        raise ClientAssertionError(
            f"client {client_id} publishes keys (private_key_jwt): send client_assertion_type={ASSERTION_TYPE} "
            "and a signed client_assertion"
        )
    try:
        await check_fetch_url(jwks_uri)
        claims = await verify_jwt(
            assertion, jwks_uri, what=f"client {client_id}'s jwks_uri {jwks_uri}",
            audience=audiences, issuer=client_id, require=["exp", "iss", "sub", "aud"],
        )  # fmt: skip
    except (ClientMetadataError, FetchError) as exc:
        raise ClientAssertionError(str(exc)) from None
    except jwt.PyJWTError as exc:
        raise ClientAssertionError(f"client_assertion refused: {exc}") from None
    if claims["sub"] != client_id:
        raise ClientAssertionError("client_assertion refused: sub must be the client_id")
    jti = claims.get("jti")
    if jti:  # single use (RFC 7523 §3, item 7): remembered until the assertion expires
        marker = f"{client_id} {jti}"
        if store.get(marker, "assertion") is not None:
            raise ClientAssertionError("client_assertion was already used (same jti)")
        store.put(marker, kind="assertion", client_id=client_id, grant_id="", scopes=[], resource=None,
                  expires_at=float(claims["exp"]))  # fmt: skip


def with_form(request: Request, form: dict[str, str]) -> Request:
    """The same request with `form` as its body (to add the client_id an assertion-only request leaves out)."""
    return with_body(request, urlencode(form).encode(), b"application/x-www-form-urlencoded")


def with_body(request: Request, body: bytes, content_type: bytes | None = None) -> Request:
    """The same request with `body` (already read) as its body, and `content_type` when given."""
    dropped = (b"content-length", b"content-type") if content_type else (b"content-length",)
    headers = [(k, v) for k, v in request.scope["headers"] if k not in dropped]
    headers += [(b"content-type", content_type)] if content_type else []
    headers += [(b"content-length", str(len(body)).encode())]
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({**request.scope, "headers": headers}, receive)
