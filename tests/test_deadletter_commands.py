"""`python -m proxy dead-letters list|show|export|replay|purge` as an operator runs them: a
child process on a stopped proxy's real buffer (issue 10, "Getting events back out")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.buffer import Buffer, DeadRow, RowsSettlement
from proxy.envelope import Envelope
from tests.fakejitsu import Answer, FakeJitsu, Received
from tests.procs import KEY, ROOT, SECRET, Spawn
from tests.procs import dead_letters_cli as cli

pytestmark = pytest.mark.timeout(90)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr
    return done


def rows(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """stdout: JSON lines of data only (the log is on stderr)."""
    return [json.loads(line) for line in ok(done).stdout.splitlines()]


def logged(done: subprocess.CompletedProcess[str], event: str) -> dict[str, Any]:
    """The log line of this event on stderr (where a progress line may be too)."""
    lines = [json.loads(y) for y in done.stderr.splitlines() if y.startswith("{")]
    (line,) = [x for x in lines if x["event"] == event]
    return line


def failed(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The one error line of a failed run, and nothing on stdout, no traceback, no secret."""
    assert done.returncode == code, done.stdout + done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert SECRET not in done.stderr
    (error,) = [
        x for x in (json.loads(y) for y in done.stderr.splitlines()) if x["level"] == "error"
    ]
    assert error["event"] == "dead_letters_failed"
    return str(error["error"])


def config_for(tmp_path: Path, buffer: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"buffer:\n  path: {buffer}\nlog:\n  format: json\n")
    return config


def single(mid: str, kid: str = "kid", **extra: Any) -> Envelope:
    body = json.dumps({"type": "track", "event": "e", "messageId": mid, **extra}).encode()
    return Envelope("/api/s/s2s/track", {"X-Write-Key": f"{kid}:{SECRET}"}, body, 1, kid)


async def dead_letters(path: Path, dead: list[tuple[Envelope, int, str]]) -> list[int]:
    """Rows stored and then refused for good, through the buffer's own API."""
    async with Buffer(path, 100_000_000) as buf:
        seqs = await buf.append([env for env, _status, _reason in dead])
        await buf.settle(
            RowsSettlement(
                dead=tuple(
                    DeadRow(seq, status, reason, 1)
                    for seq, (_env, status, reason) in zip(seqs, dead, strict=True)
                )
            )
        )
    return seqs


async def test_export_then_replay_delivers_the_refused_events_with_their_message_ids(
    tmp_path: Path, upstream: FakeJitsu, spawn: Spawn
) -> None:
    """The round trip: upstream refuses a stream, the events are dead-lettered the real way,
    exported (one line per event, key masked), the cause is fixed, they are replayed and
    reach upstream with the messageIds they had, and the store is empty."""
    broken = True

    def stream_not_found(rec: Received) -> Answer | None:
        return Answer(400, {"error": "stream not found"}) if broken else None

    upstream.fault = stream_not_found
    proxy = spawn()
    proxy.start()
    await proxy.wait_ready()
    async with aiohttp.ClientSession() as s:
        for mid in ("m1", "m2"):
            # A key in the body too: what the ingest keeps of it must not come out either.
            event = {"type": "track", "event": "e", "messageId": mid, "writeKey": KEY}
            async with s.post(
                f"{proxy.url}/api/s/s2s/track", json=event, headers={"X-Write-Key": KEY}
            ) as r:
                assert r.status == 200
        batch = {"batch": [{"type": "track", "event": "e", "messageId": m} for m in ("m3", "m4")]}
        async with s.post(f"{proxy.url}/v1/batch", json=batch, headers={"X-Write-Key": KEY}) as r:
            assert r.status == 200
        await proxy.wait_state(s, lambda st: st["buffer"]["dead_letter_rows"] == 3)
    assert await proxy.terminate_async() == 0
    refused = sorted(m for r in upstream.received if r.status == 400 for m in r.message_ids)
    assert set(refused) == {"m1", "m2", "m3", "m4"}

    exported = await cli(proxy.config_path, "export")
    lines = rows(exported)
    assert sorted(line["event"]["messageId"] for line in lines) == ["m1", "m2", "m3", "m4"]
    for line in lines:
        assert line["status"] == 400 and "stream not found" in line["reason"]
        assert (line["shard"], line["key_id"]) == (".", KEY.split(":")[0])
        assert isinstance(line["seq"], int) and line["path"] in ("/api/s/s2s/track", "/v1/batch")
    (m1,) = [line for line in lines if line["event"]["messageId"] == "m1"]
    assert m1["event"]["writeKey"] == f"{KEY.split(':')[0]}:***"
    batch_lines = [line for line in lines if line["event"]["messageId"] in ("m3", "m4")]
    assert len({line["seq"] for line in batch_lines}) == 1, "one dead letter, two lines"
    assert [line["index"] for line in batch_lines] == [0, 1]
    summary = logged(exported, "dead_letters_exported")
    assert (summary["rows"], summary["events"], summary["shards"]) == (3, 4, 1)

    to_file = tmp_path / "dead.jsonl"
    ok(await cli(proxy.config_path, "export", "--output", str(to_file)))
    assert to_file.read_text() == exported.stdout
    assert stat.S_IMODE(to_file.stat().st_mode) == 0o600

    broken = False  # the stream is fixed
    replayed = await cli(proxy.config_path, "replay", "--reason", "STREAM NOT FOUND")
    summary = logged(ok(replayed), "dead_letters_replayed")
    assert (summary["rows"], summary["events"], summary["dry_run"]) == (3, 4, False)
    assert rows(await cli(proxy.config_path, "list")) == [], "nothing left dead"

    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: {"m1", "m2", "m3", "m4"} <= set(f.taken_ids()))
    assert sorted(upstream.taken_ids()) == refused, "the same messageIds, not new ones"
    assert await proxy.terminate_async() == 0
    async with Buffer(tmp_path / "buffer", 100_000_000) as buf:
        assert (buf.rows, buf.dead_rows, buf.dead_bytes) == (0, 0, 0)


async def test_list_filters_by_reason_text_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    await dead_letters(
        path,
        [
            (single("a"), 400, "event error: Stream not found"),
            (single("b"), 400, "Événement refusé: 100% quota"),
            (single("c"), 403, "forbidden"),
        ],
    )
    config = config_for(tmp_path, path)
    listed = rows(await cli(config, "--reason", "stream NOT"))
    assert [r["message_ids"] for r in listed] == [["a"]]
    assert set(listed[0]) >= {"seq", "shard", "status", "reason", "key_id", "path", "failed_at"}
    assert "body" not in listed[0] and "headers" not in listed[0]
    assert [r["message_ids"] for r in rows(await cli(config, "list", "--reason", "ÉVÉNEMENT"))] == [
        ["b"]
    ]
    # The operator's text is text: % is no wildcard.
    assert [r["message_ids"] for r in rows(await cli(config, "list", "--reason", "0%"))] == [["b"]]
    assert [r["message_ids"] for r in rows(await cli(config, "list", "--reason", "%"))] == [["b"]]
    both = rows(await cli(config, "list", "--reason", "o", "--status", "403"))
    assert [r["message_ids"] for r in both] == [["c"]]


async def test_show_one_dead_letter_in_full_with_the_key_masked(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    seq, _ = await dead_letters(
        path,
        [
            (single("a", writeKey=f"kid:{SECRET}"), 400, "event error: bad"),
            (single("b"), 400, "event error: bad"),
        ],
    )
    config = config_for(tmp_path, path)
    done = ok(await cli(config, "show", str(seq)))
    shown = json.loads(done.stdout)
    assert (shown["seq"], shown["shard"], shown["status"]) == (seq, ".", 400)
    assert shown["reason"] == "event error: bad"
    assert shown["headers"] == {"X-Write-Key": "kid:***"}
    assert shown["body"] == {
        "type": "track",
        "event": "e",
        "messageId": "a",
        "writeKey": "kid:***",
    }

    assert "no dead letter 999" in failed(await cli(config, "show", "999"), 1)
    assert "no shard" in failed(await cli(config, "show", str(seq), "--shard", "shard-7"), 2)
    not_a_number = await cli(config, "show", "first")
    assert not_a_number.returncode == 2 and "invalid int value" in not_a_number.stderr


@pytest.mark.parametrize("config_first", [["--config", "{c}"], ["--config={c}"]])
async def test_the_command_may_follow_the_config_as_the_images_entrypoint_puts_it(
    tmp_path: Path, config_first: list[str]
) -> None:
    """The image's ENTRYPOINT is `jitsu-edge-proxy --config ...`: `docker run IMAGE
    dead-letters list` arrives as `--config PATH dead-letters list`."""
    path = tmp_path / "buffer"
    [seq] = await dead_letters(path, [(single("a"), 400, "event error: bad")])
    config = config_for(tmp_path, path)
    argv = [a.format(c=config) for a in config_first]
    done = ok(
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy", *argv, "dead-letters", "list", "--status", "400"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    )
    assert [row["seq"] for row in rows(done)] == [seq]


async def test_purge_needs_a_filter_or_all_and_frees_the_dead_letter_bytes(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    await dead_letters(
        path,
        [
            (single("a", "old"), 401, "stream not found"),
            (single("b", "old"), 401, "stream not found"),
            (single("c", "kid"), 400, "event error: bad"),
        ],
    )
    config = config_for(tmp_path, path)
    async with Buffer(path, 100_000_000) as buf:
        before = (buf.dead_rows, buf.dead_bytes)

    assert "--all" in failed(await cli(config, "purge"), 2)
    dry = logged(
        ok(await cli(config, "purge", "--key-id", "old", "--dry-run")), "dead_letters_purged"
    )
    assert (dry["rows"], dry["events"], dry["dry_run"]) == (2, 2, True)
    async with Buffer(path, 100_000_000) as buf:
        assert (buf.dead_rows, buf.dead_bytes) == before, "a dry run changes nothing"

    done = logged(ok(await cli(config, "purge", "--key-id", "old")), "dead_letters_purged")
    assert (done["rows"], done["bytes"], done["dry_run"]) == (2, dry["bytes"], False)
    assert [r["message_ids"] for r in rows(await cli(config))] == [["c"]]
    async with Buffer(path, 100_000_000) as buf:
        assert (buf.dead_rows, buf.dead_bytes) == (1, before[1] - done["bytes"])

    ok(await cli(config, "purge", "--all"))
    async with Buffer(path, 100_000_000) as buf:
        assert (buf.rows, buf.dead_rows, buf.dead_bytes) == (0, 0, 0)


async def test_replay_dry_run_counts_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    await dead_letters(path, [(single("a"), 401, "x"), (single("b"), 400, "y")])
    config = config_for(tmp_path, path)
    dry = logged(
        ok(await cli(config, "replay", "--dry-run", "--status", "401")), "dead_letters_replayed"
    )
    assert (dry["rows"], dry["events"], dry["dry_run"], dry["status"]) == (1, 1, True, 401)
    async with Buffer(path, 100_000_000) as buf:
        assert (buf.rows, buf.dead_rows) == (0, 2)


async def test_every_shard_of_a_workers_buffer(tmp_path: Path) -> None:
    """With workers, buffer.path and buffer.path/shard-N each hold dead letters, whose seqs
    may be the same: each command covers them all and says which shard a row is in."""
    path = tmp_path / "buffer"
    (seq0,) = await dead_letters(path, [(single("a", "k0"), 400, "bad")])
    (seq1,) = await dead_letters(path / "shard-1", [(single("b", "k1"), 400, "bad")])
    assert seq0 == seq1
    config = config_for(tmp_path, path)

    listed = rows(await cli(config, "list"))
    assert [(r["shard"], r["message_ids"]) for r in listed] == [(".", ["a"]), ("shard-1", ["b"])]
    assert "say which with --shard" in failed(await cli(config, "show", str(seq0)), 2)
    shown = json.loads(ok(await cli(config, "show", str(seq1), "--shard", "shard-1")).stdout)
    assert shown["body"]["messageId"] == "b"
    exported = rows(await cli(config, "export"))
    assert [(e["shard"], e["event"]["messageId"]) for e in exported] == [
        (".", "a"),
        ("shard-1", "b"),
    ]
    dry = logged(ok(await cli(config, "replay", "--dry-run")), "dead_letters_replayed")
    assert (dry["rows"], dry["shards"]) == (2, 2)

    ok(await cli(config, "purge", "--key-id", "k1"))
    ok(await cli(config, "replay"))
    async with Buffer(path, 100_000_000) as buf:
        assert (buf.rows, buf.dead_rows) == (1, 0)
    async with Buffer(path / "shard-1", 100_000_000) as buf:
        assert (buf.rows, buf.dead_rows) == (0, 0)


async def test_a_running_proxy_is_named_and_nothing_is_changed(tmp_path: Path) -> None:
    """Every shard is locked before anything changes: a worker still holding shard-1 stops a
    replay before it touched the first shard."""
    path = tmp_path / "buffer"
    await dead_letters(path, [(single("a"), 400, "bad")])
    await dead_letters(path / "shard-1", [(single("b"), 400, "bad")])
    config = config_for(tmp_path, path)
    async with Buffer(path / "shard-1", 100_000_000):  # the lock a running worker holds
        error = failed(await cli(config, "replay"), 1)
        assert "in use by another process" in error and "stop the proxy first" in error
    async with Buffer(path, 100_000_000) as buf:
        assert (buf.rows, buf.dead_rows) == (0, 1)


async def test_a_long_run_shows_progress_on_request_and_a_summary(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    await dead_letters(path, [(single(f"m{i}"), 400, "bad") for i in range(1200)])
    config = config_for(tmp_path, path)

    quiet = ok(await cli(config, "export", "--output", str(tmp_path / "out.jsonl")))
    assert "dead-letters export:" not in quiet.stderr, "stderr is no terminal"
    shown = ok(await cli(config, "export", "--output", str(tmp_path / "out.jsonl"), "--progress"))
    progress = [x for x in shown.stderr.splitlines() if x.startswith("dead-letters export:")]
    assert progress == ["dead-letters export: 1200 rows, 1200 events (shard .)"], "not per row"
    assert logged(shown, "dead_letters_exported")["events"] == 1200
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1200


def stderr_on_a_terminal(config: Path, *args: str) -> str:
    """What the command writes on stderr when stderr is a terminal (a pseudo-terminal here)."""
    master, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "dead-letters", *args, "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            timeout=60,
            check=False,
        )
    finally:
        os.close(terminal)
    written = b""
    with contextlib.suppress(OSError):  # EIO once everything written was read
        while chunk := os.read(master, 65536):
            written += chunk
    os.close(master)
    assert done.returncode == 0, written
    return written.decode()


async def test_a_terminal_gets_the_progress_line_unasked(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    await dead_letters(path, [(single(f"m{i}"), 400, "bad") for i in range(1200)])
    config = config_for(tmp_path, path)
    written = await asyncio.to_thread(stderr_on_a_terminal, config, "list")
    # Rewritten in place, and the line ended before the summary.
    assert "\rdead-letters list: 1200 rows, 1200 events (shard .)\x1b[K\r\n" in written
    assert written.count("dead-letters list:") == 1


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["list", "--status", "bad"], "dead-letters list: error: argument --status: invalid int"),
        (["purge", "--status", "4x"], "dead-letters purge: error: argument --status: invalid int"),
        (["export", "--since", "2024-05-02", "--until", "2024-05-01"], "--since must be before"),
        (["list", "--reason", ""], "--reason: give some text"),
        (["replay", "--write-key", f"nokeyid{SECRET}"], "must be the full keyId:secret"),
        (["frobnicate"], "dead-letters list: error: unrecognized arguments: frobnicate"),
        (["export", "--output", "/nonexistent/dir/x"], "--output: cannot write"),
    ],
)
async def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], why: str) -> None:
    config = config_for(tmp_path, tmp_path / "buffer")
    done = await cli(config, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert why in done.stderr and SECRET not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
