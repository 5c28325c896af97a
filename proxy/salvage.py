"""`python -m proxy salvage FILE`: copy what can still be read from a quarantined buffer file
back into the live buffer, row by row, skipping what is damaged. Run it with the proxy
stopped (it takes the buffer's lock); the rows are then forwarded at the next start."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from proxy.buffer import Buffer
from proxy.config import Config
from proxy.envelope import Envelope

CHUNK = 500
COLUMNS = "seq, key_id, path, headers, body, events, {method}"
# Give up after this many damaged windows in a row with no end in sight.
MAX_FAILED_WINDOWS = 10_000


def read_rows(source: Path) -> tuple[list[Envelope], int]:
    """Readable rows of `events` in order, and how many could not be read.

    Rows are read in windows; a window that hits a damaged page is read again one row at a
    time, so the damage costs only the rows on that page."""
    try:
        conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        high = _last_seq(conn)
        names = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    except sqlite3.Error:
        return [], 0
    # Schema v1 had no method column: every row then was a POST.
    columns = COLUMNS.format(method="method" if "method" in names else "'POST'")
    good: list[Envelope] = []
    bad = 0
    cursor = 0
    failed_windows = 0
    try:
        while failed_windows < MAX_FAILED_WINDOWS:
            try:
                rows = conn.execute(
                    f"SELECT {columns} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                    (cursor, CHUNK),
                ).fetchall()
            except sqlite3.Error:
                failed_windows += 1
                for seq in range(cursor + 1, cursor + CHUNK + 1):
                    try:
                        row = conn.execute(
                            f"SELECT {columns} FROM events WHERE seq = ?", (seq,)
                        ).fetchone()
                    except sqlite3.Error:
                        bad += 1
                        continue
                    if row is not None:
                        bad += _keep(row, good)
                cursor += CHUNK
                if high is not None and cursor >= high:
                    break
                continue
            if not rows:
                break
            failed_windows = 0
            for row in rows:
                bad += _keep(row, good)
            cursor = rows[-1][0]
    finally:
        conn.close()
    return good, bad


def _last_seq(conn: sqlite3.Connection) -> int | None:
    for query in (
        "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
        "SELECT max(seq) FROM events",
    ):
        try:
            row = conn.execute(query).fetchone()
        except sqlite3.Error:
            continue
        if row is not None and row[0] is not None:
            return int(row[0])
    return None


def _keep(row: tuple[Any, ...], out: list[Envelope]) -> int:
    """Append a decoded row; 1 if it could not be decoded."""
    _seq, key_id, path, headers, body, events, method = row
    try:
        out.append(
            Envelope(path, json.loads(headers), bytes(body), int(events), key_id, str(method))
        )
    except (TypeError, ValueError):
        return 1
    return 0


async def salvage(config: Config, source: Path) -> dict[str, Any]:
    envelopes, unreadable = read_rows(source)
    async with Buffer.from_config(config.buffer) as buffer:
        for start in range(0, len(envelopes), CHUNK):
            await buffer.append(envelopes[start : start + CHUNK])
    return {
        "source": str(source),
        "rows_recovered": len(envelopes),
        "events_recovered": sum(e.events for e in envelopes),
        "rows_unreadable": unreadable,
    }
