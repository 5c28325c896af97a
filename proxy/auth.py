"""Finds the write key in a request the way Jitsu's ingest does, and says where it came from.

Precedence (ingest/router.go getDataLocator): Authorization (Basic), X-Write-Key, ?writekey=,
then `writeKey` in a batch body, or on the Classic API its own places (find_classic_key).
Upstream only ever gets the key back in X-Write-Key.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum

from proxy.errors import IngestError


class KeySource(StrEnum):
    AUTHORIZATION = "authorization"
    HEADER = "x-write-key"
    QUERY = "query"
    BODY = "body"
    HOST = "host"  # routes.host_keys: the first-party Host's configured key
    CLASSIC = "classic"  # ?token=, X-Auth-Token, api_key header, ?p_*= (Classic API only)
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class WriteKey:
    value: str
    source: KeySource

    @property
    def key_id(self) -> str:
        """The public half of `keyId:secret`; the only part that may be logged."""
        return key_id(self.value)

    @property
    def public_id(self) -> str:
        """What an allowlist names: the id of `keyId:secret`, or a plain key (stream id) whole."""
        return self.value.split(":", 1)[0]


def key_id(value: str) -> str:
    if ":" in value:
        return value.split(":", 1)[0]
    # A plain key (legacy key or stream id) has no public half: show a short prefix only.
    return value[:4] + "…" if len(value) > 4 else "…"


def mask_key(value: str) -> str:
    """`keyId:***`, the form jitsu-js itself puts into event bodies."""
    return f"{key_id(value)}:***"


def decode_basic(header: str) -> str:
    """Key from `Authorization: Basic base64(key:)`.

    Jitsu strictly decodes and trims one trailing ':'. We are more lenient about whitespace
    (its own docs' example encodes a trailing newline) and the scheme's case.
    """
    value = header.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "basic" and rest:
        value = rest.strip()
    try:
        raw = base64.b64decode(value, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise IngestError(
            "error processing message: failed to decode writeKey from Authorization header "
            "as base64",
            status=400,
        ) from None
    text = text.strip()
    if text.endswith(":"):
        text = text[:-1]
    return text.strip()


# Jitsu's keys are two 32-character ids; anything far longer is no key of Jitsu's.
MAX_KEY_CHARS = 512
# Searched by re, not char by char in Python (issue 9: some 3 µs per request).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _checked(value: str, source: KeySource) -> WriteKey:
    """A key we could not store or send unchanged is refused now, not after the 2xx."""
    # A control character would be refused by aiohttp as a header.
    if _CONTROL.search(value):
        raise IngestError(
            "error processing message: write key contains control characters", status=400
        )
    # Invalid UTF-8 in a header arrives as lone surrogates (aiohttp decodes with
    # surrogateescape), and so does a \ud800 escape in a body key: SQLite cannot store such a
    # string and aiohttp sends it as an empty header. No stream has such a key: Jitsu's answer.
    if len(value) > MAX_KEY_CHARS or not _is_utf8(value):
        raise IngestError(
            "stream not found: for: [writeKey: (not a valid key)][ingestType: writeKey]",
            status=401,
        )
    return WriteKey(value, source)


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_write_key(
    headers: Mapping[str, str],
    query: Mapping[str, str],
    body_key: object = None,
) -> WriteKey | None:
    """The write key, by Jitsu's precedence. A present but malformed Authorization is an error,
    as in Jitsu: it wins over every other source even when those are fine."""
    authorization = headers.get("Authorization", "")
    if authorization.strip():
        value = decode_basic(authorization)
        # Present means it wins, even when it holds an empty key (Jitsu then finds no stream).
        return _checked(value, KeySource.AUTHORIZATION) if value else None
    header_key = headers.get("X-Write-Key", "").strip()
    if header_key:
        return _checked(header_key, KeySource.HEADER)
    query_key = query.get("writekey", "").strip()
    if query_key:
        return _checked(query_key, KeySource.QUERY)
    if isinstance(body_key, str) and body_key.strip():
        return _checked(body_key.strip(), KeySource.BODY)
    return None


# The Classic API's own key places (ingest/router_classic_handler.go, ClassicHandler's
# writeKeyExtractor): asked only when getDataLocator's found nothing.
CLASSIC_QUERY_KEY = "token"
CLASSIC_HEADER_KEYS = ("X-Auth-Token", "api_key")
CLASSIC_QUERY_PREFIX = "p_"


def is_classic_key_param(name: str) -> bool:
    """A query parameter the Classic API may read a key from (then never forwarded)."""
    return name == CLASSIC_QUERY_KEY or name.startswith(CLASSIC_QUERY_PREFIX)


def find_classic_key(
    headers: Mapping[str, str], query: Iterable[tuple[str, str]]
) -> WriteKey | None:
    """The write key of a Classic API request, by Jitsu's precedence: getDataLocator's
    Authorization, X-Write-Key and ?writekey= first (a present Authorization wins even when
    it decodes to nothing), then ?token=, X-Auth-Token, an `api_key` header, and the first
    ?p_<anything>= (Jitsu takes one at random when there are several: Go map order)."""
    pairs = list(query)
    first = dict(reversed(pairs))  # the first value of each name, as Go's Query() reads it
    found = find_write_key(headers, first)
    if found is not None or headers.get("Authorization", "").strip():
        return found
    for value in (
        first.get(CLASSIC_QUERY_KEY, ""),
        *(headers.get(name, "") for name in CLASSIC_HEADER_KEYS),
    ):
        if value.strip():
            return _checked(value.strip(), KeySource.CLASSIC)
    for name, value in pairs:
        if name.startswith(CLASSIC_QUERY_PREFIX):
            # Jitsu takes this one's value even when it is empty (and then finds no stream).
            return _checked(value.strip(), KeySource.CLASSIC) if value.strip() else None
    return None


# user:password@ of a URL in a message: aiohttp's proxy errors quote the egress proxy's URL,
# credentials and all.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]*@")


def strip_url_credentials(text: str) -> str:
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def redact(text: str, key: str | None) -> str:
    """Remove a write key's secret from text that may reach a log, a metric or the dead-letter
    store (Jitsu echoes the unmasked key in "stream not found" errors), and the credentials of
    any URL in it."""
    text = strip_url_credentials(text)
    if not key:
        return text
    text = text.replace(key, mask_key(key))
    secret = key.split(":", 1)[1] if ":" in key else key
    if len(secret) >= 4:
        text = text.replace(secret, "***")
    return text
