"""`--auth oauth`: lmtuner as its own OAuth 2.1 authorization server, one owner. The SDK's handlers do the protocol
(metadata, /authorize, /token with PKCE, /register, /revoke, bearer checks); this provider decides what they
store and look up. The owner approves each client on the consent page (server/auth/consent.py)."""

from __future__ import annotations

import time
import uuid

from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    RefreshToken,
    RegistrationError,
    TokenError,
)
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from pydantic import AnyHttpUrl, ValidationError

from server.auth.client_metadata import fetch_client_metadata, is_metadata_document_url
from server.auth.redirect_uris import redirect_uri_problem
from server.auth.scopes import ALL_SCOPES
from server.auth.store import AuthStore, new_secret

CODE_SECONDS = 300
CONSENT_SECONDS = 600
REFRESH_SECONDS = 30 * 86400
DEFAULT_ACCESS_TOKEN_SECONDS = 3600
# The refresh token rotated out last may be presented again this long after, by its client retrying a refresh
# whose answer it lost, without ending the grant (RFC 9700 §4.14.2 allows this leeway); after, or once a token
# issued after it has been used, presenting it again ends the grant.
REFRESH_RETRY_SECONDS = 60
# A metadata document is fetched again at /authorize when the stored copy is older than this.
METADATA_DOCUMENT_MAX_AGE_SECONDS = 3600


def same_resource(a: str | None, b: str) -> bool:
    """RFC 8707 resource comparison as the SDK's bearer check does it: as URLs, a trailing slash aside."""
    try:
        return str(AnyHttpUrl(a or "")).removesuffix("/") == str(AnyHttpUrl(b)).removesuffix("/")
    except ValidationError:
        return False


class GrantedCode(AuthorizationCode):
    grant_id: str


class GrantedRefreshToken(RefreshToken):
    grant_id: str


class OwnerAuthorizationServer:
    """OAuthAuthorizationServerProvider over AuthStore. `resource` is the public /mcp URL every token is bound to."""

    def __init__(self, store: AuthStore, *, issuer: str, resource: str, access_token_seconds: int):
        self.store = store
        self.issuer = issuer.rstrip("/")
        self.resource = resource
        self.access_token_seconds = access_token_seconds

    # clients

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        stored = self.store.client(client_id)
        return OAuthClientInformationFull.model_validate(stored[0]) if stored else None

    async def refresh_metadata_document(self, client_id: str) -> None:
        """Fetches a Client ID Metadata Document unless a fresh copy is stored; raises ClientMetadataError."""
        if not is_metadata_document_url(client_id):
            return
        stored = self.store.client(client_id)
        if (
            stored
            and stored[1] == "metadata_document"
            and time.time() - (stored[2] or 0) < METADATA_DOCUMENT_MAX_AGE_SECONDS
        ):
            return
        info = await fetch_client_metadata(client_id)
        OAuthClientInformationFull.model_validate(info)  # what the SDK will read back must parse
        self.store.save_client(client_id, info, "metadata_document")

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        for i, uri in enumerate(client_info.redirect_uris or []):
            problem = redirect_uri_problem(str(uri))
            if problem:
                raise RegistrationError("invalid_redirect_uri", f"redirect_uris[{i}] {str(uri)!r} {problem}")
        # The SDK compares client secrets in clear (ClientAuthenticator), so a confidential client's secret is
        # stored as issued; public clients (token_endpoint_auth_method 'none', what agents use) have none.
        self.store.save_client(
            client_info.client_id, client_info.model_dump(mode="json", exclude_none=True), "registered"
        )

    # authorization: the SDK has checked client, redirect_uri and scopes; the owner decides on the consent page

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        if params.resource is not None and not same_resource(params.resource, self.resource):
            raise AuthorizeError(
                "invalid_target", f"resource {params.resource} is not this server; use {self.resource}"
            )
        scopes = params.scopes or (client.scope.split() if client.scope else list(ALL_SCOPES))
        request_id = new_secret()
        self.store.put(
            request_id,
            kind="consent",
            client_id=client.client_id,
            grant_id=uuid.uuid4().hex,
            scopes=scopes,
            resource=self.resource,
            expires_at=time.time() + CONSENT_SECONDS,
            data={
                "state": params.state,
                "code_challenge": params.code_challenge,
                "redirect_uri": str(params.redirect_uri),
                "redirect_uri_provided_explicitly": params.redirect_uri_provided_explicitly,
            },
        )
        return f"{self.issuer}/consent?request={request_id}"

    def issue_code(self, request_id: str) -> tuple[str, dict] | None:
        """After the owner approved: (code, the consent request's data), the request spent; None when another
        submission of the same form spent it first."""
        consent = self.store.get(request_id, "consent")
        if consent is None or not self.store.delete(request_id):
            return None
        self.store.mark_approved(consent.client_id)
        code = new_secret()
        self.store.put(
            code,
            kind="code",
            client_id=consent.client_id,
            grant_id=consent.grant_id,
            scopes=consent.scopes,
            resource=consent.resource,
            expires_at=time.time() + CODE_SECONDS,
            data=consent.data,
        )
        return code, consent.data

    def _unspent(self, client: OAuthClientInformationFull, value: str, kind: str):
        """The stored code or refresh token if it is this client's and not used yet. One presented a second
        time was copied by someone who is not the client (a reused code, RFC 6749 §4.1.2; a rotated-out
        refresh token, RFC 9700 §4.14.2): everything issued from its grant ends. Except a retry: the refresh
        token rotated out last, presented again within REFRESH_RETRY_SECONDS while nothing issued after it has
        been used, is the same client that never got the answer (a timeout, two refreshes at once)."""
        stored = self.store.get(value, kind)
        if stored is None or stored.client_id != client.client_id:
            return None
        if stored.used:
            if kind == "refresh" and self._retry(stored):
                return stored
            self.store.revoke_grant(stored.grant_id)
            return None
        return stored

    def _retry(self, stored) -> bool:
        spent_at = stored.used_at or 0
        return time.time() - spent_at <= REFRESH_RETRY_SECONDS and not self.store.used_since(stored.grant_id, spent_at)

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> GrantedCode | None:
        stored = self._unspent(client, authorization_code, "code")
        if stored is None:
            return None
        return GrantedCode(
            code=authorization_code,
            scopes=stored.scopes,
            expires_at=stored.expires_at,
            client_id=stored.client_id,
            code_challenge=stored.data["code_challenge"],
            redirect_uri=stored.data["redirect_uri"],
            redirect_uri_provided_explicitly=stored.data["redirect_uri_provided_explicitly"],
            resource=stored.resource,
            grant_id=stored.grant_id,
        )

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: GrantedCode
    ) -> OAuthToken:
        if not self.store.mark_used(authorization_code.code):
            raise TokenError("invalid_grant", "authorization code was already used")
        return self._issue(
            client.client_id, authorization_code.grant_id, authorization_code.scopes, authorization_code.resource
        )

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> GrantedRefreshToken | None:
        stored = self._unspent(client, refresh_token, "refresh")
        if stored is None:
            return None
        return GrantedRefreshToken(
            token=refresh_token,
            client_id=stored.client_id,
            scopes=stored.scopes,
            expires_at=int(stored.expires_at),
            resource=stored.resource,
            grant_id=stored.grant_id,
        )

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: GrantedRefreshToken, scopes: list[str]
    ) -> OAuthToken:
        if self.store.mark_used(refresh_token.token):
            # rotation: the old access token ends too
            self.store.revoke_tokens_of_grant(refresh_token.grant_id, "access")
        else:  # a retry of the refresh that spent it (see _unspent): a second pair, the first left as it is
            stored = self.store.get(refresh_token.token, "refresh")
            if stored is None or not self._retry(stored):
                raise TokenError("invalid_grant", "refresh token was already used")
        return self._issue(client.client_id, refresh_token.grant_id, scopes, refresh_token.resource)

    def _issue(self, client_id: str, grant_id: str, scopes: list[str], resource: str | None) -> OAuthToken:
        access, refresh = new_secret(), new_secret()
        now = time.time()
        common = {"client_id": client_id, "grant_id": grant_id, "scopes": scopes, "resource": resource}
        self.store.put(access, kind="access", expires_at=now + self.access_token_seconds, **common)
        self.store.put(refresh, kind="refresh", expires_at=now + REFRESH_SECONDS, **common)
        return OAuthToken(
            access_token=access,
            token_type="Bearer",
            expires_in=self.access_token_seconds,
            scope=" ".join(scopes),
            refresh_token=refresh,
        )

    # bearer checks and revocation

    async def load_access_token(self, token: str) -> AccessToken | None:
        stored = self.store.get(token, "access")
        if stored is None:
            return None
        if not stored.used:  # its first use: the client has the pair it came with (see _retry)
            self.store.mark_used(token)
        # The SDK's bearer check refuses it when expired or when `resource` is not this server's URL.
        return AccessToken(
            token=token,
            client_id=stored.client_id,
            scopes=stored.scopes,
            expires_at=int(stored.expires_at),
            resource=stored.resource,
        )

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        for kind in ("access", "refresh"):
            stored = self.store.get(token.token, kind)
            if stored is not None:
                self.store.revoke_grant(stored.grant_id)
