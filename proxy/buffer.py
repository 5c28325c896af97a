"""The durable on-disk buffer: SQLite in WAL mode, one row per upstream request, group commit.

A row is written (and fsynced, by default) before the client gets its 2xx, and leaves only when
upstream accepted it or it moved to the dead-letter table, in one transaction. Anything still in
the table after a crash is, by definition, undelivered and is sent again (at least once).
Design: ../shared/docs/research/reliability.md §4.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import structlog

from proxy.auth import key_id as key_id_of
from proxy.config import BufferConfig
from proxy.envelope import Envelope, replace_surrogates
from proxy.errors import BufferClosedError, BufferError_, BufferFullError, BufferLockedError

log = structlog.get_logger("proxy.buffer")

T = TypeVar("T")

DB_NAME = "buffer.db"
LOCK_NAME = "proxy.lock"
SCHEMA_VERSION = 4
APPLICATION_ID = 0x4A545355  # "JTSU"
# Most operations one transaction may carry; bounds commit latency under a burst.
MAX_GROUP = 1024
# A dead letter's reason is kept to this many characters (upstream chooses its length).
MAX_REASON_CHARS = 2048
# What a dead letter counts against buffer.max_dead_letter_bytes: its row and its reason.
DEAD_SIZE = "size + length(CAST(reason AS BLOB))"
# SQL function: is the second text in the first, whatever the case (SQLite's own lower() and
# LIKE fold ASCII only, and LIKE would read % and _ in an operator's text as wildcards).
CONTAINS_FOLDED = "contains_folded"

# The salvage ledger: every row copied in from a quarantined file, by its (received_at, seq)
# there, so that a second run (after a full buffer, or by mistake) copies nothing twice, even
# once the first run's rows were forwarded and deleted. Why rows and not a file: salvage.py.
SALVAGED_TABLE = """
CREATE TABLE IF NOT EXISTS salvaged (
    received_at REAL    NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (received_at, seq)
) WITHOUT ROWID;
"""

# Each step takes the schema from version N to N + 1, in one transaction with the version bump.
MIGRATIONS = {
    # v2: the pixel route forwards GET requests.
    1: (
        "ALTER TABLE events ADD COLUMN method TEXT NOT NULL DEFAULT 'POST';"
        "ALTER TABLE dead_letter ADD COLUMN method TEXT NOT NULL DEFAULT 'POST';"
    ),
    # v3: `size` counts everything stored for a row (Envelope.stored_size), not just the body.
    2: "".join(
        f"UPDATE {table} SET size = length(body) + length(CAST(path AS BLOB))"
        " + length(CAST(headers AS BLOB)) + length(CAST(key_id AS BLOB)) + 64;"
        for table in ("events", "dead_letter")
    ),
    # v4: salvage remembers what it copied.
    3: SALVAGED_TABLE,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL    NOT NULL,
    key_id      TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    headers     TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    size        INTEGER NOT NULL,
    events      INTEGER NOT NULL,
    method      TEXT    NOT NULL DEFAULT 'POST'
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq         INTEGER PRIMARY KEY,
    received_at REAL    NOT NULL,
    key_id      TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    headers     TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    size        INTEGER NOT NULL,
    events      INTEGER NOT NULL,
    failed_at   REAL    NOT NULL,
    status      INTEGER,
    reason      TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    method      TEXT    NOT NULL DEFAULT 'POST'
);
"""
# A fresh file gets every table the migrations add, from the same text.
SCHEMA += SALVAGED_TABLE


@dataclasses.dataclass(frozen=True)
class Row:
    seq: int
    received_at: float
    key_id: str
    path: str
    headers: dict[str, str]
    body: bytes
    size: int
    events: int
    method: str = "POST"
    # Why this row cannot be sent as stored (its headers do not decode), else None.
    problem: str | None = None

    @classmethod
    def committed(cls, env: Envelope, seq: int) -> Row:
        """The row `append` just stored as `seq` for `env`, without reading it back."""
        return cls(
            seq,
            time.time(),
            env.key_id,
            env.path,
            env.headers,
            env.body,
            env.stored_size,
            env.events,
            env.method,
        )


@dataclasses.dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters a listing or a replay is about; a field left None matches any row.
    Times are on `failed_at`, as a half-open window [since, until), so windows do not overlap."""

    status: int | None = None
    key_id: str | None = None
    since: float | None = None
    until: float | None = None
    # A piece of the stored reason, any case ("stream not found").
    reason: str | None = None
    seq: int | None = None

    def sql(self) -> tuple[str, tuple[Any, ...]]:
        clauses: list[str] = []
        params: list[Any] = []
        for value, clause in (
            (self.status, "status = ?"),
            (self.key_id, "key_id = ?"),
            (self.since, "failed_at >= ?"),
            (self.until, "failed_at < ?"),
            (self.reason, f"{CONTAINS_FOLDED}(CAST(reason AS BLOB), ?)"),
            (self.seq, "seq = ?"),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why upstream refused a row for good, as the dead-letter table keeps it."""

    failed_at: float
    status: int | None
    reason: str
    attempts: int


@dataclasses.dataclass(frozen=True)
class SalvagedRow:
    """A row read back from a quarantined buffer file: its (received_at, seq) there, which the
    ledger remembers, what it holds, and, for a dead letter, why it failed."""

    received_at: float
    seq: int
    envelope: Envelope
    failure: Failure | None = None


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """How one write changed what the buffer holds."""

    rows: int = 0
    bytes: int = 0
    events: int = 0
    dead_rows: int = 0
    dead_bytes: int = 0


class Write(abc.ABC):
    """A typed write: applied inside the writer's transaction (grouped with others, or alone
    if the group fails), it returns the change in occupancy that the buffer then books."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def apply(self, conn: sqlite3.Connection) -> Occupancy: ...


@dataclasses.dataclass(frozen=True)
class Piece:
    """Some events of a stored row, as a body of their own (a batch of just those events)."""

    body: bytes
    events: int
    reason: str = ""  # why upstream refused them, for a piece that is dead-lettered


@dataclasses.dataclass(frozen=True)
class RowSettlement(Write):
    """What became of a row's events, event by event, in one transaction: the row keeps only
    `keep` (same seq, same place in the queue; deleted when None), `more` pieces join the
    queue as rows of their own (a split), each `dead` piece becomes a dead letter of its own.
    A crash leaves either the row as it was or all of this, so an event is never lost and
    never both sent again and dead-lettered. Every new row keeps the row's path, headers, key
    and `received_at`; sizes keep the row's own accounting (Envelope.stored_size) with the
    new body's length."""

    kind: ClassVar[str] = "settle"

    seq: int
    keep: Piece | None
    more: tuple[Piece, ...] = ()
    dead: tuple[Piece, ...] = ()
    status: int | None = None
    attempts: int = 1

    def apply(self, conn: sqlite3.Connection) -> Occupancy:
        found = conn.execute(
            "SELECT size, length(body), events FROM events WHERE seq = ?", (self.seq,)
        ).fetchone()
        if found is None:
            return Occupancy()  # settled already: nothing to take apart
        size, body_size, events = found
        base = size - body_size  # what the row costs besides its body
        rows = added = added_events = dead_rows = dead_bytes = 0
        for piece in self.more:
            self._copy(conn, piece, base)
            rows += 1
            added += base + len(piece.body)
            added_events += piece.events
        now = time.time()
        for piece in self.dead:
            # Into dead_letter through events, so that its seq comes from events'
            # AUTOINCREMENT (as salvage does) and collides with no row nor dead letter.
            seq = self._copy(conn, piece, base)
            reason = stored_reason(piece.reason)
            conn.execute(
                "INSERT INTO dead_letter (seq, received_at, key_id, path, headers, body, size,"
                " events, failed_at, status, reason, attempts, method)"
                " SELECT seq, received_at, key_id, path, headers, body, size, events, ?, ?, ?,"
                " ?, method FROM events WHERE seq = ?",
                (now, self.status, reason, self.attempts, seq),
            )
            conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
            dead_rows += 1
            dead_bytes += base + len(piece.body) + len(reason.encode("utf-8"))
        if self.keep is None:
            conn.execute("DELETE FROM events WHERE seq = ?", (self.seq,))
            rows -= 1
            added -= size
            added_events -= events
        else:
            conn.execute(
                "UPDATE events SET body = ?, size = ?, events = ? WHERE seq = ?",
                (self.keep.body, base + len(self.keep.body), self.keep.events, self.seq),
            )
            added += len(self.keep.body) - body_size
            added_events += self.keep.events - events
        return Occupancy(rows, added, added_events, dead_rows, dead_bytes)

    def _copy(self, conn: sqlite3.Connection, piece: Piece, base: int) -> int:
        """A new row: this row with the piece's body. Returns its seq."""
        cur = conn.execute(
            "INSERT INTO events (received_at, key_id, path, headers, body, size, events, method)"
            " SELECT received_at, key_id, path, headers, ?, ?, ?, method FROM events WHERE seq = ?",
            (piece.body, base + len(piece.body), piece.events, self.seq),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid


@dataclasses.dataclass(frozen=True)
class DeadRow:
    """A row upstream refused for good, and why."""

    seq: int
    status: int | None
    reason: str
    attempts: int


@dataclasses.dataclass(frozen=True)
class RowsSettlement(Write):
    """Rows that went upstream in one request (single events sent together: proxy.coalesce),
    settled in one transaction: `delivered` leave the buffer, each of `dead` becomes a dead
    letter with its own reason. One operation for the writer, however many rows."""

    kind: ClassVar[str] = "settle_rows"

    delivered: tuple[int, ...] = ()
    dead: tuple[DeadRow, ...] = ()

    def apply(self, conn: sqlite3.Connection) -> Occupancy:
        rows = size = events = dead_rows = dead_bytes = 0
        for seq in self.delivered:
            found = _delete_row(conn, seq)
            if found is not None:
                rows, size, events = rows - 1, size - found[0], events - found[1]
        for dead in self.dead:
            moved = _dead_letter_row(conn, dead)
            if moved is not None:
                rows, size, events = rows - 1, size - moved[0], events - moved[1]
                dead_rows, dead_bytes = dead_rows + 1, dead_bytes + moved[2]
        return Occupancy(rows, size, events, dead_rows, dead_bytes)


@dataclasses.dataclass(frozen=True)
class DeadLetterPurge(Write):
    """Dead letters deleted for good (`dead-letters purge`): they no longer count against
    buffer.max_dead_letter_bytes."""

    kind: ClassVar[str] = "purge_dead"

    selection: DeadLetterFilter

    def apply(self, conn: sqlite3.Connection) -> Occupancy:
        where, params = self.selection.sql()
        rows, size = conn.execute(
            f"SELECT count(*), coalesce(sum({DEAD_SIZE}), 0) FROM dead_letter {where}", params
        ).fetchone()
        conn.execute(f"DELETE FROM dead_letter {where}", params)
        return Occupancy(dead_rows=-rows, dead_bytes=-size)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One dead letter whole, as `dead-letters show` and `export` read it: `headers` is the
    stored JSON text, write key and all, for the caller to mask."""

    seq: int
    received_at: float
    failed_at: float
    key_id: str
    method: str
    path: str
    headers: str
    body: bytes
    events: int
    status: int | None
    reason: str
    attempts: int


@dataclasses.dataclass(frozen=True)
class DeadLetterCount:
    rows: int = 0
    events: int = 0
    bytes: int = 0  # what they count against buffer.max_dead_letter_bytes


@dataclasses.dataclass
class _Op:
    kind: str  # insert | delete | dead_letter | requeue | salvage | trim_dead | Write.kind
    args: Any
    future: asyncio.Future[Any]


class Buffer:
    """Owns the buffer directory: its lock, its database, and the single writer."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        *,
        fsync: bool = True,
        min_free_bytes: int = 0,
        max_dead_letter_bytes: int = 1 << 62,
        lock_wait_s: float = 0.0,
    ) -> None:
        # Absolute once, so that a later change of working directory moves nothing.
        self.dir = Path(path).absolute()
        self.max_bytes = max_bytes
        self.max_dead_letter_bytes = max_dead_letter_bytes
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        # How long open() waits for a lock another process holds: a worker's predecessor may
        # still be draining the shard (its supervisor was killed).
        self.lock_wait_s = lock_wait_s
        self.rows = 0
        self.bytes = 0
        self.events = 0
        self.dead_rows = 0
        self.dead_bytes = 0
        # When the row at the head of the send queue (the first by seq) was received; None
        # while the buffer is empty. Looked up after each commit that may have moved the head.
        self.head_received_at: float | None = None
        # Dead letters dropped (oldest first) to keep the store under its bound, since start.
        self.dead_dropped_rows = 0
        self.dead_dropped_events = 0
        self._trimming = False
        self.last_error: str | None = None
        # Between a write that found the disk full and the next that succeeded.
        self._disk_full = False
        self.sqlite_settings: dict[str, str] = {}
        # Corrupt buffer files moved aside since start: {"path", "reason"}.
        self.quarantined: list[dict[str, str]] = []
        self._sync_level = ""
        self.new_data = asyncio.Event()
        self._reserved = 0
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        # Once full, stay refusing until the backlog drains below the low-water mark, so that
        # readiness does not flap with every delivered row.
        self._full = False
        self._free_checked_at = 0.0
        self._free_bytes = 1 << 62

    @classmethod
    def from_config(
        cls,
        config: BufferConfig,
        path: Path | None = None,
        *,
        max_bytes: int | None = None,
        lock_wait_s: float = 0.0,
    ) -> Buffer:
        """The buffer buffer.path configures, or the shard of it at `path`."""
        return cls(
            config.path if path is None else path,
            config.max_bytes if max_bytes is None else max_bytes,
            fsync=config.fsync,
            min_free_bytes=config.min_free_bytes,
            max_dead_letter_bytes=config.max_dead_letter_bytes,
            lock_wait_s=lock_wait_s,
        )

    # ---- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Buffer:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                self._take_lock()
                break
            except BufferLockedError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="buffer")
        try:
            await self._run(self._open_db)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._release_lock()
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="buffer-writer")
        self._writer.add_done_callback(self._writer_ended)
        if self.rows:
            self.new_data.set()
        log.info(
            "buffer_opened",
            path=str(self.dir),
            rows=self.rows,
            bytes=self.bytes,
            dead_letter_rows=self.dead_rows,
            **self.sqlite_settings,
        )

    async def close(self) -> None:
        """Stop taking writes, commit what is queued, checkpoint, close, release the lock."""
        if self._closing:
            return
        self._closing = True
        if self._writer is not None:
            await self._queue.put(None)
            # A writer that already ended (and said why in the log) must not fail the close.
            await asyncio.wait([self._writer])
        if self._executor is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._run(self._close_db)
            self._executor.shutdown(wait=True)
        self._release_lock()
        log.info("buffer_closed", rows=self.rows, bytes=self.bytes)

    def _take_lock(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BufferError_(f"cannot use buffer directory {self.dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BufferLockedError(
                f"buffer directory {self.dir} is in use by another process"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- runs on the buffer thread ---------------------------------------------------------

    def _open_db(self) -> None:
        """Open the buffer; a corrupt file is moved aside whole (kept for salvage) and a fresh
        buffer started, so a bad file never becomes a crash loop or a silent stall."""
        try:
            self._connect()
        except _CorruptError as exc:
            self._quarantine(str(exc))
            self._connect()

    def _connect(self) -> None:
        path = self.dir / DB_NAME
        conn = None
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # Identify the file before changing anything in it (journal_mode rewrites the
            # header): a foreign database is quarantined untouched.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if (version == 0 and tables) or (version != 0 and app_id != APPLICATION_ID):
                raise _CorruptError("the database is not a buffer of this proxy")
            conn.execute("PRAGMA journal_mode = WAL")
            self._sync_level = "FULL" if self.fsync else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {self._sync_level}")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.create_function(CONTAINS_FOLDED, 2, _contains_folded, deterministic=True)
            conn.execute("PRAGMA journal_size_limit = 67108864")
            if version == 0:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.executescript(SCHEMA)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version in MIGRATIONS:
                for step in range(version, SCHEMA_VERSION):
                    conn.executescript(
                        f"BEGIN IMMEDIATE; {MIGRATIONS[step]} PRAGMA user_version = {step + 1};"
                        " COMMIT;"
                    )
                log.info("buffer_migrated", from_version=version, to_version=SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise BufferError_(
                    f"buffer {path} has schema version {version}, this proxy reads {SCHEMA_VERSION}"
                )
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
            if problems != ["ok"]:
                raise _CorruptError("quick_check: " + "; ".join(problems))
            # Occupancy comes from the table itself, never from a separately kept counter.
            rows, size, events = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(events), 0) FROM events"
            ).fetchone()
            dead, dead_size = conn.execute(
                f"SELECT count(*), coalesce(sum({DEAD_SIZE}), 0) FROM dead_letter"
            ).fetchone()
            # Read back what SQLite actually does, so a silent default cannot hide.
            self.sqlite_settings = {
                "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                    conn.execute("PRAGMA synchronous").fetchone()[0], "?"
                ),
            }
        except (_CorruptError, BufferError_):
            if conn is not None:
                conn.close()
            raise
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if _is_corruption(exc):
                raise _CorruptError(str(exc)) from exc
            raise BufferError_(f"cannot open buffer {path}: {exc}") from exc
        self._conn = conn
        self.head_received_at = _head_received_at(conn)
        self.rows, self.bytes, self.events = rows, size, events
        self.dead_rows, self.dead_bytes = dead, dead_size

    def _quarantine(self, reason: str) -> None:
        """Move the database and its -wal/-shm together (never split a WAL from its db)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.dir / "quarantine" / f"buffer.corrupt-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.dir / "quarantine" / f"buffer.corrupt-{stamp}-{n}"
        target.mkdir(parents=True)
        for suffix in ("", "-wal", "-shm"):
            src = self.dir / (DB_NAME + suffix)
            if src.exists():
                os.replace(src, target / src.name)
        _fsync_dir(self.dir)
        self.quarantined.append({"path": str(target), "reason": reason})
        log.error("buffer_quarantined", path=str(target), reason=reason)

    def _close_db(self) -> None:
        if self._conn is not None:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None

    def _apply(self, conn: sqlite3.Connection, op: _Op) -> Any:
        if isinstance(op.args, Write):
            return op.args.apply(conn)
        if op.kind == "insert":
            envelopes: Sequence[Envelope] = op.args
            now = time.time()
            seqs = []
            for env in envelopes:
                seqs.append(_insert_row(conn, env, now))
            return seqs
        if op.kind == "delete":
            return _delete_row(conn, op.args)
        if op.kind == "dead_letter":
            return _dead_letter_row(conn, DeadRow(*op.args))
        if op.kind == "requeue":
            # Back to the send queue, at its tail, with the exact bytes first stored.
            selection, write_key = op.args
            where, params = selection.sql()
            if write_key is not None:
                return _requeue_rekeyed(conn, where, params, write_key)
            count, size, events, dead_size = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(events), 0),"
                f" coalesce(sum({DEAD_SIZE}), 0) FROM dead_letter {where}",
                params,
            ).fetchone()
            conn.execute(
                "INSERT INTO events (received_at, key_id, path, headers, body, size, events,"
                " method) SELECT received_at, key_id, path, headers, body, size, events, method"
                f" FROM dead_letter {where} ORDER BY seq",
                params,
            )
            conn.execute(f"DELETE FROM dead_letter {where}", params)
            return count, size, events, dead_size
        if op.kind == "trim_dead":
            # The oldest dead letters go first, until `excess` bytes are freed.
            excess: int = op.args
            freed = rows = events = 0
            last = None
            for seq, size, n in conn.execute(
                f"SELECT seq, {DEAD_SIZE}, events FROM dead_letter ORDER BY seq"
            ):
                if freed >= excess:
                    break
                freed, rows, events, last = freed + size, rows + 1, events + n, seq
            if last is not None:
                conn.execute("DELETE FROM dead_letter WHERE seq <= ?", (last,))
            return rows, freed, events
        if op.kind == "salvage":
            return _insert_salvaged(conn, op.args)
        raise AssertionError(op.kind)

    def _commit_group(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        """One transaction for the whole group; if it fails, each op alone, so that one failing
        write (say, an insert on a full disk) never takes a delete that frees space with it."""
        conn = self._conn
        assert conn is not None
        # A salvage run may be followed by deleting its source: it is a promise too.
        self._set_sync(conn, any(op.kind in ("insert", "salvage") for op in ops))
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [self._apply(conn, op) for op in ops]
            conn.execute("COMMIT")
            return [(True, r) for r in results]
        except Exception as exc:  # any failure fails the ops, never the writer (issue 7)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if len(ops) == 1:
                return [(False, exc)]  # alone it already failed: no second try
        return [self._commit_one(conn, op) for op in ops]

    def _commit_and_look(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        """Commit the group, then look up the head of the queue if it may have moved: an
        insert behind other rows leaves it where it was (no lookup on the ingest path)."""
        results = self._commit_group(ops)
        if self.head_received_at is None or any(op.kind != "insert" for op in ops):
            assert self._conn is not None
            with contextlib.suppress(sqlite3.Error):
                self.head_received_at = _head_received_at(self._conn)
        return results

    def _set_sync(self, conn: sqlite3.Connection, inserting: bool) -> None:
        """Only an insert carries a promise to a client. A delete or dead-letter lost to a power
        cut merely resends the row (at least once), so those commits skip the fsync; the next
        FULL commit syncs the WAL, earlier frames included."""
        level = "FULL" if self.fsync and inserting else "NORMAL"
        if level != self._sync_level:
            conn.execute(f"PRAGMA synchronous = {level}")
            self._sync_level = level

    def _commit_one(self, conn: sqlite3.Connection, op: _Op) -> tuple[bool, Any]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = self._apply(conn, op)
            conn.execute("COMMIT")
            return True, result
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return False, exc

    def _fetch(
        self,
        after: int,
        limit: int,
        skip: frozenset[int] = frozenset(),
        newest: bool = False,
        max_bytes: int | None = None,
    ) -> list[Row]:
        conn = self._conn
        assert conn is not None
        columns = "seq, received_at, key_id, path, headers, body, size, events, method"
        order = "DESC" if newest else "ASC"
        # Rows at or before `after` are not read anyway: only those past it need passing over.
        skip = frozenset(seq for seq in skip if seq > after)
        if skip:
            # Rows in flight or parked are passed over by seq alone, bodies unread.
            seqs: list[int] = []
            for (seq,) in conn.execute(
                f"SELECT seq FROM events WHERE seq > ? ORDER BY seq {order}", (after,)
            ):
                if seq not in skip:
                    seqs.append(seq)
                    if len(seqs) >= limit:
                        break
            if not seqs:
                return []
            marks = ",".join("?" * len(seqs))
            cur = conn.execute(
                f"SELECT {columns} FROM events WHERE seq IN ({marks}) ORDER BY seq {order}", seqs
            )
        else:
            cur = conn.execute(
                f"SELECT {columns} FROM events WHERE seq > ? ORDER BY seq {order} LIMIT ?",
                (after, limit),
            )
        rows: list[Row] = []
        taken = 0
        for seq, at, key_id, path, headers, body, size, events, method in cur:
            if max_bytes is not None and rows and taken + size > max_bytes:
                break
            taken += size
            problem = None
            try:
                decoded = json.loads(headers)
                if not isinstance(decoded, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                decoded, problem = {}, f"stored headers do not decode: {exc}"
            rows.append(
                Row(seq, at, key_id, path, decoded, bytes(body), size, events, method, problem)
            )
        return rows

    def _dead_letters(self, limit: int, selection: DeadLetterFilter) -> list[dict[str, Any]]:
        conn = self._conn
        assert conn is not None
        where, params = selection.sql()
        cur = conn.execute(
            "SELECT seq, key_id, path, body, status, reason, attempts, events, failed_at"
            f" FROM dead_letter {where} ORDER BY seq LIMIT ?",
            (*params, limit),
        )
        return [
            {
                "seq": s,
                "key_id": k,
                "path": p,
                "body": bytes(b),
                "status": st,
                "reason": r,
                "attempts": a,
                "events": n,
                "failed_at": f,
            }
            for s, k, p, b, st, r, a, n, f in cur
        ]

    def _dead_letter_page(
        self, selection: DeadLetterFilter, after: int, limit: int
    ) -> list[DeadLetter]:
        conn = self._conn
        assert conn is not None
        where, params = selection.sql()
        where = f"{where} AND seq > ?" if where else "WHERE seq > ?"
        # Text read as bytes and decoded here: a row whose text is not UTF-8 (a damaged page,
        # a row written by other hands) shows with replacement characters instead of failing
        # the whole read.
        text = ", ".join(
            f"CAST({c} AS BLOB)" for c in ("key_id", "method", "path", "headers", "reason")
        )
        cur = conn.execute(
            f"SELECT seq, received_at, failed_at, {text}, body, events, status, attempts"
            f" FROM dead_letter {where} ORDER BY seq LIMIT ?",
            (*params, after, limit),
        )
        return [
            DeadLetter(
                s, r, f, _text(k), _text(m), _text(p), _text(h), bytes(b), n, st, _text(why), a
            )
            for s, r, f, k, m, p, h, why, b, n, st, a in cur
        ]

    def _dead_letter_count(self, selection: DeadLetterFilter) -> DeadLetterCount:
        conn = self._conn
        assert conn is not None
        where, params = selection.sql()
        rows, events, size = conn.execute(
            "SELECT count(*), coalesce(sum(events), 0),"
            f" coalesce(sum({DEAD_SIZE}), 0) FROM dead_letter {where}",
            params,
        ).fetchone()
        return DeadLetterCount(rows, events, size)

    def _salvaged(self, keys: list[tuple[float, int]]) -> set[tuple[float, int]]:
        conn = self._conn
        assert conn is not None
        query = "SELECT 1 FROM salvaged WHERE received_at = ? AND seq = ?"
        return {key for key in keys if conn.execute(query, key).fetchone() is not None}

    # ---- the writer task -------------------------------------------------------------------

    async def _write_loop(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            ops: list[_Op] = []
            if first is None:
                stop = True
            else:
                ops.append(first)
            # Group commit: everything that queued up while the last commit ran goes together.
            while len(ops) < MAX_GROUP and not self._queue.empty():
                op = self._queue.get_nowait()
                if op is None:
                    stop = True
                    continue
                ops.append(op)
            if not ops:
                continue
            try:
                results = await self._run(self._commit_and_look, ops)
            except BaseException as exc:  # the executor itself failed
                for op in ops:
                    if not op.future.done():
                        op.future.set_exception(BufferError_(f"buffer write failed: {exc}"))
                raise
            try:
                self._settle(ops, results)
            except Exception:  # a bug in the bookkeeping must not end the writer
                log.exception("buffer_settle_failed")
                for op in ops:
                    if not op.future.done():
                        op.future.set_exception(BufferError_("buffer bookkeeping failed"))

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        if self._closing:
            return
        error = "cancelled" if task.cancelled() else repr(task.exception())
        self.last_error = f"buffer writer stopped: {error}"
        log.error("buffer_writer_stopped", error=error)

    @property
    def alive(self) -> bool:
        """False once the writer has ended without being asked to (then /healthz fails)."""
        return self._closing or (self._writer is not None and not self._writer.done())

    def _settle(self, ops: list[_Op], results: list[tuple[bool, Any]]) -> None:
        inserted = False
        if any(ok for ok, _ in results):
            self.last_error = None
            if self._disk_full:
                log.info("buffer_disk_full_cleared")
                self._disk_full = False
        for op, (ok, result) in zip(ops, results, strict=True):
            if isinstance(op.args, Write):
                if ok:
                    self._book(result)
                    inserted = inserted or result.rows > 0
            elif op.kind == "insert":
                size = sum(e.stored_size for e in op.args)
                self._reserved -= size
                if ok:
                    self.rows += len(op.args)
                    self.bytes += size
                    self.events += sum(e.events for e in op.args)
                    inserted = True
            elif op.kind == "salvage":
                self._reserved -= _pending_size(op.args)
                if ok:
                    count, size, events, dead, dead_size = result
                    self.rows += count
                    self.bytes += size
                    self.events += events
                    self.dead_rows += dead
                    self.dead_bytes += dead_size
                    inserted = inserted or count > 0
            elif op.kind == "requeue":
                if ok:
                    count, size, events, dead_size = result
                    self.rows += count
                    self.bytes += size
                    self.events += events
                    self.dead_rows -= count
                    self.dead_bytes -= dead_size
                    inserted = inserted or count > 0
            elif op.kind == "trim_dead":
                self._trimming = False
                if ok and result[0]:
                    rows, size, events = result
                    self.dead_rows -= rows
                    self.dead_bytes -= size
                    self.dead_dropped_rows += rows
                    self.dead_dropped_events += events
                    log.warning(
                        "dead_letters_dropped",
                        rows=rows,
                        events=events,
                        bytes=size,
                        max_dead_letter_bytes=self.max_dead_letter_bytes,
                    )
            elif ok and result is not None:
                self.rows -= 1
                self.bytes -= result[0]
                self.events -= result[1]
                if op.kind == "dead_letter":
                    self.dead_rows += 1
                    self.dead_bytes += result[2]
            if op.future.done():
                continue
            if ok:
                op.future.set_result(result)
                continue
            self.last_error = str(result)
            if _is_disk_full(result):
                if not self._disk_full:  # once an episode, not once per refused request
                    log.error("buffer_disk_full", error=str(result))
                    self._disk_full = True
                op.future.set_exception(BufferFullError("disk full: cannot store events"))
            else:
                log.error("buffer_write_failed", error=str(result), op=op.kind)
                op.future.set_exception(BufferError_(f"buffer write failed: {result}"))
        if inserted:
            self.new_data.set()
        if self.dead_bytes > self.max_dead_letter_bytes and not self._trimming:
            self._trim_dead_letters()

    def _book(self, change: Occupancy) -> None:
        self.rows += change.rows
        self.bytes += change.bytes
        self.events += change.events
        self.dead_rows += change.dead_rows
        self.dead_bytes += change.dead_bytes

    def _trim_dead_letters(self) -> None:
        """Queue a trim of the dead-letter store back under its bound (buffer.max_dead_letter_
        bytes): without a bound, anyone could fill the disk with events Jitsu refuses."""
        self._trimming = True
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Down to 90 % of the bound, so that the trim is not repeated for every dead letter.
        excess = self.dead_bytes - self.max_dead_letter_bytes * 9 // 10
        self._queue.put_nowait(_Op("trim_dead", excess, future))

    async def _submit(self, kind: str, args: Any) -> Any:
        if self._closing or self._writer is None:
            raise BufferClosedError("buffer is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Op(kind, args, future))
        # shield: a client that hangs up must not cancel the commit's bookkeeping.
        return await asyncio.shield(future)

    # ---- public API ------------------------------------------------------------------------

    def _check_admission(self, size: int) -> None:
        """Refuse before reading work we could not keep: 503 + Retry-After, never a 2xx."""
        if self._closing or self._writer is None:
            raise BufferClosedError("proxy is shutting down")
        if self._full and self.bytes > self.low_water:
            raise BufferFullError(
                f"buffer full: {self.bytes} of {self.max_bytes} bytes used", retry_after_s=5
            )
        self._full = False
        if self.bytes + self._reserved + size > self.max_bytes:
            self._full = True
            raise BufferFullError(
                f"buffer full: {self.bytes} of {self.max_bytes} bytes used", retry_after_s=5
            )
        if self._disk_free() < self.min_free_bytes:
            raise BufferFullError("disk almost full: refusing to store more events", 30)

    def _disk_free(self) -> int:
        now = time.monotonic()
        if now - self._free_checked_at > 1.0:
            try:
                st = os.statvfs(self.dir)
                self._free_bytes = st.f_bavail * st.f_frsize
            except OSError:
                self._free_bytes = 0
            self._free_checked_at = now
        return self._free_bytes

    async def append(self, envelopes: Sequence[Envelope]) -> list[int]:
        """Commit envelopes durably; returns their sequence numbers once they are on disk."""
        size = sum(e.stored_size for e in envelopes)
        self._check_admission(size)
        self._reserved += size
        try:
            result: list[int] = await self._submit("insert", list(envelopes))
        except BufferClosedError:
            self._reserved -= size
            raise
        return result

    async def fetch(
        self,
        after: int,
        limit: int,
        skip: frozenset[int] = frozenset(),
        *,
        newest: bool = False,
        max_bytes: int | None = None,
    ) -> list[Row]:
        """Up to `limit` rows after seq `after`, oldest first (`newest`: newest first),
        passing over those in `skip`; with `max_bytes`, no more rows than fit in it (at
        least one)."""
        if self._conn is None or self._executor is None:
            raise BufferClosedError("buffer is closed")
        try:
            return await self._run(self._fetch, after, limit, skip, newest, max_bytes)
        except sqlite3.Error as exc:
            raise BufferError_(f"buffer read failed: {exc}") from exc

    async def delete(self, seq: int) -> None:
        """Upstream accepted the row."""
        await self._submit("delete", seq)

    async def dead_letter(self, seq: int, status: int | None, reason: str, attempts: int) -> None:
        """Upstream refused the row for good: keep it, with why, out of the send queue."""
        await self._submit("dead_letter", (seq, status, reason, attempts))

    async def settle(self, settlement: RowSettlement | RowsSettlement) -> None:
        """Upstream took some of the row's events, refused some, and the rest go again (or
        it was too large and is split); or it answered for several rows sent together: all of
        it in one transaction."""
        await self._submit(settlement.kind, settlement)

    async def requeue_dead_letters(
        self, selection: DeadLetterFilter | None = None, *, write_key: str | None = None
    ) -> int:
        """Move dead letters (all, or those `selection` picks) back into the send queue, in one
        transaction. With `write_key` (a checked `keyId:secret`), they are sent under that key
        instead of the one upstream refused: a rotated key. Returns how many rows moved."""
        count, _size, _events, _dead_size = await self._submit(
            "requeue", (selection or DeadLetterFilter(), write_key)
        )
        return int(count)

    async def append_salvaged(self, rows: Sequence[SalvagedRow]) -> tuple[int, int, int]:
        """Copy rows from a quarantined file in one transaction with their ledger entries,
        skipping any the ledger already has. Pending rows are admitted like `append` (they
        count against `max_bytes`). Returns the pending rows, events and dead letters added."""
        size = _pending_size(rows)
        self._check_admission(size)
        self._reserved += size
        try:
            count, _size, events, dead, _dead_size = await self._submit("salvage", list(rows))
        except BufferClosedError:
            self._reserved -= size
            raise
        return int(count), int(events), int(dead)

    async def salvaged(self, rows: Sequence[SalvagedRow]) -> set[tuple[float, int]]:
        """Which of these rows an earlier salvage run already copied: (received_at, seq)."""
        return await self._run(self._salvaged, [(r.received_at, r.seq) for r in rows])

    async def dead_letters(
        self, limit: int = 1000, selection: DeadLetterFilter | None = None
    ) -> list[dict[str, Any]]:
        return await self._run(self._dead_letters, limit, selection or DeadLetterFilter())

    async def dead_letter_page(
        self, selection: DeadLetterFilter | None = None, after: int = 0, limit: int = 500
    ) -> list[DeadLetter]:
        """Up to `limit` dead letters past seq `after`, whole, oldest first: a caller pages
        through the store without holding it all."""
        try:
            return await self._run(
                self._dead_letter_page, selection or DeadLetterFilter(), after, limit
            )
        except sqlite3.Error as exc:
            raise BufferError_(f"buffer read failed: {exc}") from exc

    async def count_dead_letters(
        self, selection: DeadLetterFilter | None = None
    ) -> DeadLetterCount:
        try:
            return await self._run(self._dead_letter_count, selection or DeadLetterFilter())
        except sqlite3.Error as exc:
            raise BufferError_(f"buffer read failed: {exc}") from exc

    async def purge_dead_letters(self, selection: DeadLetterFilter | None = None) -> int:
        """Delete dead letters (all, or those `selection` picks) for good, in one transaction.
        Returns how many rows went."""
        change: Occupancy = await self._submit(
            DeadLetterPurge.kind, DeadLetterPurge(selection or DeadLetterFilter())
        )
        return -change.dead_rows

    def oldest_age_s(self, now: float) -> float:
        """How long the row at the head of the send queue has waited; 0 when there is none.
        (Rows requeued from the dead letters or salvaged keep their first arrival time but
        wait at the tail: the head is the oldest by arrival order, not by that time.)"""
        at = self.head_received_at
        return max(0.0, now - at) if at is not None and self.rows else 0.0

    @property
    def low_water(self) -> int:
        return self.max_bytes * 9 // 10

    @property
    def writable(self) -> bool:
        return (
            not self._closing
            and self._writer is not None
            and self.last_error is None
            and not (self._full and self.bytes > self.low_water)
            and self.bytes < self.max_bytes
            and self._disk_free() >= self.min_free_bytes
        )

    @property
    def closing(self) -> bool:
        return self._closing


def _contains_folded(text: bytes | str | None, part: str | None) -> bool:
    if text is None or part is None:
        return False
    return part.casefold() in _text(text).casefold()


def _text(value: bytes | str | None) -> str:
    """Stored text as str, bytes that are not UTF-8 replaced (U+FFFD)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _head_received_at(conn: sqlite3.Connection) -> float | None:
    """The arrival time of the first row by seq: one step down the primary key."""
    row = conn.execute("SELECT received_at FROM events ORDER BY seq LIMIT 1").fetchone()
    return None if row is None else float(row[0])


def _delete_row(conn: sqlite3.Connection, seq: int) -> tuple[int, int] | None:
    """Upstream took the row: it leaves. Returns its size and events, None if it was gone."""
    row = conn.execute("SELECT size, events FROM events WHERE seq = ?", (seq,)).fetchone()
    conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
    return None if row is None else (row[0], row[1])


def stored_reason(text: str) -> str:
    """A dead letter's reason as SQLite can store it: at most MAX_REASON_CHARS, and a lone
    surrogate (an upstream's JSON may escape one: "\\ud800") as U+FFFD. Unstorable, the
    dead-letter write failed and the row went upstream again at once, for ever."""
    return replace_surrogates(text[:MAX_REASON_CHARS])


def _dead_letter_row(conn: sqlite3.Connection, dead: DeadRow) -> tuple[int, int, int] | None:
    """The row moves to the dead letters. Returns its size, events and what it counts against
    buffer.max_dead_letter_bytes; None if it was gone."""
    reason = stored_reason(dead.reason)
    row = conn.execute("SELECT size, events FROM events WHERE seq = ?", (dead.seq,)).fetchone()
    conn.execute(
        "INSERT OR REPLACE INTO dead_letter (seq, received_at, key_id, path, headers, body,"
        " size, events, failed_at, status, reason, attempts, method)"
        " SELECT seq, received_at, key_id, path, headers, body, size, events, ?, ?, ?, ?,"
        " method"
        " FROM events WHERE seq = ?",
        (time.time(), dead.status, reason, dead.attempts, dead.seq),
    )
    conn.execute("DELETE FROM events WHERE seq = ?", (dead.seq,))
    if row is None:
        return None
    return row[0], row[1], row[0] + len(reason.encode("utf-8"))


def _insert_row(conn: sqlite3.Connection, env: Envelope, received_at: float) -> int:
    """The one way a row enters `events`; returns its seq."""
    cur = conn.execute(
        "INSERT INTO events (received_at, key_id, path, headers, body, size, events, method)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            received_at,
            env.key_id,
            env.path,
            env.headers_json,
            env.body,
            env.stored_size,
            env.events,
            env.method,
        ),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _requeue_rekeyed(
    conn: sqlite3.Connection, where: str, params: tuple[Any, ...], write_key: str
) -> tuple[int, int, int, int]:
    """Requeue under a new write key: only X-Write-Key and key_id change. The body keeps its
    bytes, so messageIds are kept and Jitsu deduplicates a copy that did arrive before. The
    stored size comes from the Envelope, so it follows however the buffer counts a row."""
    new_id = key_id_of(write_key)
    count = size = events = dead_size = 0
    cur = conn.execute(
        f"SELECT received_at, path, headers, body, events, method, {DEAD_SIZE}"
        f" FROM dead_letter {where} ORDER BY seq",
        params,
    )
    for received_at, path, headers, body, n, method, old_size in cur:
        dead_size += old_size
        fields = {
            name: value
            for name, value in json.loads(headers).items()
            if name.lower() != "x-write-key"
        }
        fields["X-Write-Key"] = write_key
        env = Envelope(path, fields, bytes(body), n, new_id, method)
        _insert_row(conn, env, received_at)
        count += 1
        size += env.stored_size
        events += n
    conn.execute(f"DELETE FROM dead_letter {where}", params)
    return count, size, events, dead_size


def _already_live(conn: sqlite3.Connection, row: SalvagedRow) -> bool:
    """The row is still in the live buffer itself (salvage of a copy of the live file): its
    seq there holds the same row, stored at the same instant."""
    return any(
        conn.execute(
            f"SELECT 1 FROM {table} WHERE seq = ? AND received_at = ?", (row.seq, row.received_at)
        ).fetchone()
        for table in ("events", "dead_letter")
    )


def _pending_size(rows: Sequence[SalvagedRow]) -> int:
    return sum(r.envelope.stored_size for r in rows if r.failure is None)


def _insert_salvaged(
    conn: sqlite3.Connection, rows: Sequence[SalvagedRow]
) -> tuple[int, int, int, int, int]:
    count = size = events = dead = dead_size = 0
    for row in rows:
        if _already_live(conn, row):
            continue
        # The ledger entry commits with the copy, or neither does: a re-run never doubles.
        known = conn.execute(
            "INSERT OR IGNORE INTO salvaged (received_at, seq) VALUES (?, ?)",
            (row.received_at, row.seq),
        )
        if known.rowcount == 0:
            continue
        env = row.envelope
        # The first time it was stored, not now: the row's age stays true.
        seq = _insert_row(conn, env, row.received_at)
        if row.failure is None:
            count += 1
            size += env.stored_size
            events += env.events
            continue
        # A dead letter takes its seq from events' AUTOINCREMENT (stored there, then moved), so
        # it can never collide with a live row or dead letter, nor be reused later.
        failure = row.failure
        conn.execute(
            "INSERT INTO dead_letter (seq, received_at, key_id, path, headers, body, size, events,"
            " failed_at, status, reason, attempts, method)"
            " SELECT seq, received_at, key_id, path, headers, body, size, events, ?, ?, ?, ?,"
            " method FROM events WHERE seq = ?",
            (
                failure.failed_at,
                failure.status,
                stored_reason(failure.reason),
                failure.attempts,
                seq,
            ),
        )
        conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
        dead += 1
        dead_size += env.stored_size + len(stored_reason(failure.reason).encode("utf-8"))
    return count, size, events, dead, dead_size


class _CorruptError(Exception):
    """The buffer file is damaged or not ours: quarantine it."""


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()
