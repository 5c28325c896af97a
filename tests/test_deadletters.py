"""`python -m proxy dead-letters`: list what upstream refused, and replay it once fixed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from proxy.buffer import Buffer
from proxy.envelope import Envelope
from tests.procs import ROOT

SECRET = "deadSecretValue"


def envelope(mid: str) -> Envelope:
    body = json.dumps({"event": "e", "messageId": mid}).encode()
    return Envelope("/api/s/track", {"X-Write-Key": f"kid:{SECRET}"}, body, 1, "kid")


async def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "dead-letters", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_list_and_replay(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    buf = Buffer(path, 10_000_000)
    await buf.open()
    seqs = [(await buf.append([envelope(m)]))[0] for m in ("a", "b", "c", "d")]
    await buf.dead_letter(seqs[0], 401, "upstream answered 401: stream not found", 1)
    await buf.dead_letter(seqs[1], 401, "upstream answered 401: stream not found", 2)
    await buf.dead_letter(seqs[2], 400, "upstream answered 400: bad event", 1)
    await buf.close()
    config = tmp_path / "config.yaml"
    config.write_text(f"buffer:\n  path: {path}\nlog:\n  format: json\n")

    listed = await cli(config)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines() if '"seq"' in line]
    assert [(r["status"], r["attempts"]) for r in rows] == [(401, 1), (401, 2), (400, 1)]
    assert SECRET not in listed.stdout and "messageId" not in listed.stdout

    replayed = await cli(config, "--status", "401", "--replay")
    assert replayed.returncode == 0, replayed.stderr
    (line,) = [json.loads(x) for x in replayed.stdout.splitlines() if "replayed" in x]
    assert line["rows"] == 2

    buf = Buffer(path, 10_000_000)
    await buf.open()
    assert (buf.rows, buf.dead_rows) == (3, 1)
    queued = await buf.fetch(0, 10)
    # "d" was never refused; "a" and "b" come back after it, with their original bytes.
    assert [r.body for r in queued] == [envelope(m).body for m in ("d", "a", "b")]
    assert queued[1].headers == {"X-Write-Key": f"kid:{SECRET}"}
    (left,) = await buf.dead_letters()
    assert left["status"] == 400
    await buf.close()
