"""What one caller may make this server store or try, for `--auth oauth`: registration is open to anyone on the
internet, so every client field has a size cap, registrations have a rate, and wrong owner tokens lock out the
address that sent them. No library we depend on limits these (the SDK's handlers take any size and any rate);
the sliding window below is the small piece written here."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from typing import Any

# Client fields (RFC 7591 registration and Client ID Metadata Documents alike).
MAX_REGISTRATION_BYTES = 16 * 1024
MAX_NAME_CHARS = 200
MAX_URI_CHARS = 2000
MAX_REDIRECT_URIS = 10
MAX_LIST_ITEMS = 10
MAX_TEXT_CHARS = 500  # any other string field (scope, software_id, contacts[i], …)

# /register (and a Client ID Metadata Document's first fetch is no registration: it is bounded by the fetcher).
REGISTRATIONS_PER_ADDRESS = 10
REGISTRATIONS_GLOBAL = 100
REGISTRATION_WINDOW_SECONDS = 600
# Clients the owner never approved are dropped this long after they appeared (a consent request lasts 10 min).
UNAPPROVED_CLIENT_SECONDS = 1800

URI_FIELDS = ("client_uri", "logo_uri", "tos_uri", "policy_uri", "jwks_uri")


def client_field_problem(info: dict[str, Any]) -> str | None:
    """The first client field over its cap, as 'field: why (what is accepted)'; None when all fit."""
    for name, value in info.items():
        if isinstance(value, str):
            cap = MAX_NAME_CHARS if name == "client_name" else MAX_URI_CHARS if name in URI_FIELDS else MAX_TEXT_CHARS
            if len(value) > cap:
                return f"{name}: {len(value)} characters; at most {cap} are accepted"
        elif isinstance(value, list):
            cap = MAX_REDIRECT_URIS if name == "redirect_uris" else MAX_LIST_ITEMS
            if len(value) > cap:
                return f"{name}: {len(value)} entries; at most {cap} are accepted"
            for i, item in enumerate(value):
                item_cap = MAX_URI_CHARS if name == "redirect_uris" else MAX_TEXT_CHARS
                if isinstance(item, str) and len(item) > item_cap:
                    return f"{name}[{i}]: {len(item)} characters; at most {item_cap} are accepted"
    return None


def address_key(host: str | None) -> str:
    """Whom a limit counts: the remote address (as uvicorn gives it: behind a proxy on this machine, the
    X-Forwarded-For address), an IPv6 address by its /64 (one machine usually holds a whole /64)."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class SlidingWindow:
    """At most `max_events` per key within `window_seconds`. Remembers at most `max_keys` keys (the oldest go
    first), so many addresses cannot grow it without bound."""

    def __init__(self, max_events: int, window_seconds: float, max_keys: int = 10_000):
        self.max_events = max_events
        self.window = window_seconds
        self.max_keys = max_keys
        self.events: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self.events.get(key)
        if events is None:
            return deque()
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self.events[key]
        return events

    def retry_after(self, key: str) -> int:
        """Seconds until `key` may act again (0: now)."""
        now = time.monotonic()
        events = self._recent(key, now)
        if len(events) < self.max_events:
            return 0
        return max(1, int(events[0] + self.window - now) + 1)

    def record(self, key: str) -> int:
        """Counts one event for `key`; returns how many are left in its window."""
        now = time.monotonic()
        events = self._recent(key, now)
        events.append(now)
        self.events[key] = events
        self.events.move_to_end(key)
        while len(self.events) > self.max_keys:
            self.events.popitem(last=False)
        return max(0, self.max_events - len(events))
