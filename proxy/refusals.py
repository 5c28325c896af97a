"""Upstream's "stream not found" refusals, remembered per key for a while (issue 8, point 2).

Jitsu finds a stream from the key, the kind of route (browser, s2s, batch: ingest/router.go
getStream) and the Host (slug or custom domain: getDataLocator). Once it refused a key for one
such combination, later requests with it are answered at the edge as Jitsu would answer them,
and not buffered. Only a digest of the key is held, never the secret.
"""

from __future__ import annotations

import collections
import hashlib
import re
import time
from collections.abc import Callable, Mapping

# Jitsu's refusal of a key: "stream not found: for: [slug: ..][domain: ..][writeKey: ..]".
STREAM_NOT_FOUND = "stream not found"
# Stands for the [domain: ...] of the client asking, in a remembered refusal (forwarder).
CLIENT_DOMAIN = "[domain: \x00]"
# Single-event routes are one kind each, whatever the event type in the path.
_KIND = re.compile(r"^(/api/s/s2s/|/api/s/|/api/px/)[^/]+$")


def route_kind(path: str) -> str:
    """The part of an upstream path that decides how Jitsu looks the stream up."""
    path = path.split("?", 1)[0]
    if path == "/api/s/s2s/batch":
        return path  # strict lookup, unlike /api/s/s2s/{type}
    if path.startswith("/api."):
        return "/api.*"  # the classic tracker's randomize_url: a fresh name every event
    match = _KIND.match(path)
    return match.group(1) + "*" if match else path


def fingerprint(key: str | None, path: str, headers: Mapping[str, str]) -> bytes:
    """What a refusal is remembered under: the key, the route kind, the Host upstream sees."""
    parts = [key or "", route_kind(path), headers.get("Host", "")]
    raw = "\0".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=16).digest()


class KeyRefusals:
    """Bounded memory of refusals: at most `max_entries`, each for `ttl_s` seconds."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        # fingerprint -> (expires at, Jitsu's message with the secret masked)
        self._entries: collections.OrderedDict[bytes, tuple[float, str]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, print_: bytes, message: str) -> None:
        if self.ttl_s <= 0:
            return
        self._entries.pop(print_, None)
        self._entries[print_] = (self._clock() + self.ttl_s, message)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, print_: bytes) -> None:
        """Upstream took an event under this key after all (the stream was created)."""
        self._entries.pop(print_, None)

    def refused(self, print_: bytes) -> str | None:
        """Jitsu's message if this key was refused less than ttl_s ago, else None."""
        entry = self._entries.get(print_)
        if entry is None:
            return None
        expires, message = entry
        if expires <= self._clock():
            del self._entries[print_]
            return None
        return message
