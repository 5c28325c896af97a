"""`python -m proxy salvage FILE` on real files: dead letters come along, a wrong source fails
loudly, and a second run (after a full buffer, or by mistake) copies nothing twice."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.buffer import DB_NAME, Buffer
from proxy.envelope import Envelope
from tests.fakejitsu import FakeJitsu
from tests.procs import ROOT, ProxyProcess
from tests.test_quarantine import overwrite_header

T0 = 1_700_000_000.0


def envelope(mid: str, pad: int = 0) -> Envelope:
    body = json.dumps({"event": "e", "messageId": mid, "pad": "x" * pad}).encode()
    return Envelope("/api/s/track", {"X-Write-Key": "kid:s"}, body, 1, "kid")


async def source_buffer(
    path: Path, pending: list[str], dead: list[tuple[str, int, str, int]], pad: int = 0
) -> Path:
    """A buffer file with pending rows and dead letters (messageId, status, reason, attempts);
    dead letter i failed at T0 + i."""
    buf = Buffer(path, 100_000_000)
    await buf.open()
    seqs = {}
    for mid in [*pending, *(d[0] for d in dead)]:
        (seqs[mid],) = await buf.append([envelope(mid, pad)])
    for mid, status, reason, attempts in dead:
        await buf.dead_letter(seqs[mid], status, reason, attempts)
    await buf.close()
    with sqlite3.connect(path / DB_NAME) as conn:
        for i, (mid, *_rest) in enumerate(dead):
            conn.execute("UPDATE dead_letter SET failed_at = ? WHERE seq = ?", (T0 + i, seqs[mid]))
    return path / DB_NAME


async def salvage(config: Path, source: Path) -> tuple[int, list[dict[str, Any]]]:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "salvage", str(source), "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stderr == "", done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def write_config(tmp_path: Path, live: Path, max_bytes: int = 100_000_000) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"buffer:\n  path: {live}\n  max_bytes: {max_bytes}\n  min_free_bytes: 0\n"
        "log:\n  format: json\n"
    )
    return config


def mids(rows: list[Any]) -> list[str]:
    return [json.loads(r.body if hasattr(r, "body") else r["body"])["messageId"] for r in rows]


async def test_dead_letters_are_salvaged_with_why_they_failed_under_fresh_seqs(
    tmp_path: Path,
) -> None:
    source = await source_buffer(
        tmp_path / "old",
        ["p1", "p2"],
        [("d1", 401, "upstream answered 401: stream not found", 3), ("d2", 400, "bad", 1)],
    )
    # The live buffer has rows and a dead letter of its own under the same low seqs.
    live = tmp_path / "live"
    await source_buffer(live, ["l1", "l2", "l3"], [("l0", 400, "live", 2)])
    config = write_config(tmp_path, live)

    code, lines = await salvage(config, source)
    assert code == 0, lines
    (done,) = [x for x in lines if x["event"] == "salvage_done"]
    assert (done["rows_recovered"], done["dead_letters_recovered"]) == (2, 2)

    buf = Buffer(live, 100_000_000)
    await buf.open()
    try:
        pending = await buf.fetch(0, 100)
        dead = await buf.dead_letters()
        assert mids(pending) == ["l1", "l2", "l3", "p1", "p2"]
        assert [
            (m, d["status"], d["reason"], d["attempts"], d["failed_at"])
            for m, d in zip(mids(dead), dead, strict=True)
        ] == [
            ("l0", 400, "live", 2, T0),
            ("d1", 401, "upstream answered 401: stream not found", 3, T0),
            ("d2", 400, "bad", 1, T0 + 1),
        ]
        seqs = [r.seq for r in pending] + [d["seq"] for d in dead]
        assert len(set(seqs)) == len(seqs), "no seq is shared by two rows"
        assert (buf.rows, buf.dead_rows) == (5, 3)
        # A later row still gets a seq above every salvaged one (AUTOINCREMENT was used).
        (after,) = await buf.append([envelope("later")])
        assert after > max(seqs)
    finally:
        await buf.close()


def missing(tmp_path: Path, real: Path) -> Path:
    return tmp_path / "quarantine" / "buffer.corupt" / DB_NAME


def directory(tmp_path: Path, real: Path) -> Path:
    return real.parent


def text_file(tmp_path: Path, real: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n" * 100)
    return path


def foreign_sqlite(tmp_path: Path, real: Path) -> Path:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY)")
    return path


def header_gone(tmp_path: Path, real: Path) -> Path:
    overwrite_header(real)
    return real


def the_live_buffer(tmp_path: Path, real: Path) -> Path:
    return tmp_path / "live" / DB_NAME


def a_workers_live_shard(tmp_path: Path, real: Path) -> Path:
    """With server.workers, worker 1's shard is live too: its rows are sent by that worker."""
    shard = tmp_path / "live" / "shard-1"
    shard.mkdir()
    os.replace(real, shard / DB_NAME)
    return shard / DB_NAME


def a_fifo(tmp_path: Path, real: Path) -> Path:
    """Reading it would block for ever (the second attack pass hung salvage on one)."""
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize(
    ("pick", "says"),
    [
        (missing, "no such file"),
        (directory, "directory"),
        (text_file, "not a readable SQLite"),
        (foreign_sqlite, "not a buffer"),
        (header_gone, "not a readable SQLite"),
        (the_live_buffer, "live buffer"),
        (a_workers_live_shard, "live buffer"),
        (a_fifo, "not a regular file"),
    ],
)
async def test_a_wrong_source_fails_loudly(tmp_path: Path, pick: Any, says: str) -> None:
    real = await source_buffer(tmp_path / "old", ["p1"], [("d1", 400, "bad", 1)])
    live = tmp_path / "live"
    await source_buffer(live, ["l1"], [])
    source = pick(tmp_path, real)
    code, lines = await salvage(write_config(tmp_path, live), source)
    assert code == 1, lines
    (error,) = [x for x in lines if x["level"] == "error"]
    assert error["event"] == "salvage_failed" and says in error["error"], error
    assert str(source) in error["error"]
    assert not [x for x in lines if x["event"] == "salvage_done"]
    buf = Buffer(live, 100_000_000)
    await buf.open()
    assert (buf.rows, buf.dead_rows) == (1, 0), "nothing copied"
    await buf.close()


@pytest.mark.timeout(120)
async def test_rerun_after_a_full_buffer_continues_and_sends_every_event_once(
    tmp_path: Path, upstream: FakeJitsu
) -> None:
    """Salvage into a buffer too small for the file: each run fills it, says how far it got
    and exits 1; the proxy forwards (and deletes) those rows; the next run continues. In the
    end upstream got every event once, and a further run, or a run on a copy of the file,
    adds nothing."""
    ids = [f"q{i:02d}" for i in range(40)]
    source = await source_buffer(tmp_path / "old", ids, [("d1", 401, "refused", 2)], pad=300)
    # Room for about 15 of the 40 rows.
    proxy = ProxyProcess(tmp_path, upstream.url, buffer={"max_bytes": 5000})
    runs = []
    for _ in range(5):
        code, lines = await salvage(proxy.config_path, source)
        runs.append(code)
        if code == 0:
            break
        (stop,) = [x for x in lines if x["level"] == "error"]
        assert stop["event"] == "salvage_incomplete"
        assert 0 < stop["rows_recovered"] < 40
        assert f"copied {stop['rows_recovered']} rows" in stop["error"]
        assert "run salvage again" in stop["error"]
        before = len(upstream.delivered_set)
        proxy.start()
        await proxy.wait_ready()
        # Counted in events: coalesced, several rows go in one request (upstream.coalesce).
        recovered = before + stop["rows_recovered"]
        await upstream.wait_for(lambda f, n=recovered: len(f.delivered_set) >= n)
        assert await proxy.terminate_async() == 0
    assert runs[:2] == [1, 1] and runs[-1] == 0, runs

    code, lines = await salvage(proxy.config_path, source)
    (again,) = [x for x in lines if x["event"] == "salvage_done"]
    assert code == 0 and again["rows_recovered"] == 0 and again["dead_letters_recovered"] == 0
    # The ledger knows rows, not file names: a moved or copied file is the same source.
    copy = tmp_path / "elsewhere" / DB_NAME
    copy.parent.mkdir()
    shutil.copyfile(source, copy)
    code, lines = await salvage(proxy.config_path, copy)
    (moved,) = [x for x in lines if x["event"] == "salvage_done"]
    assert code == 0 and moved["rows_recovered"] == 0 and moved["rows_already_salvaged"] == 41

    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: len(f.delivered_set) >= 40)
    assert await proxy.terminate_async() == 0
    sent = [m for r in upstream.delivered for m in r.message_ids]
    assert sorted(sent) == ids, "every event once"
    buf = Buffer(tmp_path / "buffer", 100_000_000)
    await buf.open()
    assert mids(await buf.dead_letters()) == ["d1"]
    await buf.close()


async def test_a_copy_of_the_live_buffer_adds_nothing(tmp_path: Path) -> None:
    """Its rows are the live rows themselves: copying them would send each one twice."""
    live = tmp_path / "live"
    await source_buffer(live, ["l1", "l2"], [("d1", 400, "bad", 1)])
    copy = tmp_path / "copy.db"
    shutil.copy(live / DB_NAME, copy)
    code, lines = await salvage(write_config(tmp_path, live), copy)
    assert code == 0, lines
    buf = Buffer(live, 100_000_000)
    await buf.open()
    assert (buf.rows, buf.dead_rows) == (2, 1)
    await buf.close()
