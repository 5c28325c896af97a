"""`python -m proxy salvage FILE`: copy what can still be read from a quarantined buffer file
back into the live buffer, pending rows and dead letters, row by row, skipping what is damaged.
Run it with the proxy stopped (it takes the buffer's lock); the rows are then forwarded at the
next start. Running it again copies only what is not copied yet."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.buffer import APPLICATION_ID, DB_NAME, Buffer, Failure, SalvagedRow
from proxy.config import Config
from proxy.envelope import Envelope
from proxy.errors import BufferFullError, SalvageError
from proxy.shards import stored_shards

CHUNK = 500
COLUMNS = {
    "events": "seq, received_at, key_id, path, headers, body, events, {method}",
    "dead_letter": "seq, received_at, key_id, path, headers, body, events, {method},"
    " failed_at, status, reason, attempts",
}
# Give up after this many damaged windows in a row with no end in sight.
MAX_FAILED_WINDOWS = 10_000

# Which rows were copied is remembered per row, by the (received_at, seq) the row has in the
# file, not per file. A file's path changes when it is moved, its inode when it is copied, and
# its bytes when SQLite folds a -wal into it or the -wal is lost; none of that changes the rows.
# A copy of the same file holds the same events, so it should count as the same source. Two
# different files would need a row with the same seq stored at the same instant (to the
# microsecond) to be mistaken for each other.


class SourceFile:
    """A quarantined buffer file opened read-only; `unreadable` counts the rows lost to damage."""

    def __init__(self, path: Path, live: list[Path]) -> None:
        self.path = path
        self.unreadable = 0
        self._conn = _open_source(path, live)

    def close(self) -> None:
        self._conn.close()

    def rows(self, table: str) -> Iterator[SalvagedRow]:
        """Readable rows of `table` in seq order.

        Rows are read in windows; a window that hits a damaged page is read again one row at a
        time, so the damage costs only the rows on that page."""
        conn = self._conn
        try:
            high = _last_seq(conn, table)
            names = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        except sqlite3.Error:
            return
        if not names:
            return
        # Schema v1 had no method column: every row then was a POST.
        columns = COLUMNS[table].format(method="method" if "method" in names else "'POST'")
        cursor = 0
        failed_windows = 0
        while failed_windows < MAX_FAILED_WINDOWS:
            try:
                rows = conn.execute(
                    f"SELECT {columns} FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?",
                    (cursor, CHUNK),
                ).fetchall()
            except sqlite3.Error:
                failed_windows += 1
                for seq in range(cursor + 1, cursor + CHUNK + 1):
                    try:
                        row = conn.execute(
                            f"SELECT {columns} FROM {table} WHERE seq = ?", (seq,)
                        ).fetchone()
                    except sqlite3.Error:
                        self.unreadable += 1
                        continue
                    if row is not None:
                        yield from self._decode(row)
                cursor += CHUNK
                if high is not None and cursor >= high:
                    break
                continue
            if not rows:
                break
            failed_windows = 0
            for row in rows:
                yield from self._decode(row)
            cursor = rows[-1][0]

    def _decode(self, row: tuple[Any, ...]) -> Iterator[SalvagedRow]:
        seq, received_at, key_id, path, headers, body, events, method, *failed = row
        try:
            env = Envelope(path, json.loads(headers), bytes(body), int(events), key_id, str(method))
            failure = None
            if failed:
                failed_at, status, reason, attempts = failed
                failure = Failure(
                    float(failed_at),
                    None if status is None else int(status),
                    str(reason),
                    int(attempts),
                )
            yield SalvagedRow(float(received_at), int(seq), env, failure)
        except (TypeError, ValueError):
            self.unreadable += 1


def _open_source(path: Path, live: list[Path]) -> sqlite3.Connection:
    """Fail loudly: a misspelt path or the wrong file must not end in a "done" that copied
    nothing."""
    if not path.exists():
        raise SalvageError(f"{path}: no such file")
    if path.is_dir():
        raise SalvageError(f"{path} is a directory; salvage takes a file (…/{DB_NAME})")
    if not path.is_file():
        # A FIFO or a device would block the read, or never end.
        raise SalvageError(f"{path} is not a regular file; salvage takes a buffer file")
    if any(db.exists() and os.path.samefile(path, db) for db in live):
        # Its rows are already live (in the first shard or a worker's): copying them would
        # send every one of them twice.
        raise SalvageError(f"{path} is the live buffer itself; salvage takes a quarantined file")
    try:
        # A URI so that mode=ro holds; as_uri() escapes what a path may contain (?, #, %).
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SalvageError(f"{path} is not a readable SQLite file: {exc}") from exc
    try:
        (app_id,) = conn.execute("PRAGMA application_id").fetchone()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as exc:
        conn.close()
        raise SalvageError(f"{path} is not a readable SQLite file: {exc}") from exc
    if app_id != APPLICATION_ID or "events" not in tables:
        conn.close()
        raise SalvageError(f"{path} is not a buffer of this proxy")
    return conn


def _last_seq(conn: sqlite3.Connection, table: str) -> int | None:
    for query in (
        f"SELECT seq FROM sqlite_sequence WHERE name = '{table}'",
        f"SELECT max(seq) FROM {table}",
    ):
        try:
            row = conn.execute(query).fetchone()
        except sqlite3.Error:
            continue
        if row is not None and row[0] is not None:
            return int(row[0])
    return None


def _chunks(rows: Iterator[SalvagedRow]) -> Iterator[list[SalvagedRow]]:
    chunk: list[SalvagedRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def salvage(config: Config, source: Path) -> dict[str, Any]:
    """Copy `source` into the live buffer. The result says what was copied; with "error" in
    it, the live buffer filled up before the end, and a re-run continues from there."""
    _base, shards = stored_shards(config.buffer.path)
    src = SourceFile(source, [shard / DB_NAME for shard in shards])
    result: dict[str, Any] = {
        "source": str(source),
        "rows_recovered": 0,
        "events_recovered": 0,
        "dead_letters_recovered": 0,
        "rows_already_salvaged": 0,
    }
    try:
        async with Buffer.from_config(config.buffer) as buffer:
            try:
                # Pending rows first: they are what the proxy still owes upstream.
                for table in ("events", "dead_letter"):
                    for chunk in _chunks(src.rows(table)):
                        await _copy(buffer, chunk, result)
            except BufferFullError as exc:
                result["error"] = (
                    f"stopped: {exc}; copied {result['rows_recovered']} rows and"
                    f" {result['dead_letters_recovered']} dead letters this run. Make room (start"
                    " the proxy so that it forwards them, or raise buffer.max_bytes), then run"
                    " salvage again: it continues where it stopped and copies nothing twice"
                )
    finally:
        src.close()
    result["rows_unreadable"] = src.unreadable
    return result


async def _copy(buffer: Buffer, chunk: list[SalvagedRow], result: dict[str, Any]) -> None:
    done = await buffer.salvaged(chunk)
    new = [r for r in chunk if (r.received_at, r.seq) not in done]
    result["rows_already_salvaged"] += len(chunk) - len(new)
    if not new:
        return
    try:
        _count(result, await buffer.append_salvaged(new))
    except BufferFullError:
        if len(new) == 1:
            raise
        # Nothing of the chunk was stored. Copy what still fits a row at a time, so that the
        # next run has less to do; the next refusal ends this one.
        for row in new:
            _count(result, await buffer.append_salvaged([row]))


def _count(result: dict[str, Any], added: tuple[int, int, int]) -> None:
    rows, events, dead = added
    result["rows_recovered"] += rows
    result["events_recovered"] += events
    result["dead_letters_recovered"] += dead
