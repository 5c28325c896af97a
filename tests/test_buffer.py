"""The durable buffer on real SQLite files: commit, recovery, bounds, lock, dead letters."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from proxy.buffer import DB_NAME, SCHEMA_VERSION, Buffer
from proxy.envelope import Envelope
from proxy.errors import BufferClosedError, BufferFullError, BufferLockedError
from proxy.state import APP_STATE
from tests.fakejitsu import FakeJitsu


def envelope(i: int, size: int = 100) -> Envelope:
    body = (b'{"messageId":"m%d","pad":"' % i) + b"x" * size + b'"}'
    return Envelope("/api/s/track", {"X-Write-Key": "k:s"}, body, 1, "k")


async def test_committed_rows_survive_reopen(tmp_path: Path) -> None:
    buf = Buffer(tmp_path, 10_000_000)
    await buf.open()
    seqs = await asyncio.gather(*(buf.append([envelope(i)]) for i in range(50)))
    assert sorted(s[0] for s in seqs) == list(range(1, 51))
    await buf.delete(1)
    await buf.dead_letter(2, 400, "bad", 3)
    await buf.close()

    # What is on disk is what a fresh process sees.
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (48,)
        assert conn.execute("SELECT status, reason, attempts FROM dead_letter").fetchall() == [
            (400, "bad", 3)
        ]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    again = Buffer(tmp_path, 10_000_000)
    await again.open()
    assert (again.rows, again.events, again.dead_rows) == (48, 48, 1)
    rows = await again.fetch(0, 100)
    assert [r.seq for r in rows] == list(range(3, 51))
    assert rows[0].body == envelope(2).body
    assert rows[0].headers == {"X-Write-Key": "k:s"}
    await again.close()


async def test_synchronous_full_by_default_and_normal_when_asked(tmp_path: Path) -> None:
    for fsync, expected in ((True, "FULL"), (False, "NORMAL")):
        buf = Buffer(tmp_path / str(fsync), 1_000_000, fsync=fsync)
        await buf.open()
        assert buf.sqlite_settings == {"journal_mode": "wal", "synchronous": expected}
        await buf.close()


async def test_group_commit_puts_concurrent_appends_in_few_transactions(tmp_path: Path) -> None:
    buf = Buffer(tmp_path, 100_000_000)
    await buf.open()
    commits = 0
    original = buf._commit_group

    def counting(ops: Any) -> Any:
        nonlocal commits
        commits += 1
        return original(ops)

    buf._commit_group = counting  # type: ignore[method-assign]
    await asyncio.gather(*(buf.append([envelope(i)]) for i in range(500)))
    assert buf.rows == 500
    assert commits < 100, f"{commits} transactions for 500 appends"
    await buf.close()


async def test_full_buffer_refuses_and_keeps_what_it_has(tmp_path: Path) -> None:
    # Every row has the same stored size: 9 fit, above the 90 % low-water mark.
    size = envelope(0).stored_size
    buf = Buffer(tmp_path, 9 * size + size // 3)
    await buf.open()
    for i in range(9):
        await buf.append([envelope(i)])
    with pytest.raises(BufferFullError) as info:
        await buf.append([envelope(9)])
    assert info.value.retry_after_s > 0
    assert (buf.rows, buf.bytes) == (9, 9 * size)
    assert not buf.writable
    # Room comes back once the backlog drains below the low-water mark.
    await buf.delete(1)
    assert buf.writable
    await buf.append([envelope(99)])
    await buf.close()


async def test_second_opener_is_refused(tmp_path: Path) -> None:
    first = Buffer(tmp_path, 1_000_000)
    await first.open()
    second = Buffer(tmp_path, 1_000_000)
    with pytest.raises(BufferLockedError, match="in use by another process"):
        await second.open()
    await first.close()
    await second.open()  # the lock is released on close
    await second.close()


async def test_closed_buffer_refuses_writes(tmp_path: Path) -> None:
    buf = Buffer(tmp_path, 1_000_000)
    await buf.open()
    await buf.close()
    with pytest.raises(BufferClosedError):
        await buf.append([envelope(1)])


async def test_proxy_answers_503_with_retry_after_when_the_buffer_is_full(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    await upstream.stop()
    # Rows of about 500 bytes: a refusal leaves the buffer above its 90 % low-water mark.
    proxy = await make_proxy(buffer={"max_bytes": 8_000})
    statuses = []
    for i in range(40):
        resp = await proxy.post(
            "/api/s/track",
            headers={"X-Write-Key": "k:s"},
            json={"event": "e", "messageId": f"m{i}", "pad": "x" * 100},
        )
        statuses.append(resp.status)
        if resp.status == 503:
            assert int(resp.headers["Retry-After"]) > 0
            assert "buffer full" in (await resp.json())["error"]
    accepted = statuses.count(200)
    assert 0 < accepted < 40 and statuses.count(503) == 40 - accepted
    ready = await proxy.get("/readyz")
    assert ready.status == 503
    # Everything that got a 200 is delivered once upstream is back, and room returns.
    await upstream.start()
    await upstream.wait_for(lambda f: len(set(f.delivered_ids())) == accepted, timeout=15)
    assert set(upstream.delivered_ids()) == {f"m{i}" for i, s in enumerate(statuses) if s == 200}
    # Upstream records a delivery when it answers; the proxy deletes the row just after.
    buffer = proxy.server.app[APP_STATE].buffer  # type: ignore[union-attr]
    for _ in range(500):
        if buffer.rows == 0:
            break
        await asyncio.sleep(0.01)
    assert (await proxy.get("/readyz")).status == 200
    resp = await proxy.post("/api/s/track", headers={"X-Write-Key": "k:s"}, json={"event": "e"})
    assert resp.status == 200


async def test_proxy_answers_503_when_the_disk_is_nearly_full(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    # A reserve larger than any disk: the free-space guard trips as it would on a full disk.
    proxy = await make_proxy(buffer={"min_free_bytes": 1 << 60})
    resp = await proxy.post("/api/s/track", headers={"X-Write-Key": "k:s"}, json={"event": "e"})
    assert resp.status == 503
    assert "Retry-After" in resp.headers
    assert "disk" in (await resp.json())["error"]
    ready = await proxy.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["buffer"]["writable"] is False
    assert upstream.received == []


V1_SCHEMA = """
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL,
  key_id TEXT NOT NULL, path TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
  size INTEGER NOT NULL, events INTEGER NOT NULL);
CREATE TABLE dead_letter (seq INTEGER PRIMARY KEY, received_at REAL NOT NULL,
  key_id TEXT NOT NULL, path TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
  size INTEGER NOT NULL, events INTEGER NOT NULL, failed_at REAL NOT NULL, status INTEGER,
  reason TEXT NOT NULL, attempts INTEGER NOT NULL);
PRAGMA application_id = 1247040341;
PRAGMA user_version = 1;
"""


async def test_a_version_1_buffer_is_migrated_with_its_rows(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute(
            "INSERT INTO events (received_at, key_id, path, headers, body, size, events)"
            " VALUES (1, 'k', '/api/s/track', '{}', X'7B7D', 2, 1)"
        )
    buf = Buffer(tmp_path, 1_000_000)
    await buf.open()
    assert buf.quarantined == []
    (row,) = await buf.fetch(0, 10)
    assert (row.path, row.body, row.method) == ("/api/s/track", b"{}", "POST")
    # v3 counts the whole row, as Envelope.stored_size does for new rows.
    same = Envelope(row.path, {}, row.body, 1, row.key_id)
    assert (row.size, buf.bytes) == (same.stored_size, same.stored_size)
    await buf.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT count(*) FROM salvaged").fetchone() == (0,)


async def test_a_version_2_buffer_gets_the_salvage_ledger_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    buf = Buffer(tmp_path, 1_000_000)
    await buf.open()
    await buf.append([envelope(1)])
    await buf.close()
    # A v3 file is a v4 file without the ledger (and a v2 one, sizes aside).
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.executescript("DROP TABLE salvaged; PRAGMA user_version = 2;")
    again = Buffer(tmp_path, 1_000_000)
    await again.open()
    assert again.quarantined == [] and again.rows == 1
    await again.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT count(*) FROM salvaged").fetchone() == (0,)


async def test_fetch_takes_as_many_rows_as_fit_in_max_bytes(tmp_path: Path) -> None:
    buf = Buffer(tmp_path, 10_000_000)
    await buf.open()
    await buf.append([envelope(i) for i in range(10)])
    size = envelope(0).stored_size
    assert [r.seq for r in await buf.fetch(0, 100, max_bytes=3 * size)] == [1, 2, 3]
    assert [r.seq for r in await buf.fetch(0, 100, max_bytes=1)] == [1]  # one, however large
    # Rows passed over (in flight) at or before `after` cost nothing; past it, they are skipped.
    skip = frozenset({1, 2, 5})
    rows = await buf.fetch(2, 100, skip, max_bytes=3 * size)
    assert [r.seq for r in rows] == [3, 4, 6]
    await buf.close()
