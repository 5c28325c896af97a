"""`python -m proxy dead-letters`: list what upstream refused for good, and put it back in the
send queue once the cause is fixed (a rotated key, a misconfigured stream). Like salvage, it
works on a stopped proxy's buffer (it takes the lock)."""

from __future__ import annotations

from typing import Any

from proxy.buffer import Buffer
from proxy.config import Config

LIST_LIMIT = 1_000_000


async def list_dead_letters(config: Config, status: int | None) -> list[dict[str, Any]]:
    async with Buffer.from_config(config.buffer) as buffer:
        rows = await buffer.dead_letters(LIST_LIMIT)
    # Never the body or headers: they carry the events and the write key.
    return [
        {k: v for k, v in row.items() if k != "body"}
        for row in rows
        if status is None or row["status"] == status
    ]


async def replay(config: Config, status: int | None) -> int:
    async with Buffer.from_config(config.buffer) as buffer:
        return await buffer.requeue_dead_letters(status)
