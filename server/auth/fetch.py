"""Every document the OAuth and OIDC modes fetch from a URL (a Client ID Metadata Document, a client's JWKS, an
identity provider's discovery document and JWKS) goes through `FETCHER.get_json`. Those URLs are named, and their
servers run, by whoever is calling, before anyone has logged in, so each fetch is bounded on every axis:

- a total deadline (resolve, connect, headers and body together), not a per-read timeout that a server sending a
  byte a second never trips;
- a size cap, read as a stream and abandoned at the cap (a declared Content-Length over the cap is refused unread);
- a cache: a document is fetched once per CACHE_SECONDS, a failure remembered for FAILURE_CACHE_SECONDS, and
  requests for a URL being fetched wait for that one fetch;
- a bound on fetches in flight, in all and per host: when full, the caller is refused at once, never queued.

It runs on the event loop (httpx's async client), so a slow server holds no thread: the worker threads tools run
in are never taken by a fetch, and shutdown cancels fetches like any other task. No library we use bounds a fetch
in total or caps concurrent fetches; this module does only that, around httpx."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2 as httpx

TOTAL_SECONDS = 5.0
MAX_IN_FLIGHT = 8
MAX_IN_FLIGHT_PER_HOST = 2
CACHE_SECONDS = 300.0
FAILURE_CACHE_SECONDS = 30.0
MAX_CACHE_ENTRIES = 512


HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}


class FetchError(Exception):
    """Why a document could not be had; the message names the URL and the bound it hit."""


class BoundedFetcher:
    def __init__(
        self,
        *,
        total_seconds: float = TOTAL_SECONDS,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_in_flight_per_host: int = MAX_IN_FLIGHT_PER_HOST,
    ):
        self.total_seconds = total_seconds
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_host = max_in_flight_per_host
        # keyed by (kind, url): one URL given as a client's metadata document and as its JWKS is two documents
        self._cache: OrderedDict[tuple[str, str], tuple[float, float, Any, Exception | None]] = OrderedDict()
        self._pending: dict[tuple[str, str], asyncio.Task] = {}
        self._per_host: dict[str, int] = {}
        self._http: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None

    async def get_json(
        self, url: str, *, kind: str, max_bytes: int, what: str, parse: Callable[[Any], Any] = lambda doc: doc
    ) -> Any:
        """`parse(the JSON document at url)`, from the cache when fresh. `kind` says what the document is for
        ("client-metadata", "jwks", …); `what` names it in errors ("client_id https://…"). Raises FetchError, or
        what `parse` raises (cached too)."""
        now = time.monotonic()
        key = (kind, url)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            if cached[3] is not None:
                raise cached[3]
            return cached[2]
        task = self._pending.get(key)
        if task is None:
            host = urlsplit(url).hostname or ""
            if len(self._pending) >= self.max_in_flight or self._per_host.get(host, 0) >= self.max_in_flight_per_host:
                raise FetchError(
                    f"{what}: too many documents are being fetched right now ({self.max_in_flight} at most, "
                    f"{self.max_in_flight_per_host} per host); try again in a few seconds"
                )
            self._per_host[host] = self._per_host.get(host, 0) + 1
            fetch = self._fetch_and_cache(key, host, max_bytes, what, parse)
            task = self._pending[key] = asyncio.ensure_future(fetch)
        # shield: one caller giving up (its client went away) does not cancel the fetch others wait for
        return await asyncio.shield(task)

    def _client(self) -> httpx.AsyncClient:
        """One client per event loop (making one loads the CA bundle: tens of milliseconds)."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._http[0] is not loop:
            limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
            client = httpx.AsyncClient(timeout=self.total_seconds, follow_redirects=False, limits=limits)
            self._http = (loop, client)
        return self._http[1]

    def forget(self, kind: str, url: str, older_than: float) -> bool:
        """Drops a cached copy fetched over `older_than` seconds ago (a JWKS asked for a key it lacks: the keys
        may have rotated); True when it was dropped."""
        cached = self._cache.get((kind, url))
        if cached is not None and time.monotonic() - cached[1] > older_than:
            del self._cache[(kind, url)]
            return True
        return False

    async def _fetch_and_cache(
        self, key: tuple[str, str], host: str, max_bytes: int, what: str, parse: Callable
    ) -> Any:
        url = key[1]
        try:
            try:
                value, error = parse(await self._fetch(url, max_bytes, what)), None
            except FetchError as exc:
                value, error = None, exc
            except Exception as exc:  # parse refused it: remembered like a failed fetch
                value, error = None, exc
            now = time.monotonic()
            expires = now + (CACHE_SECONDS if error is None else FAILURE_CACHE_SECONDS)
            self._cache[key] = (expires, now, value, error)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHE_ENTRIES:
                self._cache.popitem(last=False)
            if error is not None:
                raise error
            return value
        finally:
            del self._pending[key]
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]

    async def _fetch(self, url: str, max_bytes: int, what: str) -> Any:
        body = bytearray()
        try:
            with anyio.fail_after(self.total_seconds):
                async with self._client().stream("GET", url, headers=HEADERS) as response:
                    if response.status_code != 200:
                        raise FetchError(f"{what}: fetching it gave HTTP {response.status_code}")
                    if response.headers.get("content-encoding", "identity") != "identity":
                        # read raw and capped: a compressed body could unpack to far more than the cap at once
                        raise FetchError(f"{what}: the document must be sent uncompressed (Content-Encoding identity)")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise FetchError(f"{what}: the document is larger than {max_bytes} bytes ({declared} declared)")
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if len(body) > max_bytes:
                            raise FetchError(f"{what}: the document is larger than {max_bytes} bytes")
        except TimeoutError:
            raise FetchError(f"{what}: the document did not arrive in full within {self.total_seconds:g} s") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"{what}: cannot fetch the document ({type(exc).__name__}: {exc})") from None
        try:
            return json.loads(bytes(body))
        except ValueError:
            raise FetchError(f"{what}: the document is not JSON") from None


FETCHER = BoundedFetcher()
