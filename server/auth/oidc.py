"""`--auth oidc`: the team's identity provider issues JWT access tokens; this server only verifies them (signature
against the issuer's JWKS, `iss`, `aud`, `exp`) with PyJWT, and reads the lmtuner scopes from `scope`/`scp`."""

from __future__ import annotations

import logging
import threading

import anyio
import httpx2 as httpx
import jwt
from mcp.server.auth.provider import AccessToken

from server.auth.scopes import ALL_SCOPES

logger = logging.getLogger(__name__)
# Asymmetric algorithms only: an HMAC or 'none' token would be signed with something other than the JWKS.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
DISCOVERY_PATHS = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server")


class JwtVerifier:
    """The SDK's TokenVerifier for JWTs from `issuer`, meant for `audience` (default: the public /mcp URL)."""

    def __init__(self, issuer: str, audience: str):
        self.issuer = issuer
        self.audience = audience
        self._jwks: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()

    async def verify_token(self, token: str) -> AccessToken | None:
        return await anyio.to_thread.run_sync(self._verify, token)

    def _verify(self, token: str) -> AccessToken | None:
        try:
            key = self._jwks_client().get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except (jwt.PyJWTError, httpx.HTTPError, ValueError) as exc:
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

    def _jwks_client(self) -> jwt.PyJWKClient:
        """Found through the issuer's discovery document on first use (so the server starts while the IdP is down)."""
        with self._lock:
            if self._jwks is None:
                self._jwks = jwt.PyJWKClient(self._discover_jwks_uri(), cache_keys=True, lifespan=300)
            return self._jwks

    def _discover_jwks_uri(self) -> str:
        problems = []
        for path in DISCOVERY_PATHS:
            url = self.issuer.rstrip("/") + path
            try:
                response = httpx.get(url, timeout=10)
                if response.status_code == 200 and response.json().get("jwks_uri"):
                    document = response.json()
                    if document.get("issuer") not in (None, self.issuer):
                        raise ValueError(f"{url} names issuer {document.get('issuer')}, not {self.issuer}")
                    return document["jwks_uri"]
                problems.append(f"{url}: HTTP {response.status_code}")
            except (httpx.HTTPError, ValueError) as exc:
                problems.append(f"{url}: {exc}")
        raise ValueError("no jwks_uri in the issuer's metadata (" + "; ".join(problems) + ")")
