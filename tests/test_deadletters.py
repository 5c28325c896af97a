"""`python -m proxy dead-letters`: list what upstream refused, and replay it once fixed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import pytest

from proxy.buffer import DB_NAME, Buffer, DeadLetterFilter
from proxy.envelope import Envelope
from tests.fakejitsu import Answer, FakeJitsu, Received
from tests.procs import ProxyProcess
from tests.procs import dead_letters_cli as cli

SECRET = "deadSecretValue"


def envelope(mid: str) -> Envelope:
    body = json.dumps({"event": "e", "messageId": mid}).encode()
    return Envelope("/api/s/track", {"X-Write-Key": f"kid:{SECRET}"}, body, 1, "kid")


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
    (line,) = [json.loads(x) for x in replayed.stderr.splitlines() if "replayed" in x]
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


NEW_SECRET = "rotatedSecretValue"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


async def dead_buffer(path: Path, rows: list[tuple[str, str, int, float]]) -> None:
    """Dead letters (messageId, key id, status, failed_at), failed_at set on the file itself."""
    buf = Buffer(path, 10_000_000)
    await buf.open()
    for mid, kid, status, _at in rows:
        body = json.dumps({"event": "e", "messageId": mid}).encode()
        env = Envelope("/api/s/track", {"X-Write-Key": f"{kid}:{SECRET}"}, body, 1, kid)
        (seq,) = await buf.append([env])
        await buf.dead_letter(seq, status, f"upstream answered {status}", 1)
    await buf.close()
    with sqlite3.connect(path / DB_NAME) as conn:
        for mid, _kid, _status, at in rows:
            conn.execute(
                "UPDATE dead_letter SET failed_at = ? WHERE body = ?",
                (at, json.dumps({"event": "e", "messageId": mid}).encode()),
            )


def listed(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The listed rows as `keyId@seconds after T0`."""
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if '"seq"' in line]
    return [f"{r['key_id']}@{r['failed_at'] - T0:.0f}" for r in rows]


async def test_list_and_replay_filter_by_key_id_and_failure_time(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    await dead_buffer(
        path,
        [
            ("a", "kid", 401, T0),
            ("b", "kid", 401, T0 + 3600),
            ("c", "other", 401, T0 + 3600),
            ("d", "kid", 400, T0 + 7200),
        ],
    )
    config = tmp_path / "config.yaml"
    config.write_text(f"buffer:\n  path: {path}\nlog:\n  format: json\n")

    assert listed(await cli(config, "--key-id", "kid")) == [
        "kid@0",
        "kid@3600",
        "kid@7200",
    ]
    # --since includes its instant, --until excludes its own (windows do not overlap).
    since = await cli(config, "--since", "2023-11-14T23:13:20Z")
    assert listed(since) == ["kid@3600", "other@3600", "kid@7200"]
    until = await cli(config, "--until", str(int(T0 + 3600)))
    assert listed(until) == ["kid@0"]
    # A time without a zone is UTC, as in the proxy's own logs.
    both = await cli(config, "--since", "2023-11-14T22:13:21", "--until", "2023-11-15T00:13:20")
    assert listed(both) == ["kid@3600", "other@3600"]

    replayed = await cli(
        config, "--replay", "--status", "401", "--key-id", "kid", "--since", str(T0 + 1)
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    (line,) = [json.loads(x) for x in replayed.stderr.splitlines() if "replayed" in x]
    assert line["rows"] == 1

    buf = Buffer(path, 10_000_000)
    await buf.open()
    (queued,) = await buf.fetch(0, 10)
    assert json.loads(queued.body)["messageId"] == "b"
    assert sorted((d["key_id"], d["status"]) for d in await buf.dead_letters()) == [
        ("kid", 400),
        ("kid", 401),
        ("other", 401),
    ]
    await buf.close()


@pytest.mark.timeout(60)
async def test_replay_with_a_new_write_key_delivers_the_same_events_under_it(
    tmp_path: Path, upstream: FakeJitsu
) -> None:
    """The rotated-key story end to end: upstream refuses the old key, the operator replays
    with the new one, and upstream gets the same bytes (messageIds) under the new key."""

    def refuse_old_key(rec: Received) -> Answer | None:
        if rec.headers.get("X-Write-Key") == f"kid:{SECRET}":
            return Answer(401, {"error": "stream not found"})
        return None

    upstream.fault = refuse_old_key
    proxy = ProxyProcess(tmp_path, upstream.url)
    proxy.start()
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as s:
            for mid in ("m1", "m2"):
                async with s.post(
                    f"{proxy.url}/api/s/s2s/track",
                    json={"event": "e", "messageId": mid},
                    headers={"X-Write-Key": f"kid:{SECRET}"},
                ) as r:
                    assert r.status == 200
            await proxy.wait_state(s, lambda st: st["buffer"]["dead_letter_rows"] == 2)
        assert await proxy.terminate_async() == 0
        refused = {r.json()["messageId"]: r.body for r in upstream.received if r.status == 401}
        assert sorted(refused) == ["m1", "m2"]

        replayed = await cli(proxy.config_path, "--replay", "--write-key", f"kid2:{NEW_SECRET}")
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert NEW_SECRET not in replayed.stdout + replayed.stderr
        (line,) = [json.loads(x) for x in replayed.stderr.splitlines() if "replayed" in x]
        assert (line["rows"], line["write_key_id"]) == (2, "kid2")

        buf = Buffer(tmp_path / "buffer", 10_000_000)
        await buf.open()
        assert {r.key_id for r in await buf.fetch(0, 10)} == {"kid2"}
        await buf.close()

        proxy.start()
        await proxy.wait_ready()
        delivered = await upstream.wait_delivered(2)
        assert {r.json()["messageId"]: r.body for r in delivered} == refused, "same bytes"
        assert {r.headers["X-Write-Key"] for r in delivered} == {f"kid2:{NEW_SECRET}"}
        assert NEW_SECRET not in proxy.log_text()
    finally:
        proxy.stop()


async def test_requeue_with_a_new_key_keeps_the_counters_true(tmp_path: Path) -> None:
    buf = Buffer(tmp_path, 10_000_000)
    await buf.open()
    seqs = [(await buf.append([envelope(m)]))[0] for m in ("a", "b", "c")]
    await buf.dead_letter(seqs[0], 401, "refused", 1)
    await buf.dead_letter(seqs[1], 401, "refused", 1)
    moved = await buf.requeue_dead_letters(
        DeadLetterFilter(status=401), write_key=f"kid2:{NEW_SECRET}"
    )
    assert moved == 2
    counters = (buf.rows, buf.bytes, buf.events, buf.dead_rows)
    await buf.close()
    again = Buffer(tmp_path, 10_000_000)
    await again.open()
    assert (again.rows, again.bytes, again.events, again.dead_rows) == counters
    assert counters[0] == 3 and counters[3] == 0
    await again.close()


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (f"kid2:{NEW_SECRET}\r\nX-Evil: 1", "control"),
        (f"kid2:{NEW_SECRET}\x7f", "control"),  # argv cannot carry NUL
        (f"kid2:{NEW_SECRET}é", "ASCII"),
        (f"kid2:{NEW_SECRET} x", "ASCII"),
        (f"{NEW_SECRET}", "keyId:secret"),
        (f":{NEW_SECRET}", "keyId:secret"),
        ("kid2:", "keyId:secret"),
    ],
)
async def test_a_write_key_that_cannot_be_a_header_is_refused(
    tmp_path: Path, key: str, why: str
) -> None:
    path = tmp_path / "buffer"
    await dead_buffer(path, [("a", "kid", 401, T0)])
    config = tmp_path / "config.yaml"
    config.write_text(f"buffer:\n  path: {path}\nlog:\n  format: json\n")
    done = await cli(config, "--replay", "--write-key", key)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [json.loads(x) for x in done.stderr.splitlines()]
    (error,) = [x for x in lines if x["level"] == "error"]
    assert error["event"] == "dead_letters_failed" and why in error["error"]
    assert NEW_SECRET not in done.stdout + done.stderr
    buf = Buffer(path, 10_000_000)
    await buf.open()
    assert (buf.rows, buf.dead_rows) == (0, 1), "nothing replayed"
    await buf.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--since", "yesterday"],
        ["--until", "2023-13-01"],
        ["--write-key", f"kid2:{NEW_SECRET}"],  # without --replay it would do nothing
    ],
)
async def test_bad_arguments_exit_2_with_one_error_line(tmp_path: Path, args: list[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"buffer:\n  path: {tmp_path / 'buffer'}\nlog:\n  format: json\n")
    done = await cli(config, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    (error,) = [json.loads(x) for x in done.stderr.splitlines()]
    assert error["event"] == "dead_letters_failed" and error["level"] == "error"
    assert NEW_SECRET not in done.stdout + done.stderr


async def test_a_key_given_without_its_flag_is_not_echoed(tmp_path: Path) -> None:
    """argparse repeats arguments it does not know: forgetting --write-key printed the secret
    (second attack pass)."""
    config = tmp_path / "config.yaml"
    config.write_text(f"buffer:\n  path: {tmp_path / 'buffer'}\nlog:\n  format: json\n")
    done = await cli(config, "--replay", f"kid2:{NEW_SECRET}")
    assert done.returncode == 2
    assert "unrecognized arguments: kid2:***" in done.stderr
    assert NEW_SECRET not in done.stdout + done.stderr
