"""Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document, used by the MCP authorization
spec and preferred by ChatGPT): a client's `client_id` is an https URL whose JSON document lists its name and
redirect URIs. The SDK (mcp 2.3) has no server side for them, so this module fetches and checks the document.

The server fetches a URL the caller names, so it guards against being used to reach the private network:
https only, and the host must not resolve to a loopback, private or link-local address. Tests serve documents
from 127.0.0.1; `LMTUNER_OAUTH_ALLOW_LOOPBACK_CLIENT_IDS=1` allows exactly that (http or https, loopback hosts
only) and nothing else."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from typing import Any
from urllib.parse import urlsplit

import anyio

from server.auth.fetch import FETCHER, TOTAL_SECONDS, FetchError
from server.auth.limits import client_field_problem
from server.auth.redirect_uris import redirect_uri_problem
from server.auth.scopes import ALL_SCOPES

LOOPBACK_FLAG = "LMTUNER_OAUTH_ALLOW_LOOPBACK_CLIENT_IDS"
MAX_DOCUMENT_BYTES = 64 * 1024


class ClientMetadataError(Exception):
    """Why a client_id URL cannot be used; the message is shown to whoever started the authorization."""


def is_metadata_document_url(client_id: str) -> bool:
    return client_id.startswith(("https://", "http://"))


def _loopback_allowed() -> bool:
    return os.environ.get(LOOPBACK_FLAG) == "1"


async def check_fetch_url(url: str) -> None:
    """Raises ClientMetadataError unless the server may fetch `url` (https, public host; see the module doc)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.username or parts.password or parts.fragment:
        raise ClientMetadataError(f"client_id {url}: must not contain credentials or a fragment")
    if parts.path in ("", "/"):
        raise ClientMetadataError(f"client_id {url}: a Client ID Metadata Document URL needs a path")
    addresses = await _resolve(host)
    all_loopback = bool(addresses) and all(address.is_loopback for address in addresses)
    if _loopback_allowed() and all_loopback:
        return  # test mode: a document served on this machine
    if parts.scheme != "https":
        raise ClientMetadataError(f"client_id {url}: Client ID Metadata Document URLs must use https")
    blocked = [a for a in addresses if not a.is_global]
    if blocked:
        raise ClientMetadataError(
            f"client_id {url}: the host resolves to a non-public address ({blocked[0]}); metadata documents are "
            "fetched only from public hosts"
        )


async def _resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        with anyio.fail_after(TOTAL_SECONDS):  # a name server that never answers holds no request longer
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise ClientMetadataError(f"host {host!r} did not resolve within {TOTAL_SECONDS:g} s") from None
    except OSError as exc:
        raise ClientMetadataError(f"client_id host {host!r} does not resolve ({exc.strerror or exc})") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def fetch_client_metadata(url: str) -> dict[str, Any]:
    """The client information (OAuthClientInformationFull fields) that the document at `url` describes. Fetched
    through the bounded fetcher (server/auth/fetch.py): a total deadline, a size cap, a cache, few at a time."""
    await check_fetch_url(url)
    try:
        return await FETCHER.get_json(
            url,
            kind="client-metadata",
            max_bytes=MAX_DOCUMENT_BYTES,
            what=f"client_id {url}",
            parse=lambda doc: client_info_from_document(url, doc),
        )
    except FetchError as exc:
        raise ClientMetadataError(str(exc)) from None


def client_info_from_document(url: str, document: Any) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise ClientMetadataError(f"client_id {url}: the document must be a JSON object")
    if document.get("client_id") != url:
        raise ClientMetadataError(f"client_id {url}: the document's client_id field must equal its URL exactly")
    redirect_uris = document.get("redirect_uris")
    if not isinstance(redirect_uris, list) or not redirect_uris or not all(isinstance(u, str) for u in redirect_uris):
        raise ClientMetadataError(f"client_id {url}: the document must list its redirect_uris")
    for i, uri in enumerate(redirect_uris):
        problem = redirect_uri_problem(uri)
        if problem:
            raise ClientMetadataError(f"client_id {url}: the document's redirect_uris[{i}] {uri!r} {problem}")
    problem = client_field_problem(document)
    if problem:
        raise ClientMetadataError(f"client_id {url}: the document's {problem}")
    method = document.get("token_endpoint_auth_method", "none")
    jwks_uri = document.get("jwks_uri")
    if method == "private_key_jwt":
        # ChatGPT's document declares this: it signs an RFC 7523 client assertion with a key at its jwks_uri.
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).hostname != urlsplit(url).hostname:
            raise ClientMetadataError(
                f"client_id {url}: private_key_jwt needs a jwks_uri on the document's own host (got {jwks_uri!r})"
            )
    elif method == "none":
        jwks_uri = None
    else:  # a published document cannot carry a shared secret
        raise ClientMetadataError(
            f"client_id {url}: token_endpoint_auth_method {method!r} is not supported; use 'none' or 'private_key_jwt'"
        )
    scope = document.get("scope")
    return {
        "client_id": url,
        "redirect_uris": redirect_uris,
        "client_name": document.get("client_name"),
        "client_uri": document.get("client_uri"),
        "logo_uri": document.get("logo_uri"),
        "scope": scope if isinstance(scope, str) and scope else " ".join(ALL_SCOPES),
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        # The SDK's client check knows no private_key_jwt: it sees 'none', and server/auth/client_assertion.py
        # requires the assertion of every client that has a jwks_uri before the SDK's token handler runs.
        "token_endpoint_auth_method": "none",
        "jwks_uri": jwks_uri,
    }
