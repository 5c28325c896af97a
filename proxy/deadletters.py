"""`python -m proxy dead-letters`: what upstream refused for good, on a stopped proxy's buffer
(it takes the lock of every shard): `list`, `show` one, `export` its events, `replay` them into
the send queue once the cause is fixed (a rotated key, a misconfigured stream), `purge`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import parse_qsl, urlsplit

import structlog

from proxy.auth import key_id, mask_key
from proxy.buffer import Buffer, DeadLetter, DeadLetterFilter
from proxy.config import Config
from proxy.envelope import mask_shown_keys, pixel_event, pixel_query
from proxy.errors import BufferLockedError, DeadLetterError, IngestError, UsageError
from proxy.headers import CREDENTIALS
from proxy.shards import shard_dirs, stored_shards

log = structlog.get_logger("proxy")

# `dead-letters` alone lists, as it did before there were subcommands.
SUBCOMMANDS = ("list", "show", "export", "replay", "purge")
# Dead letters read at a time: list and export stream, whatever the store holds.
PAGE = 500
# A run shows progress once it passes either of these.
PROGRESS_ROWS = 1000
PROGRESS_AFTER_S = 2.0
# A seq is SQLite's INTEGER: a larger ID cannot name a dead letter (and would not bind).
MAX_SEQ = 2**63 - 1
# A status from upstream is a three-digit HTTP status.
STATUSES = range(100, 1000)
# A row's own secret is masked wherever it appears in what is shown, when it is this long: a
# shorter one would mangle ordinary text.
MIN_MASKED_SECRET = 8

T = TypeVar("T")


def split_subcommand(argv: list[str]) -> tuple[str, list[str]]:
    if argv and argv[0] in SUBCOMMANDS:
        return argv[0], argv[1:]
    return "list", argv


def add_arguments(parser: argparse.ArgumentParser, sub: str) -> None:
    if sub == "show":
        parser.add_argument("id", type=int, metavar="ID", help="its seq, as `list` shows it")
        parser.add_argument("--shard", help="the shard it is in, as `list` shows it")
        return
    parser.add_argument("--status", type=int, help="only those upstream answered with this")
    parser.add_argument("--key-id", help="only those sent with this write-key id")
    parser.add_argument("--since", help="only those that failed at or after this time")
    parser.add_argument(
        "--until", help="only those that failed before this time (ISO 8601 or unix seconds)"
    )
    parser.add_argument("--reason", help="only those whose reason contains this text (any case)")
    parser.add_argument(
        "--progress", action="store_true", help="a progress line on stderr, even off a terminal"
    )
    # Checked after parsing: argparse would quote a bad value, secret and all.
    write_key_help = "send them under this keyId:secret instead"
    if sub == "list":
        # `dead-letters --replay [--write-key K]`, from before there were subcommands.
        parser.add_argument("--replay", action="store_true", help=argparse.SUPPRESS)
        parser.add_argument("--write-key", help=argparse.SUPPRESS)
    if sub == "export":
        parser.add_argument("--output", type=Path, help="write to this file (mode 0600)")
    if sub == "replay":
        parser.add_argument("--write-key", help=write_key_help)
    if sub in ("replay", "purge"):
        parser.add_argument("--dry-run", action="store_true", help="count them, change nothing")
    if sub == "purge":
        parser.add_argument("--all", action="store_true", help="with no filter: every one")


def parse_time(flag: str, text: str) -> float:
    """Unix seconds, or ISO 8601; a time without a zone is UTC, as in the proxy's logs."""
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise UsageError(
                f"{flag}: {text!r} is neither ISO 8601 (2024-05-01T12:00:00Z) nor unix seconds"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise UsageError(f"{flag}: {text!r} is not a time")
    return value


def check_write_key(value: str) -> str:
    """A replacement key must be a full `keyId:secret` that can travel as an HTTP header value
    as is: visible ASCII only (no control characters, no spaces, nothing aiohttp would have to
    encode). The messages never quote the value: it holds the secret."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise UsageError("--write-key contains control characters")
    if not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise UsageError("--write-key must be visible ASCII only (no spaces, no accents)")
    kid, sep, secret = value.partition(":")
    if not (kid and sep and secret):
        raise UsageError("--write-key must be the full keyId:secret")
    return value


def text_arg(flag: str, value: str | None) -> str | None:
    """An argument that is matched against stored text must be text: bytes that are not UTF-8
    arrive from argv as lone surrogates, which SQLite cannot take."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{flag}: not valid UTF-8 text") from None
    return value


def selection_of(args: argparse.Namespace) -> DeadLetterFilter:
    if args.reason is not None and not args.reason:
        raise UsageError("--reason: give some text to look for")
    text_arg("--reason", args.reason)
    text_arg("--key-id", args.key_id)
    if args.status is not None and args.status not in STATUSES:
        raise UsageError(f"--status: {args.status} is no HTTP status (100-999)")
    since = None if args.since is None else parse_time("--since", args.since)
    until = None if args.until is None else parse_time("--until", args.until)
    if since is not None and until is not None and since >= until:
        raise UsageError("--since must be before --until: the window is empty")
    return DeadLetterFilter(
        status=args.status, key_id=args.key_id, since=since, until=until, reason=args.reason
    )


def run(config: Config, sub: str, args: argparse.Namespace) -> None:
    """One subcommand, start to summary; a UsageError before anything is opened."""
    if sub == "list" and args.replay:
        sub = "replay"
    elif sub == "list" and args.write_key is not None:
        raise UsageError("--write-key only applies with replay")
    command: Coroutine[Any, Any, None]
    if sub == "show":
        if not 1 <= args.id <= MAX_SEQ:
            raise UsageError(f"ID: {args.id} is no dead letter's seq (1 to {MAX_SEQ})")
        command = show(config, args.id, text_arg("--shard", args.shard))
    else:
        selection = selection_of(args)
        progress = Progress(sub, forced=args.progress)
        if sub == "list":
            command = list_command(config, selection, progress)
        elif sub == "export":
            command = export(config, selection, progress, args.output)
        elif sub == "replay":
            write_key = None if args.write_key is None else check_write_key(args.write_key)
            dry_run = getattr(args, "dry_run", False)
            command = replay_command(config, selection, progress, write_key, dry_run)
        else:
            if selection == DeadLetterFilter() and not args.all:
                raise UsageError("purge without a filter deletes every dead letter: add --all")
            command = purge(config, selection, progress, args.dry_run)
    asyncio.run(command)


# ---- the shards --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shard:
    name: str  # relative to buffer.path, "." for the first: what `list` shows
    buffer: Buffer


@contextlib.asynccontextmanager
async def opened_shards(config: Config) -> AsyncIterator[list[Shard]]:
    """Every shard's buffer (with several workers, each keeps its own), oldest shard first,
    all locked before anything is read or changed: a proxy still running on one of them stops
    the command before it did half its work."""
    base, paths = stored_shards(config.buffer.path)
    async with contextlib.AsyncExitStack() as stack:
        shards = []
        for path in paths:
            buffer = Buffer.from_config(config.buffer, path)
            try:
                await stack.enter_async_context(buffer)
            except BufferLockedError as exc:
                raise BufferLockedError(
                    f"{exc}: stop the proxy first (dead-letters works on a stopped proxy's buffer)"
                ) from None
            shards.append(Shard(str(path.relative_to(base)) if path != base else ".", buffer))
        yield shards


async def pages(shard: Shard, selection: DeadLetterFilter) -> AsyncIterator[list[DeadLetter]]:
    after = 0
    while page := await shard.buffer.dead_letter_page(selection, after, PAGE):
        yield page
        after = page[-1].seq


# ---- what a dead letter shows --------------------------------------------------------------


def metadata(shard: str, dead: DeadLetter) -> dict[str, Any]:
    """Where a dead letter is and why: never its body or headers (the events, the key)."""
    return {
        "seq": dead.seq,
        "shard": shard,
        "key_id": dead.key_id,
        "method": dead.method,
        "path": dead.path,
        "status": dead.status,
        "reason": dead.reason,
        "attempts": dead.attempts,
        "events": dead.events,
        "received_at": dead.received_at,
        "failed_at": dead.failed_at,
    }


def summary(shard: str, dead: DeadLetter, raw: bool = False) -> dict[str, Any]:
    """What `list` shows: the metadata and the events' messageIds."""
    found = events_of(dead, raw)[0]
    ids = [e["messageId"] for e in found if isinstance(e, dict) and "messageId" in e]
    return {**metadata(shard, dead), "message_ids": ids}


def masked_headers(text: str) -> dict[str, Any]:
    """The stored headers, credentials (X-Write-Key above all) as `keyId:***`."""
    try:
        headers = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(headers, dict):
        return {}
    return {
        name: mask_key(str(value)) if name.lower() in CREDENTIALS else value
        for name, value in headers.items()
    }


def body_of(dead: DeadLetter, raw: bool = False) -> Any:
    """The body parsed, with any key in it masked; None for a pixel's (empty) body, the text
    for a body that is not JSON, or with `raw` (one that JSON cannot show, see per_row)."""
    if not dead.body:
        return None
    try:
        if raw:
            raise ValueError("shown as text")
        body = json.loads(dead.body)
    except ValueError:
        return dead.body.decode("utf-8", "replace")
    if isinstance(body, dict):
        mask_shown_keys(body)
        batch = body.get("batch")
        for event in batch if isinstance(batch, list) else [body]:
            if isinstance(event, dict):
                mask_shown_keys(event)
    return body


def events_of(dead: DeadLetter, raw: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """The events the dead letter holds (a batch's one by one, a pixel's from its query), and
    what a batch holds besides them (`context`), keys masked."""
    body = body_of(dead, raw)
    if body is None:
        url = urlsplit(dead.path)
        query = pixel_query(parse_qsl(url.query, keep_blank_values=True))
        try:
            event: Any = pixel_event(query, url.path.rsplit("/", 1)[-1])
        except IngestError:  # it was valid when taken in; a type no longer known, say
            event = {
                name: values[0] if len(values) == 1 else values for name, values in query.items()
            }
        if isinstance(event, dict):
            mask_shown_keys(event)
        return [event], {}
    if isinstance(body, dict) and isinstance(body.get("batch"), list):
        return body["batch"], {k: v for k, v in body.items() if k != "batch"}
    return [body], {}


def per_row(make: Callable[[bool], T]) -> T:
    """What `make` renders of one row, or, for a body JSON cannot show (nested deeper than
    Python recurses, a NaN that would print as invalid JSON), the same with the body as text:
    one odd row must not stop a list or an export of the others."""
    try:
        return make(False)
    except (RecursionError, ValueError):
        return make(True)


def dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, allow_nan=False)


def secret_of(dead: DeadLetter) -> str | None:
    """The secret of the key the row was sent with (X-Write-Key), if long enough to mask."""
    try:
        headers = json.loads(dead.headers)
    except (ValueError, RecursionError):
        return None
    if not isinstance(headers, dict):
        return None
    for name, value in headers.items():
        if name.lower() == "x-write-key" and isinstance(value, str):
            secret = value.partition(":")[2] if ":" in value else value
            return secret if len(secret) >= MIN_MASKED_SECRET else None
    return None


def mask_secret(text: str, dead: DeadLetter) -> str:
    """`text` with the row's own secret masked wherever it sits (properties.writeKey, a
    batch's context...), besides the fields masked by name: as JSON writes it, and as is."""
    secret = secret_of(dead)
    if secret is None:
        return text
    for form in {json.dumps(secret)[1:-1], secret}:
        text = text.replace(form, "***")
    return text


# ---- the subcommands ---------------------------------------------------------------------


async def list_command(config: Config, selection: DeadLetterFilter, progress: Progress) -> None:
    async with opened_shards(config) as shards:
        for shard in shards:
            async for page in pages(shard, selection):
                for dead in page:
                    line = per_row(functools.partial(listed, shard.name, dead))
                    print(mask_secret(line, dead), flush=True)
                progress.add(rows=len(page), events=sum(d.events for d in page), shard=shard)
        progress.done()
        log.info("dead_letters_listed", **progress.counts(shards), **filters(selection))


def listed(shard: str, dead: DeadLetter, raw: bool) -> str:
    return dumps(summary(shard, dead, raw))


async def show(config: Config, seq: int, shard_name: str | None) -> None:
    async with opened_shards(config) as shards:
        names = [s.name for s in shards]
        if shard_name is not None and shard_name not in names:
            raise UsageError(f"--shard: no shard {shard_name!r}; the buffer has {names}")
        found = [
            (shard, dead)
            for shard in shards
            if shard_name in (None, shard.name)
            for dead in await shard.buffer.dead_letter_page(DeadLetterFilter(seq=seq))
        ]
    where = f"shard {shard_name}" if shard_name is not None else f"shards {', '.join(names)}"
    if not found:
        raise DeadLetterError(f"no dead letter {seq} in {where}")
    if len(found) > 1:
        raise UsageError(
            f"dead letter {seq} is in shards {', '.join(s.name for s, _ in found)}:"
            " say which with --shard"
        )
    ((shard, dead),) = found

    def shown(raw: bool) -> str:
        whole = {
            **summary(shard.name, dead, raw),
            "headers": masked_headers(dead.headers),
            "body": body_of(dead, raw),
        }
        if not dead.body:
            whole["event"] = events_of(dead, raw)[0][0]
        return dumps(whole, indent=2)

    print(mask_secret(per_row(shown), dead), flush=True)
    log.info("dead_letter_shown", seq=seq, shard=shard.name)


async def export(
    config: Config, selection: DeadLetterFilter, progress: Progress, output: Path | None
) -> None:
    """One JSON line per event, with the dead letter it is in; written as it is read."""
    async with opened_shards(config) as shards:
        # Blocking writes are fine: nothing else runs on this loop.
        with _output(output, config.buffer.path) as out:
            for shard in shards:
                async for page in pages(shard, selection):
                    events = 0
                    for dead in page:
                        text, count = per_row(functools.partial(exported, shard.name, dead))
                        out.write(mask_secret(text, dead))
                        events += count
                    out.flush()
                    progress.add(rows=len(page), events=events, shard=shard)
        progress.done()
        where = {"output": str(output)} if output is not None else {}
        log.info("dead_letters_exported", **progress.counts(shards), **filters(selection), **where)


def exported(shard: str, dead: DeadLetter, raw: bool) -> tuple[str, int]:
    """The JSON lines of a dead letter's events, each with where it is, and how many."""
    found, batch = events_of(dead, raw)
    meta = metadata(shard, dead)
    lines = []
    for index, event in enumerate(found):
        line = {**meta, "index": index, "event": event}
        if batch:
            line["batch"] = batch
        lines.append(dumps(line) + "\n")
    return "".join(lines), len(found)


async def replay_command(
    config: Config,
    selection: DeadLetterFilter,
    progress: Progress,
    write_key: str | None,
    dry_run: bool,
) -> None:
    """Back into the send queue of the shard each dead letter is in, bodies (and so their
    messageIds) unchanged: Jitsu deduplicates a copy that did arrive before."""
    async with opened_shards(config) as shards:
        await each_shard(
            shards,
            selection,
            progress,
            None if dry_run else lambda b: b.requeue_dead_letters(selection, write_key=write_key),
        )
        # The new key's id only: its secret never reaches a log line.
        new_id = {"write_key_id": key_id(write_key)} if write_key is not None else {}
        log.info(
            "dead_letters_replayed",
            **progress.counts(shards),
            dry_run=dry_run,
            **filters(selection),
            **new_id,
        )


async def replay(config: Config, selection: DeadLetterFilter, write_key: str | None = None) -> int:
    """Every shard's dead letters that `selection` picks back in the send queue; how many."""
    moved = 0
    async with opened_shards(config) as shards:
        for shard in shards:
            moved += await shard.buffer.requeue_dead_letters(selection, write_key=write_key)
    return moved


async def purge(
    config: Config, selection: DeadLetterFilter, progress: Progress, dry_run: bool
) -> None:
    """Deleted for good: they no longer count against buffer.max_dead_letter_bytes."""
    async with opened_shards(config) as shards:
        freed = await each_shard(
            shards,
            selection,
            progress,
            None if dry_run else lambda b: b.purge_dead_letters(selection),
        )
        log.info(
            "dead_letters_purged",
            **progress.counts(shards),
            bytes=freed,
            dry_run=dry_run,
            **filters(selection),
        )


async def each_shard(
    shards: list[Shard],
    selection: DeadLetterFilter,
    progress: Progress,
    act: Callable[[Buffer], Awaitable[object]] | None,
) -> int:
    """What `selection` picks in each shard, counted (for the progress line and the summary)
    and then acted on, unless `act` is None (--dry-run); the bytes they held in all."""
    held = 0
    for shard in shards:
        count = await shard.buffer.count_dead_letters(selection)
        if act is not None and count.rows:
            await act(shard.buffer)
        held += count.bytes
        progress.add(rows=count.rows, events=count.events, shard=shard)
    progress.done()
    return held


def filters(selection: DeadLetterFilter) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(selection).items() if v is not None}


@contextlib.contextmanager
def _output(path: Path | None, buffer_path: str) -> Iterator[TextIO]:
    """stdout, or the --output file; a file the export created is removed when the export
    fails (a full disk, an interrupt): a partial export must not pass for a whole one."""
    if path is None:
        yield sys.stdout
        return
    fd, created = _open_output(path, buffer_path)
    try:
        with open(fd, "w", encoding="utf-8") as out:
            yield out
    except BaseException as exc:
        if created:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, OSError):
            raise DeadLetterError(f"--output: cannot write {path}: {exc.strerror}") from None
        raise


def _open_output(path: Path, buffer_path: str) -> tuple[int, bool]:
    """The --output file opened for writing, emptied and mode 0600 (the events are the site's
    visitors' data: readable by the operator only); and whether it was created. Never a
    symbolic link, never one of the buffer's own files: the command holds the buffer open, and
    emptying its database would lose every event in it."""
    base = Path(buffer_path).absolute()
    where = Path(os.path.realpath(path.absolute().parent))
    if where == base.resolve() or base.resolve() in where.parents:
        raise UsageError(f"--output: {path} is inside buffer.path {base}: write it elsewhere")
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd, created = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            # Not emptied yet: it may be a buffer file under another name (a hard link).
            fd, created = os.open(path, flags), False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"--output: {path} is a symbolic link: name the file itself") from None
        raise UsageError(f"--output: cannot write {path}: {exc.strerror}") from None
    try:
        found = os.fstat(fd)
        if (found.st_dev, found.st_ino) in _buffer_files(base):
            raise UsageError(
                f"--output: {path} is one of the buffer's own files: write it elsewhere"
            )
        if stat.S_ISREG(found.st_mode):  # not /dev/stdout, a pipe, a terminal
            try:
                os.fchmod(fd, 0o600)
                os.ftruncate(fd, 0)
            except OSError as exc:
                raise UsageError(f"--output: cannot write {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        if created:
            path.unlink(missing_ok=True)
        raise
    return fd, created


def _buffer_files(base: Path) -> set[tuple[int, int]]:
    """(device, inode) of every file in every shard directory: databases, -wal, -shm, locks."""
    found = set()
    for _index, shard in shard_dirs(base):
        with contextlib.suppress(OSError), os.scandir(shard) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        found.add((info.st_dev, info.st_ino))
    return found


class Progress:
    """Rows and events done so far, and a line on stderr about them once a run is long (over
    PROGRESS_ROWS rows or PROGRESS_AFTER_S): on a terminal (rewritten in place), or with
    --progress (a line at most every PROGRESS_AFTER_S)."""

    def __init__(self, what: str, *, forced: bool = False, stream: TextIO | None = None) -> None:
        self.what = what
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.on = forced or self.tty
        self.rows = self.events = 0
        self._started = time.monotonic()
        self._shown_at: float | None = None

    def add(self, *, rows: int, events: int, shard: Shard) -> None:
        self.rows += rows
        self.events += events
        now = time.monotonic()
        long_run = self.rows > PROGRESS_ROWS or now - self._started > PROGRESS_AFTER_S
        if not (self.on and long_run):
            return
        every = 0.2 if self.tty else PROGRESS_AFTER_S
        if self._shown_at is not None and now - self._shown_at < every:
            return
        self._shown_at = now
        text = (
            f"dead-letters {self.what}: {self.rows} rows, {self.events} events (shard {shard.name})"
        )
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._shown_at is not None:
            self.stream.write("\n")
            self.stream.flush()

    def counts(self, shards: list[Shard]) -> dict[str, int]:
        """For the summary line: what was done, in how many shards it was looked for."""
        return {"rows": self.rows, "events": self.events, "shards": len(shards)}
