"""JWT signatures checked against a JWKS fetched through the bounded fetcher (server/auth/fetch.py): PyJWT does
the verifying; its own PyJWKClient is not used because it fetches with urllib in the calling thread, with a
per-read timeout and no size cap (a JWKS served a byte a second held a worker thread each, forever)."""

from __future__ import annotations

from typing import Any

import jwt

from server.auth.fetch import FETCHER

# Asymmetric algorithms only: an HMAC or 'none' token would be signed with something other than the JWKS.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
MAX_JWKS_BYTES = 64 * 1024
# A token naming a key the cached set lacks fetches the set again, at most this often (keys rotate).
REFETCH_AFTER_SECONDS = 60


def _key_set(document: Any) -> jwt.PyJWKSet:
    if not isinstance(document, dict):
        raise jwt.PyJWKSetError("the JWKS must be a JSON object with 'keys'")
    return jwt.PyJWKSet.from_dict(document)


async def signing_key(token: str, jwks_uri: str, what: str) -> jwt.PyJWK:
    """The key of the set at `jwks_uri` that `token`'s header names (its `kid`, or the set's only signing key)."""
    header = jwt.get_unverified_header(token)
    if header.get("alg") not in ALGORITHMS:
        raise jwt.InvalidAlgorithmError(
            f"alg {header.get('alg')!r} is not accepted; use one of {', '.join(ALGORITHMS)}"
        )
    kid = header.get("kid")
    for attempt in range(2):
        key_set = await FETCHER.get_json(jwks_uri, kind="jwks", max_bytes=MAX_JWKS_BYTES, what=what, parse=_key_set)
        keys = [k for k in key_set.keys if k.public_key_use in (None, "sig")]
        found = [k for k in keys if k.key_id == kid] if kid else keys
        if len(found) == 1 or (found and kid):
            return found[0]
        if attempt == 0 and not (kid and FETCHER.forget("jwks", jwks_uri, REFETCH_AFTER_SECONDS)):
            break
    raise jwt.PyJWKClientError(
        f"no signing key {'with kid ' + repr(kid) if kid else '(the token names no kid and the set has several)'} "
        f"at {what}"
    )


async def verify_jwt(token: str, jwks_uri: str, *, what: str, **options: Any) -> dict[str, Any]:
    """The token's claims once its signature, `exp` and the `audience`/`issuer`/`require` given are checked."""
    key = await signing_key(token, jwks_uri, what)
    require = options.pop("require", [])
    return jwt.decode(token, key.key, algorithms=ALGORITHMS, options={"require": require}, **options)
