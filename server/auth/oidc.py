"""`--auth oidc`: the team's identity provider issues JWT access tokens; this server only verifies them (signature
against the issuer's JWKS, `iss`, `aud`, `exp`) with PyJWT, and reads the lmtuner scopes from `scope`/`scp`."""

from __future__ import annotations

import logging
from typing import Any

import jwt
from mcp.server.auth.provider import AccessToken

from server.auth.fetch import FETCHER, FetchError
from server.auth.jwks import verify_jwt
from server.auth.scopes import ALL_SCOPES

logger = logging.getLogger(__name__)
MAX_DISCOVERY_BYTES = 64 * 1024
DISCOVERY_PATHS = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server")


class JwtVerifier:
    """The SDK's TokenVerifier for JWTs from `issuer`, meant for `audience` (default: the public /mcp URL). The
    issuer's discovery document and JWKS are fetched on the event loop through the bounded fetcher (a total
    deadline, a size cap, a cache): an identity provider that hangs refuses tokens, it does not hold threads."""

    def __init__(self, issuer: str, audience: str):
        self.issuer = issuer
        self.audience = audience

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            claims = await verify_jwt(
                token, await self._jwks_uri(), what="the issuer's JWKS", audience=self.audience,
                issuer=self.issuer, require=["exp", "iss", "aud"],
            )  # fmt: skip
        except (jwt.PyJWTError, FetchError, ValueError) as exc:
            logger.warning("refused a bearer token: %s", exc)
            return None
        scope = claims.get("scope", claims.get("scp", []))
        scopes = scope.split() if isinstance(scope, str) else [str(s) for s in scope]
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id") or claims.get("azp") or claims.get("sub") or "unknown"),
            scopes=[s for s in scopes if s in ALL_SCOPES],
            expires_at=int(claims["exp"]),
            resource=self.audience,
            subject=claims.get("sub"),
            claims={"iss": claims["iss"]},
        )

    async def _jwks_uri(self) -> str:
        """Found through the issuer's discovery document on first use (so the server starts while the IdP is down);
        cached like every fetched document."""
        problems = []
        for path in DISCOVERY_PATHS:
            url = self.issuer.rstrip("/") + path
            try:
                return await FETCHER.get_json(
                    url, kind="oidc-discovery", max_bytes=MAX_DISCOVERY_BYTES, what=url, parse=self._jwks_uri_in
                )
            except (FetchError, ValueError) as exc:
                problems.append(str(exc))
        raise ValueError("no jwks_uri in the issuer's metadata (" + "; ".join(problems) + ")")

    def _jwks_uri_in(self, document: Any) -> str:
        if not isinstance(document, dict) or not isinstance(document.get("jwks_uri"), str):
            raise ValueError("the document names no jwks_uri")
        if document.get("issuer") not in (None, self.issuer):
            raise ValueError(f"the document names issuer {document.get('issuer')}, not {self.issuer}")
        return document["jwks_uri"]
