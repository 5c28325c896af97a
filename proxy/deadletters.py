"""`python -m proxy dead-letters`: list what upstream refused for good, and put it back in the
send queue once the cause is fixed (a rotated key, a misconfigured stream). Like salvage, it
works on a stopped proxy's buffer (it takes the lock)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from proxy.buffer import Buffer, DeadLetterFilter
from proxy.config import Config
from proxy.errors import UsageError
from proxy.shards import stored_shards

LIST_LIMIT = 1_000_000


def parse_time(flag: str, text: str) -> float:
    """Unix seconds, or ISO 8601; a time without a zone is UTC, as in the proxy's logs."""
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise UsageError(
                f"{flag}: {text!r} is neither ISO 8601 (2024-05-01T12:00:00Z) nor unix seconds"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise UsageError(f"{flag}: {text!r} is not a time")
    return value


def check_write_key(value: str) -> str:
    """A replacement key must be a full `keyId:secret` that can travel as an HTTP header value
    as is: visible ASCII only (no control characters, no spaces, nothing aiohttp would have to
    encode). The messages never quote the value: it holds the secret."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise UsageError("--write-key contains control characters")
    if not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise UsageError("--write-key must be visible ASCII only (no spaces, no accents)")
    kid, sep, secret = value.partition(":")
    if not (kid and sep and secret):
        raise UsageError("--write-key must be the full keyId:secret")
    return value


async def list_dead_letters(config: Config, selection: DeadLetterFilter) -> list[dict[str, Any]]:
    """Every shard's dead letters (with several workers, each keeps its own), oldest shard
    first, each row naming its shard relative to buffer.path ("." for the first)."""
    base, shards = stored_shards(config.buffer.path)
    found: list[dict[str, Any]] = []
    for path in shards:
        async with Buffer.from_config(config.buffer, path) as buffer:
            rows = await buffer.dead_letters(LIST_LIMIT - len(found), selection)
        # Never the body or headers: they carry the events and the write key.
        shard = str(path.relative_to(base)) if path != base else "."
        found += [{**{k: v for k, v in row.items() if k != "body"}, "shard": shard} for row in rows]
    return found


async def replay(config: Config, selection: DeadLetterFilter, write_key: str | None = None) -> int:
    """Back into the send queue of the shard each dead letter is in."""
    _base, shards = stored_shards(config.buffer.path)
    moved = 0
    for path in shards:
        async with Buffer.from_config(config.buffer, path) as buffer:
            moved += await buffer.requeue_dead_letters(selection, write_key=write_key)
    return moved
