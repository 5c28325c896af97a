"""The offline commands (`dead-letters`, `salvage`) against what an operator's shell, a running
supervisor or a damaged row throws at them: the buffer is never harmed, a failure is one line
(issue 10, attack pass on `dead-letters`)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.buffer import DB_NAME, Buffer
from proxy.config import build_config
from proxy.envelope import Envelope
from proxy.errors import ConfigError
from proxy.shards import SUPERVISOR_LOCK
from tests.procs import KEY, ROOT, SECRET, refused_start
from tests.procs import dead_letters_cli as cli
from tests.test_deadletter_commands import config_for, dead_letters, failed, ok, rows, single

pytestmark = pytest.mark.timeout(90)


def command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "dead-letters", *args, "--config", str(config)]


def error_line(done: subprocess.CompletedProcess[str], code: int, event: str) -> str:
    """The one error line of a run that failed with `code` (dead-letters logs on stderr,
    salvage on stdout): no traceback, no secret."""
    written = (done.stdout or "") + done.stderr
    assert done.returncode == code, written
    assert "Traceback" not in written and SECRET not in written
    lines = [json.loads(y) for y in written.splitlines() if y.startswith("{")]
    (line,) = [x for x in lines if x["level"] == "error"]
    assert line["event"] == event
    return str(line["error"])


async def counts(path: Path) -> tuple[int, int]:
    async with Buffer(path, 100_000_000) as buf:
        return buf.rows, buf.dead_rows


# ---- --output ------------------------------------------------------------------------------


async def test_export_never_writes_over_the_buffers_own_files(tmp_path: Path) -> None:
    """The command holds the buffer open: an --output naming its database (by name, through a
    hard link elsewhere, or any file inside buffer.path) is refused before it is emptied."""
    path = tmp_path / "buffer"
    await dead_letters(path, [(single("a"), 400, "bad")])
    await dead_letters(path / "shard-1", [(single("b"), 400, "bad")])
    config = config_for(tmp_path, path)
    db = path / DB_NAME
    size = db.stat().st_size
    os.link(db, tmp_path / "looks-harmless.jsonl")
    error = failed(
        await cli(config, "export", "--output", str(tmp_path / "looks-harmless.jsonl")), 2
    )
    assert "one of the buffer's own files" in error
    inside = (db, path / "shard-1" / DB_NAME, path / "proxy.lock", path / "new.jsonl")
    for target in (*inside, path / "shard-1" / "x.jsonl"):
        error = failed(await cli(config, "export", "--output", str(target)), 2)
        assert "inside buffer.path" in error
    assert not (path / "new.jsonl").exists() and not (path / "shard-1" / "x.jsonl").exists()
    assert db.stat().st_size == size
    assert [r["message_ids"] for r in rows(await cli(config, "list"))] == [["a"], ["b"]]


async def test_export_output_is_private_and_never_a_symbolic_link(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    await dead_letters(path, [(single("a"), 400, "bad")])
    config = config_for(tmp_path, path)
    existing = tmp_path / "existing.jsonl"
    existing.write_text("old content that is longer than the export will be\n" * 100)
    existing.chmod(0o644)
    ok(await cli(config, "export", "--output", str(existing)))
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert [json.loads(x)["event"]["messageId"] for x in existing.read_text().splitlines()] == ["a"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not yours\n")
    elsewhere.chmod(0o644)
    (tmp_path / "link.jsonl").symlink_to(elsewhere)
    assert "symbolic link" in failed(
        await cli(config, "export", "--output", str(tmp_path / "link.jsonl")), 2
    )
    assert elsewhere.read_text() == "not yours\n"
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o644


async def test_a_full_disk_is_one_line_and_leaves_no_partial_export(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    await dead_letters(path, [(single(f"m{i}"), 400, "bad") for i in range(1200)])
    config = config_for(tmp_path, path)

    done = await cli(config, "export", "--output", "/dev/full")
    assert "No space left on device" in error_line(done, 1, "dead_letters_failed")

    def on_full_stdout() -> subprocess.CompletedProcess[str]:
        with open("/dev/full", "w") as full:
            return subprocess.run(
                command(config, "list"),
                cwd=ROOT,
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                check=False,
            )

    done = await asyncio.to_thread(on_full_stdout)
    assert "cannot write to stdout" in error_line(done, 1, "dead_letters_failed")

    def small_files_only() -> None:
        # A disk that fills after 64 KiB: writes past it fail (EFBIG) instead of a signal.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    out = tmp_path / "out.jsonl"
    done = await asyncio.to_thread(
        subprocess.run,
        command(config, "export", "--output", str(out)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=small_files_only,
    )
    assert f"cannot write {out}" in error_line(done, 1, "dead_letters_failed")
    assert not out.exists(), "a partial export it created is removed"
    assert await counts(path) == (0, 1200)


# ---- the supervisor, the config ------------------------------------------------------------


@contextlib.contextmanager
def supervisor_running(path: Path) -> Iterator[None]:
    """The lock a supervisor of several workers holds on buffer.path for its whole life, also
    while it waits to restart a worker (when no shard's own lock is held)."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


async def test_a_supervisor_between_two_workers_stops_every_offline_command(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer"
    await dead_letters(path, [(single("a"), 400, "bad")])
    config = config_for(tmp_path, path)
    cfg = str(config)
    with supervisor_running(path):
        for args in (["replay"], ["purge", "--all"], ["list"]):
            error = failed(await cli(config, *args), 1)
            assert "in use by another process: stop the proxy first" in error
        salvage = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy", "salvage", str(tmp_path / "q.db"), "--config", cfg],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        error = error_line(salvage, 1, "salvage_failed")
        assert "in use by another process: stop the proxy first" in error
    assert await counts(path) == (0, 1)
    ok(await cli(config, "replay"))
    assert await counts(path) == (1, 0)


async def test_the_offline_commands_do_not_need_the_upstream_tls_files(tmp_path: Path) -> None:
    """They never talk to upstream; the server start still refuses a TLS file it cannot read."""
    path = tmp_path / "buffer"
    await dead_letters(path, [(single("a"), 400, "bad")])
    config = tmp_path / "config.yaml"
    config.write_text(
        f"buffer:\n  path: {path}\nlog:\n  format: json\n"
        "upstream:\n  url: https://jitsu.internal\n  ca_file: /nonexistent/ca.pem\n"
    )
    assert [r["message_ids"] for r in rows(await cli(config, "list"))] == [["a"]]
    assert "upstream.ca_file: cannot read" in refused_start(config)


def test_an_unparsable_egress_proxy_is_a_config_error_without_its_password() -> None:
    upstream = {"upstream": {"trust_env": True}}
    with pytest.raises(ConfigError, match="HTTPS_PROXY") as exc:
        build_config(upstream, {"HTTPS_PROXY": "http://u:pa55word@[::1"})
    assert "pa55word" not in str(exc.value)


# ---- arguments and pipes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["list", "--status", "99999999999999999999999"], "--status: 99999999999999999999999"),
        (["purge", "--status", "-1"], "is no HTTP status"),
        (["show", "99999999999999999999999"], "is no dead letter's seq"),
        (["show", "0"], "is no dead letter's seq"),
        # Bytes that are not UTF-8 in argv arrive as lone surrogates.
        (["list", "--reason", "caf\udce9"], "--reason: not valid UTF-8"),
        (["replay", "--key-id", "k\udcff"], "--key-id: not valid UTF-8"),
    ],
)
async def test_out_of_range_and_undecodable_arguments_are_usage_errors(
    tmp_path: Path, args: list[str], why: str
) -> None:
    path = tmp_path / "buffer"
    await dead_letters(path, [(single("a"), 400, "bad")])
    assert why in failed(await cli(config_for(tmp_path, path), *args), 2)
    assert await counts(path) == (0, 1)


async def test_a_reader_that_goes_away_ends_the_list_quietly(tmp_path: Path) -> None:
    """`dead-letters list | head -1`."""
    path = tmp_path / "buffer"
    await dead_letters(path, [(single(f"m{i}"), 400, "bad") for i in range(1200)])
    config = config_for(tmp_path, path)

    def head_1() -> tuple[int, str]:
        with subprocess.Popen(
            command(config, "list"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            assert json.loads(proc.stdout.readline())["message_ids"] == ["m0"]
            proc.stdout.close()
            err = proc.stderr.read().decode()
            return proc.wait(timeout=60), err

    code, err = await asyncio.to_thread(head_1)
    assert code in (0, 1), err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


async def test_an_interrupt_says_so_in_one_line(tmp_path: Path) -> None:
    """Ctrl-C: what was committed stays so, and the line says where to look; exit 130. Here
    the export waits on a named pipe no one reads yet, so that it is surely mid-run."""
    path = tmp_path / "buffer"
    await dead_letters(path, [(single("a"), 400, "bad")])
    config = config_for(tmp_path, path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def interrupted() -> tuple[int, str]:
        with subprocess.Popen(
            command(config, "export", "--output", str(fifo)),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            # Its own session: a test run's Ctrl-C handling is not inherited as "ignored".
            start_new_session=True,
        ) as proc:
            assert proc.stderr is not None
            err = b""
            while b'"buffer_opened"' not in err:  # asyncio's SIGINT handler is in place
                line = proc.stderr.readline()
                assert line, err
                err += line
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the open go on
            try:
                err += proc.stderr.read()
                return proc.wait(timeout=60), err.decode()
            finally:
                os.close(reader)

    code, err = await asyncio.to_thread(interrupted)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [json.loads(y) for y in err.splitlines() if y.startswith("{")]
    (line,) = [x for x in lines if x["level"] == "error"]
    assert line["event"] == "dead_letters_interrupted"
    assert "`dead-letters list` shows what is left" in line["error"]
    assert await counts(path) == (0, 1)


# ---- what the rows hold --------------------------------------------------------------------


def plant(db: Path, rows: list[tuple[int, Any, bytes, Any]]) -> None:
    """Rows written by other hands than the proxy's: (seq, headers, body, reason)."""
    conn = sqlite3.connect(db)
    now = time.time()
    for seq, headers, body, reason in rows:
        conn.execute(
            "INSERT INTO dead_letter (seq, received_at, key_id, path, headers, body, size,"
            " events, failed_at, status, reason, attempts, method)"
            " VALUES (?, ?, 'kid', '/api/s/s2s/track', ?, ?, ?, 1, ?, 400, ?, 1, 'POST')",
            (seq, now, headers, body, len(body) + 100, now, reason),
        )
    conn.commit()
    conn.close()


async def test_one_odd_row_does_not_stop_the_others(tmp_path: Path) -> None:
    """A reason that is not UTF-8, a body nested deeper than Python recurses, a NaN: each row
    is shown as well as it can be (the body as text), and the next rows follow."""
    path = tmp_path / "buffer"
    (first,) = await dead_letters(path, [(single("first"), 400, "bad")])
    headers = json.dumps({"X-Write-Key": KEY})
    deep = b"[" * 200_000 + b"]" * 200_000
    plant(
        path / DB_NAME,
        [
            (first + 1, headers, b'{"messageId":"utf8"}', b"event error: \xff\xfe stream"),
            (first + 2, headers, deep, "deep"),
            (first + 3, headers, f'{{"x": NaN, "k": "{SECRET}"}}'.encode(), "nan"),
            (first + 4, headers, b'{"messageId":"last"}', "bad"),
        ],
    )
    with sqlite3.connect(path / DB_NAME) as conn:  # text not UTF-8, as a damaged row has it
        conn.execute(
            "UPDATE dead_letter SET reason = CAST(X'6576656E74FF' AS TEXT) WHERE seq = ?",
            (first + 1,),
        )
    config = config_for(tmp_path, path)

    def strict(text: str) -> Any:
        def no_constant(name: str) -> None:
            raise AssertionError(f"{name} is not JSON")

        return json.loads(text, parse_constant=no_constant)

    listed = [strict(x) for x in ok(await cli(config, "list")).stdout.splitlines()]
    assert [r["seq"] for r in listed] == [first + n for n in range(5)]
    assert listed[1]["reason"] == "event\ufffd"
    assert listed[4]["message_ids"] == ["last"]
    assert [r["seq"] for r in rows(await cli(config, "list", "--reason", "EVENT"))] == [first + 1]

    exported = [strict(x) for x in ok(await cli(config, "export")).stdout.splitlines()]
    assert [e["seq"] for e in exported] == [first + n for n in range(5)]
    assert exported[2]["event"] == deep.decode()
    assert exported[3]["event"] == '{"x": NaN, "k": "***"}'
    assert exported[4]["event"]["messageId"] == "last"
    for seq in range(first, first + 5):
        shown = strict(ok(await cli(config, "show", str(seq))).stdout)
        assert shown["seq"] == seq and shown["headers"]["X-Write-Key"].endswith(":***")


async def test_the_rows_own_secret_is_masked_wherever_it_sits(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    batch = {
        "batch": [{"type": "track", "messageId": "b1", "properties": {"note": f"key {KEY}"}}],
        "context": {"writeKey": KEY, "library": {"token": SECRET}},
    }
    await dead_letters(
        path,
        [
            (single("s1", properties={"writeKey": KEY, "copy": [SECRET]}), 400, "bad"),
            (
                Envelope("/v1/batch", {"X-Write-Key": KEY}, json.dumps(batch).encode(), 1, "kid"),
                400,
                f"rejected key {KEY}",
            ),
        ],
    )
    config = config_for(tmp_path, path)
    exported = rows(await cli(config, "export"))  # no SECRET anywhere, ok() checks
    kid = KEY.split(":")[0]
    assert exported[0]["event"]["properties"] == {"writeKey": f"{kid}:***", "copy": ["***"]}
    assert exported[1]["batch"]["context"]["library"] == {"token": "***"}
    for seq in (exported[0]["seq"], exported[1]["seq"]):
        ok(await cli(config, "show", str(seq)))
    ok(await cli(config, "list"))
