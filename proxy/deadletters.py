"""`python -m proxy dead-letters`: list what upstream refused for good, and put it back in the
send queue once the cause is fixed (a rotated key, a misconfigured stream). Like salvage, it
works on a stopped proxy's buffer (it takes the lock)."""

from __future__ import annotations

from typing import Any

from proxy.buffer import Buffer
from proxy.config import Config

LIST_LIMIT = 1_000_000


async def list_dead_letters(config: Config, status: int | None) -> list[dict[str, Any]]:
    buffer = Buffer(config.buffer.path, config.buffer.max_bytes, fsync=config.buffer.fsync)
    await buffer.open()
    try:
        rows = await buffer.dead_letters(LIST_LIMIT)
    finally:
        await buffer.close()
    # Never the body or headers: they carry the events and the write key.
    return [
        {k: v for k, v in row.items() if k != "body"}
        for row in rows
        if status is None or row["status"] == status
    ]


async def replay(config: Config, status: int | None) -> int:
    buffer = Buffer(config.buffer.path, config.buffer.max_bytes, fsync=config.buffer.fsync)
    await buffer.open()
    try:
        return await buffer.requeue_dead_letters(status)
    finally:
        await buffer.close()
