"""Wires `--auth oauth` and `--auth oidc` into the SDK: the AuthSettings and provider/verifier the MCPServer takes,
plus the few routes that replace or add to the SDK's (each says why)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mcp.server.auth.handlers.authorize import AuthorizationHandler
from mcp.server.auth.handlers.metadata import MetadataHandler, ProtectedResourceMetadataHandler
from mcp.server.auth.handlers.register import RegistrationHandler
from mcp.server.auth.handlers.token import TokenHandler
from mcp.server.auth.middleware.client_auth import AuthenticationError, ClientAuthenticator
from mcp.server.auth.routes import build_metadata, cors_middleware
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE, RequestBodyLimitMiddleware
from mcp.shared.auth import ProtectedResourceMetadata
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response

from lmtuner_core.errors import LmtunerError
from server.auth.client_assertion import (
    ClientAssertionError,
    asserted_client_id,
    verify_client_assertion,
    with_body,
    with_form,
)
from server.auth.client_metadata import ClientMetadataError
from server.auth.consent import ConsentPage
from server.auth.jwks import ALGORITHMS
from server.auth.limits import (
    MAX_NAME_CHARS,
    MAX_REDIRECT_URIS,
    MAX_REGISTRATION_BYTES,
    REGISTRATION_WINDOW_SECONDS,
    REGISTRATIONS_GLOBAL,
    REGISTRATIONS_PER_ADDRESS,
    UNAPPROVED_CLIENT_SECONDS,
    SlidingWindow,
    address_key,
    client_field_problem,
)
from server.auth.oauth import OwnerAuthorizationServer
from server.auth.oidc import JwtVerifier
from server.auth.scopes import ALL_SCOPES, enforce_scopes
from server.auth.store import AuthStore
from server.http import is_loopback

MCP_PATH = "/mcp"
AUTH_METHODS = ["none", "private_key_jwt", "client_secret_post", "client_secret_basic"]


@dataclass
class AuthSetup:
    """What `build_server` passes to MCPServer, and routes that go before the SDK's."""

    server_options: dict[str, Any]
    public_url: str
    routes: list[Route] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server_options["middleware"] = [enforce_scopes]


def check_public_url(url: str | None, option: str = "--public-url") -> str:
    """The public https URL of /mcp, as agents reach it (through a reverse proxy or tunnel)."""
    if not url:
        raise LmtunerError(
            f"{option} is required with --auth oauth/oidc: the https URL agents use to reach /mcp, e.g. "
            "https://lmtuner.example.com/mcp (http is accepted only for localhost)",
            field=option,
        )
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise LmtunerError(f"{option} {url}: not an http(s) URL; e.g. https://lmtuner.example.com/mcp", field=option)
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise LmtunerError(
            f"{option} {url}: must be https (tokens travel in it); put the server behind a TLS reverse proxy or tunnel",
            field=option,
        )
    if parts.path.rstrip("/") != MCP_PATH or parts.query or parts.fragment:
        raise LmtunerError(
            f"{option} {url}: the path must be {MCP_PATH} (the proxy forwards the whole host to the server), "
            f"e.g. {parts.scheme}://{parts.netloc}{MCP_PATH}",
            field=option,
        )
    return f"{parts.scheme}://{parts.netloc}{MCP_PATH}"


def _limited(app: Any) -> Any:
    """The SDK's request-body limit, as on the SDK's own OAuth routes these replace."""
    return RequestBodyLimitMiddleware(app, DEFAULT_MAX_REQUEST_BODY_SIZE)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _resource_metadata_routes(public_url: str, authorization_server: str) -> list[Route]:
    # The SDK publishes `scopes_supported` from required_scopes (none here: scopes are per tool) and only at the
    # path-suffixed URL; clients that probe the root variant (RFC 9728 §3) find it too.
    metadata = ProtectedResourceMetadata(
        resource=public_url,
        authorization_servers=[authorization_server],
        scopes_supported=ALL_SCOPES,
        resource_name="lmtuner",
    )
    endpoint = cors_middleware(ProtectedResourceMetadataHandler(metadata).handle, ["GET", "OPTIONS"])
    return [
        Route(path, endpoint=endpoint, methods=["GET", "OPTIONS"])
        for path in ("/.well-known/oauth-protected-resource" + MCP_PATH, "/.well-known/oauth-protected-resource")
    ]


def oauth_setup(public_url: str, owner_token: str, home: Path, access_token_seconds: int) -> AuthSetup:
    issuer = _origin(public_url)
    settings = AuthSettings(
        issuer_url=issuer,
        resource_server_url=public_url,
        client_registration_options=ClientRegistrationOptions(
            enabled=True, valid_scopes=ALL_SCOPES, default_scopes=ALL_SCOPES
        ),
        revocation_options=RevocationOptions(enabled=True),
        validate_token_resource=True,  # audience binding: a token issued for another resource is refused
    )
    store = AuthStore(home / "oauth.db")
    store.purge_expired()
    provider = OwnerAuthorizationServer(
        store, issuer=issuer, resource=public_url, access_token_seconds=access_token_seconds
    )
    # mcp 2.3 gaps: its metadata lists only the client-secret methods at the token and revocation endpoints,
    # although /register accepts 'none' (public clients, which agents are), and says nothing of Client ID
    # Metadata Documents, which ChatGPT uses when `client_id_metadata_document_supported` is advertised (and
    # whose document declares private_key_jwt, checked by client_assertion_checked below).
    metadata = build_metadata(
        settings.issuer_url, None, settings.client_registration_options, settings.revocation_options
    ).model_copy(
        update={
            "token_endpoint_auth_methods_supported": AUTH_METHODS,
            "token_endpoint_auth_signing_alg_values_supported": ALGORITHMS,
            "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
            "client_id_metadata_document_supported": True,
            "authorization_response_iss_parameter_supported": True,  # the consent page's redirects carry `iss`
        }
    )
    sdk_authorize = AuthorizationHandler(provider)

    async def authorize(request: Request) -> Response:
        # Fetch (or refresh) a Client ID Metadata Document first, so the SDK's handler finds the client, and a
        # document that cannot be used is reported as such rather than as an unknown client.
        params = request.query_params if request.method == "GET" else await request.form()
        client_id = str(params.get("client_id") or "")
        try:
            await provider.refresh_metadata_document(client_id)
        except ClientMetadataError as exc:
            return JSONResponse(
                {"error": "invalid_client", "error_description": str(exc)},
                status_code=400,
                headers={"Cache-Control": "no-store"},
            )
        return await sdk_authorize.handle(request)

    authenticator = ClientAuthenticator(provider)
    sdk_token = TokenHandler(provider, authenticator)
    token_url = f"{issuer}/token"

    async def client_assertion_checked(request: Request) -> tuple[Request, Response | None]:
        """(the request, with client_id filled in from an assertion; or a 401 when a key-holding client's
        assertion is missing or wrong). Clients without published keys pass through to the SDK unchanged."""
        form = {key: str(value) for key, value in (await request.form()).items()}
        client_id = form.get("client_id") or asserted_client_id(form)
        stored = store.client(client_id) if client_id else None
        jwks_uri = stored[0].get("jwks_uri") if stored and stored[1] == "metadata_document" else None
        if jwks_uri:
            try:
                await verify_client_assertion(store, client_id, jwks_uri, form, [token_url, issuer])
            except ClientAssertionError as exc:
                return request, JSONResponse(
                    {"error": "invalid_client", "error_description": str(exc)},
                    status_code=401,
                    headers={"Cache-Control": "no-store"},
                )
        if client_id and "client_id" not in form:
            return with_form(request, {**form, "client_id": client_id}), None
        return request, None

    async def token(request: Request) -> Response:
        request, refusal = await client_assertion_checked(request)
        return refusal or await sdk_token.handle(request)

    async def revoke(request: Request) -> Response:
        # mcp 2.3's RevocationHandler declares `client_secret` without a default, so a public client (which has no
        # secret, as agents are) gets 400 for an RFC 7009 request; same steps otherwise, with the SDK's parts.
        request, refusal = await client_assertion_checked(request)
        if refusal:
            return refusal
        try:
            client = await authenticator.authenticate_request(request)
        except AuthenticationError as exc:
            return JSONResponse({"error": "invalid_client", "error_description": exc.message}, status_code=401)
        token = str((await request.form()).get("token") or "")
        if not token:
            return JSONResponse({"error": "invalid_request", "error_description": "token is required"}, status_code=400)
        found = await provider.load_access_token(token) or await provider.load_refresh_token(client, token)
        if found is not None and found.client_id == client.client_id:
            await provider.revoke_token(found)
        return Response(status_code=200, headers={"Cache-Control": "no-store"})

    sdk_register = RegistrationHandler(provider, settings.client_registration_options)
    per_address = SlidingWindow(REGISTRATIONS_PER_ADDRESS, REGISTRATION_WINDOW_SECONDS)
    everyone = SlidingWindow(REGISTRATIONS_GLOBAL, REGISTRATION_WINDOW_SECONDS)

    async def register(request: Request) -> Response:
        # mcp 2.3's RegistrationHandler stores whatever fits in 4 MB, as often as asked: registration is open to
        # anyone, so the size of every field, the rate per address and in all, and the age of clients the owner
        # never approved are bounded here before it runs.
        store.purge_unapproved(UNAPPROVED_CLIENT_SECONDS)  # on every request, refused or not
        address = address_key(request.client.host if request.client else None)
        for window, whose in ((per_address, address), (everyone, "")):
            wait = window.retry_after(whose)
            if wait:
                scope = f"from {address}" if whose else "in all"
                return _registration_error(
                    f"too many registrations {scope} ({window.max_events} per {REGISTRATION_WINDOW_SECONDS // 60} "
                    f"minutes); try again in {wait} s",
                    429, {"Retry-After": str(wait)},
                )  # fmt: skip
        per_address.record(address)
        everyone.record("")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REGISTRATION_BYTES:
                return _registration_error(
                    f"the registration request is over {MAX_REGISTRATION_BYTES} bytes; send the client's metadata "
                    f"only (client_name at most {MAX_NAME_CHARS} characters, at most {MAX_REDIRECT_URIS} "
                    "redirect_uris)",
                    413,
                )
        try:
            fields = json.loads(body)
        except ValueError:
            fields = None  # the SDK's handler answers invalid JSON
        problem = client_field_problem(fields) if isinstance(fields, dict) else None
        if problem:
            return _registration_error(problem, 400)
        return await sdk_register.handle(with_body(request, bytes(body)))

    consent = ConsentPage(provider, owner_token)
    routes = [
        Route(
            "/.well-known/oauth-authorization-server",
            endpoint=cors_middleware(MetadataHandler(metadata).handle, ["GET", "OPTIONS"]),
            methods=["GET", "OPTIONS"],
        ),
        *_resource_metadata_routes(public_url, issuer),
        Route("/authorize", endpoint=_limited(request_response(authorize)), methods=["GET", "POST"]),
        Route("/token", endpoint=_limited(cors_middleware(token, ["POST", "OPTIONS"])), methods=["POST", "OPTIONS"]),
        Route("/revoke", endpoint=_limited(cors_middleware(revoke, ["POST", "OPTIONS"])), methods=["POST", "OPTIONS"]),
        Route("/consent", endpoint=_limited(request_response(consent.handle)), methods=["GET", "POST"]),
        Route("/register", endpoint=cors_middleware(register, ["POST", "OPTIONS"]), methods=["POST", "OPTIONS"]),
    ]
    return AuthSetup({"auth": settings, "auth_server_provider": provider}, public_url, routes)


def _registration_error(description: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": "invalid_client_metadata", "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def oidc_setup(public_url: str, issuer: str | None, audience: str | None) -> AuthSetup:
    if not issuer:
        raise LmtunerError(
            "--issuer is required with --auth oidc: your identity provider's issuer URL", field="--issuer"
        )
    parts = urlsplit(issuer)
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or (parts.scheme == "http" and not is_loopback(parts.hostname))
    ):
        raise LmtunerError(f"--issuer {issuer}: must be an https URL (http only for localhost)", field="--issuer")
    settings = AuthSettings(
        issuer_url=issuer,
        resource_server_url=public_url,
        validate_token_resource=False,  # JwtVerifier checks `aud` itself (it may differ from the URL)
    )
    verifier = JwtVerifier(issuer, audience or public_url)
    return AuthSetup(
        {"auth": settings, "token_verifier": verifier}, public_url, _resource_metadata_routes(public_url, issuer)
    )
