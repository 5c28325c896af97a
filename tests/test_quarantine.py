"""A corrupt buffer file at start is moved aside whole; the proxy serves with a fresh one."""

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

import aiohttp
import pytest

from proxy.buffer import DB_NAME, Buffer
from proxy.envelope import Envelope
from tests.fakejitsu import FakeJitsu
from tests.procs import ROOT, ProxyProcess


async def filled_buffer(path: Path, rows: int = 200) -> None:
    buf = Buffer(path, 100_000_000)
    await buf.open()
    for i in range(rows):
        body = b'{"messageId":"q%d","pad":"%s"}' % (i, b"x" * 300)
        await buf.append([Envelope("/api/s/track", {"X-Write-Key": "k:s"}, body, 1, "k")])
    await buf.close()


def overwrite_header(db: Path) -> None:
    with db.open("r+b") as f:
        f.write(b"this is not sqlite at all" * 4)


def scribble_middle(db: Path) -> None:
    size = db.stat().st_size
    with db.open("r+b") as f:
        for offset in range(4096, size, 4096):  # every page after the first
            f.seek(offset + 8)
            f.write(os.urandom(64))


def foreign_db(db: Path) -> None:
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")


@pytest.mark.parametrize("damage", [overwrite_header, scribble_middle, foreign_db])
async def test_corrupt_file_is_quarantined_and_a_fresh_buffer_starts(
    tmp_path: Path, damage: Any
) -> None:
    await filled_buffer(tmp_path)
    damage(tmp_path / DB_NAME)
    original = (tmp_path / DB_NAME).read_bytes()

    buf = Buffer(tmp_path, 100_000_000)
    await buf.open()
    assert buf.rows == 0
    (q,) = buf.quarantined
    kept = Path(q["path"]) / DB_NAME
    assert kept.read_bytes() == original, "kept byte for byte for salvage"
    await buf.append([Envelope("/api/s/track", {}, b"{}", 1, "")])
    await buf.close()


async def test_a_torn_wal_is_ordinary_crash_recovery_not_corruption(tmp_path: Path) -> None:
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    buf = Buffer(live, 100_000_000)
    await buf.open()
    env = Envelope("/api/s/track", {}, b'{"messageId":"w"}', 1, "")
    for _ in range(20):
        await buf.append([env])
    # The files as a crash leaves them: copied while the writer has them open.
    crashed.mkdir()
    for name in (DB_NAME, DB_NAME + "-wal"):
        shutil.copyfile(live / name, crashed / name)
    await buf.close()
    wal = crashed / (DB_NAME + "-wal")
    with wal.open("r+b") as f:
        f.truncate(wal.stat().st_size - 100)
    again = Buffer(crashed, 100_000_000)
    await again.open()
    assert again.quarantined == []
    assert 0 < again.rows < 20, "committed frames before the tear survive, the torn one not"
    await again.close()


@pytest.mark.timeout(60)
async def test_proxy_with_a_corrupt_buffer_serves_and_says_so(
    tmp_path: Path, upstream: FakeJitsu
) -> None:
    proxy = ProxyProcess(tmp_path, upstream.url)
    await filled_buffer(tmp_path / "buffer")
    overwrite_header(tmp_path / "buffer" / DB_NAME)
    proxy.start()
    try:
        await asyncio.wait_for(proxy.wait_ready(), 10)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proxy.url}/readyz") as r:
                ready = await r.json()
            assert r.status == 200 and ready["status"] == "warn"
            assert len(ready["buffer"]["quarantined"]) == 1
            async with s.get(f"{proxy.url}/metrics") as r:
                assert "proxy_buffer_quarantined 1.0" in await r.text()
            async with s.post(
                f"{proxy.url}/api/s/track",
                json={"event": "e", "messageId": "after"},
                headers={"X-Write-Key": "k:s"},
            ) as r:
                assert r.status == 200
        await upstream.wait_delivered(1)
        assert upstream.delivered_ids() == ["after"]
        lines = [x for x in proxy.log_lines() if x.get("event") == "buffer_quarantined"]
        assert len(lines) == 1 and lines[0]["level"] == "error"
        # A restart does not quarantine again: the fresh buffer is healthy.
        assert proxy.terminate() == 0
        proxy.start()
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/readyz") as r:
            assert (await r.json())["status"] == "pass"
    finally:
        proxy.stop()


def break_one_page(db: Path) -> None:
    """Damage the b-tree header of one page in the middle: quick_check notices, the rest of
    the rows stay readable."""
    pages = db.stat().st_size // 4096
    with db.open("r+b") as f:
        f.seek((pages // 2) * 4096)
        f.write(b"\xff" * 12)


@pytest.mark.timeout(60)
async def test_salvage_copies_the_readable_rows_back(tmp_path: Path) -> None:
    live = tmp_path / "buffer"
    await filled_buffer(live, rows=300)
    originals = {r.body for r in await _rows(live)}
    break_one_page(live / DB_NAME)
    buf = Buffer(live, 100_000_000)
    await buf.open()  # quarantines, starts fresh
    (q,) = buf.quarantined
    await buf.close()

    config = tmp_path / "config.yaml"
    config.write_text(f"buffer:\n  path: {live}\nlog:\n  format: json\n")
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "proxy",
            "salvage",
            str(Path(q["path"]) / DB_NAME),
            "--config",
            str(config),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines() if "salvage_done" in x]
    assert 0 < line["rows_recovered"] < 300
    recovered = await _rows(live)
    assert len(recovered) == line["rows_recovered"]
    assert {r.body for r in recovered} <= originals, "salvaged rows are the original bytes"


async def _rows(path: Path) -> list[Any]:
    buf = Buffer(path, 100_000_000)
    await buf.open()
    try:
        return await buf.fetch(0, 10_000)
    finally:
        await buf.close()
