"""Sends buffered envelopes upstream, in order, with bounded concurrency, for as long as it takes.

Short blips are retried inside one request (aiohttp-retry). Past that the row simply stays in
the buffer: the forwarder backs off and sends one probe at a time until upstream answers again,
then drains the backlog. Probes take turns over the backlog, so one row that always fails
cannot pass for an outage; such a row is parked with a backoff of its own while the others go
on, and dead-lettered after `upstream.retry.max_row_failures` lone failures (retry.RowFailures).
Redirects are never followed: the write key goes to `upstream.url` and nowhere else.
Nothing waits in memory but the rows in flight and a bounded read-ahead of the next rows (read
from the buffer in large steps, not one row per free slot).

With `upstream.coalesce`, single events of the read-ahead that Jitsu would treat alike go as one
batch request (proxy.coalesce says which); the request counts as one, for the concurrency and
for the outage logic, and Jitsu's answer settles each row: taken, refused (dead-lettered as it
would have been alone) or again. A row whose fate the batch cannot show as a request of its own
would (a strict key lookup's refusal, a 413, an answer that names no event) is sent alone.

A browser row may be sent at once instead of waiting for its turn (`answer_now`), so that the
browser gets Jitsu's own answer, device destinations included (issue 8); it is the same row
and the same delivery task either way, never two at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import time
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import structlog
from aiohttp_retry import ExponentialRetry, RetryClient

from proxy.auth import redact
from proxy.buffer import Buffer, DeadRow, Piece, Row, RowSettlement, RowsSettlement
from proxy.coalesce import Fate, Member, ReadAhead, Settled, Unit, member, read_answer, refusal
from proxy.config import UpstreamConfig
from proxy.envelope import StoredBatch, pixel_destination, read_stored_batch
from proxy.errors import BufferError_
from proxy.metrics import Metrics, response_class
from proxy.refusals import CLIENT_DOMAIN, STREAM_NOT_FOUND, KeyRefusals, fingerprint, route_kind
from proxy.retry import (
    RETRY_STATUSES,
    Backoff,
    EventFate,
    EventVerdict,
    Outcome,
    RowFailures,
    RowVerdict,
    classify_answer,
    jitsu_json,
    parse_retry_after,
    read_batch_answer,
)

log = structlog.get_logger("proxy.forwarder")

# Jitsu's answer to a browser event carries its device destinations, code included: read up to
# this much of an answer to judge it.
MAX_RESPONSE_BYTES = 1024 * 1024
# A reason kept with a dead letter or logged, at most (upstream chooses its length).
MAX_REASON = 1024
# The read-ahead: at most this many rows, and this many bytes (or twice upstream.max_batch_bytes).
READ_AHEAD_ROWS = 512
READ_AHEAD_BYTES = 4 * 1024 * 1024
# A browser row this much older than upstream.sync_timeout_s has no browser waiting on it
# (answer_now) any more: it may go in a batch, whose answer is no browser's.
SYNC_GRACE_S = 1.0
# After a failed delete or dead-letter write, how long the rows wait before they go again.
BOOKKEEPING_RETRY_S = 1.0
# After a 413, batches are made smaller than the one refused, down to this.
MIN_BATCH_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class PartialBatch:
    """A batch Jitsu took in part: the stored batch, and what became of each of its events."""

    batch: StoredBatch
    verdicts: tuple[EventVerdict, ...]

    def indices(self, fate: EventFate) -> list[int]:
        return [i for i, v in enumerate(self.verdicts) if v.fate is fate]


@dataclasses.dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    status: int | None
    reason: str
    retry_after_s: float | None = None
    partial: PartialBatch | None = None  # a batch upstream took only in part
    # The batch must go in smaller pieces: a 413, or an answer too large to read.
    too_large: bool = False
    sent: bool = True
    # Set when the failure was already counted (inside the request, by get_timeout).
    verdict: RowVerdict | None = None
    location: str | None = None  # where a redirect pointed
    # Upstream's answer as read, for a browser waiting on it (`whole`: not cut at
    # MAX_RESPONSE_BYTES; what of it may be passed on is decided then: _browser_answer), and
    # Jitsu's refusal message with the secret masked, if any.
    body: bytes = b""
    whole: bool = True
    jitsu_error: str | None = None


@dataclasses.dataclass(frozen=True)
class UpstreamAnswer:
    """Jitsu's verdict on a row, to be passed on to the client: its status and JSON body."""

    status: int
    body: bytes


class _HandBack(Exception):
    """Stop retrying inside the request; the buffer takes over the wait."""

    def __init__(
        self,
        status: int | None,
        retry_after_s: float | None,
        *,
        sent: bool = True,
        verdict: RowVerdict | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after_s = retry_after_s
        self.sent = sent
        self.verdict = verdict


class _InRequestRetry(ExponentialRetry):
    """aiohttp-retry options for one row: our status list, jittered backoff, Retry-After as a
    floor. The first request to meet a failing upstream becomes the probe and keeps its
    in-request retries; every other request hands its row back to the buffer at once, so
    that a failing upstream sees one request at a time."""

    def __init__(self, forwarder: Forwarder, attempts: int, seq: int) -> None:
        super().__init__(
            attempts=attempts,
            statuses=set(RETRY_STATUSES),
            exceptions={aiohttp.ClientError, asyncio.TimeoutError},
            retry_all_server_errors=False,
        )
        self._forwarder = forwarder
        self._seq = seq

    def get_timeout(self, attempt: int, response: aiohttp.ClientResponse | None = None) -> float:
        status = None
        retry_after = None
        if response is not None:
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            response.close()  # aiohttp-retry does not release a response it retries
        fwd = self._forwarder
        # A browser waiting on this row gets {"ok":true} now, not after the retries.
        fwd._answer_waiters(self._seq, None)
        verdict = fwd.row_failures.failure(self._seq)
        if verdict.lone:
            # Others get through: this row's trouble is its own; no outage mode for it.
            raise _HandBack(status, retry_after, verdict=verdict)
        if not fwd.failing:
            fwd.failing = True
            fwd.probe_seq = self._seq
        delay = fwd.backoff.delay(attempt, retry_after)
        if fwd.probe_seq != self._seq or fwd.stopping or delay > fwd.backoff.max_s:
            raise _HandBack(status, retry_after, verdict=verdict)
        fwd.waiting(delay)
        return delay


class Forwarder:
    def __init__(
        self,
        buffer: Buffer,
        config: UpstreamConfig,
        metrics: Metrics,
        refusals: KeyRefusals | None = None,
    ) -> None:
        self.buffer = buffer
        self.config = config
        self.metrics = metrics
        self.base_url = config.url.rstrip("/")
        self.backoff = Backoff(
            initial_s=config.retry.initial_backoff_s,
            max_s=config.retry.max_backoff_s,
            multiplier=config.retry.multiplier,
            max_retry_after_s=config.retry.max_retry_after_s,
        )
        self.client: RetryClient | None = None  # set by start()
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.failing = False
        self.failures = 0
        self.stopping = False
        self.retry_after_s: float | None = None
        self.next_probe_at = 0.0
        # The last wait before a retry while upstream fails (0 once it works), for metrics.
        self.backoff_s = 0.0
        self.probe_seq: int | None = None
        # While failing, probes take turns over the backlog, starting after this row.
        self.probe_after = 0
        self._probe_newest = False
        self.row_failures = RowFailures(config.retry.max_row_failures)
        # Rows taken off the head of the queue after lone failures: seq -> when to retry.
        self.parked: dict[int, float] = {}
        # The last redirect upstream answered with, until a request gets through again.
        self.redirected_to: str | None = None
        # Rows up to `cursor` were read: sent, or in the read-ahead, not yet sent.
        self.cursor = 0
        self._rewinds = 0
        self._ahead: ReadAhead[Row] = ReadAhead()
        self._read_ahead_bytes = max(READ_AHEAD_BYTES, 2 * config.max_batch_bytes)
        # Rows to send alone, never in a batch again (proxy.coalesce, Fate.ALONE).
        self._alone: set[int] = set()
        self._batch_bytes = config.max_batch_bytes
        # Rows handed to a task and not yet settled in the buffer; `sending` of them are
        # waiting on upstream, and only those count against the concurrency.
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self.sending = 0
        self.attempts: collections.Counter[int] = collections.Counter()
        # Clients waiting for the first answer to a row (answer_now), and that answer while
        # the row is being settled; both go when the row's task ends.
        self._waiters: dict[int, asyncio.Future[Attempt | None]] = {}
        self._answered: dict[int, Attempt] = {}
        # Rows sent out of turn for a waiting browser and not yet answered.
        self.sync_sending = 0
        # How Jitsu names upstream.url's host in its refusals (ingest/router.go getDataLocator).
        self._upstream_domain = f"[domain: {urlsplit(config.url).hostname or ''}]"
        self.refusals = refusals if refusals is not None else KeyRefusals(config.key_refusal_ttl_s)
        self._slot_freed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def trace_config(self) -> aiohttp.TraceConfig:
        """For the upstream session: counts every attempt per buffered row (retries inside
        aiohttp-retry included) and stops non-probe attempts while upstream fails."""
        trace = aiohttp.TraceConfig()

        async def on_start(
            _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceRequestStartParams
        ) -> None:
            seq = (ctx.trace_request_ctx or {}).get("seq")
            if seq is None:
                return
            # Once upstream is known to fail, only the probe may go out; a request that was
            # waiting between in-request retries goes back to the buffer instead.
            if self.failing and seq != self.probe_seq:
                raise _HandBack(None, None, sent=False)
            self.attempts[seq] += 1
            if self.attempts[seq] > 1:
                self.metrics.upstream_retries.inc()
            ctx.started = time.perf_counter()

        async def on_end(
            _s: aiohttp.ClientSession, ctx: SimpleNamespace, p: aiohttp.TraceRequestEndParams
        ) -> None:
            self._attempt_ended(ctx, response_class(p.response.status))

        async def on_exception(
            _s: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            p: aiohttp.TraceRequestExceptionParams,
        ) -> None:
            if isinstance(p.exception, Exception):  # not a cancellation: the proxy stopping
                timeout = isinstance(p.exception, TimeoutError)
                self._attempt_ended(ctx, "timeout" if timeout else "error")

        trace.on_request_start.append(on_start)
        trace.on_request_end.append(on_end)
        trace.on_request_exception.append(on_exception)
        return trace

    def _attempt_ended(self, ctx: SimpleNamespace, answer: str) -> None:
        """One HTTP attempt upstream answered (or failed): its latency and its class."""
        started = getattr(ctx, "started", None)
        if started is None:
            return  # not a forwarding request
        self.metrics.upstream_duration.observe(time.perf_counter() - started)
        self.metrics.upstream_responses.labels(answer).inc()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, session: aiohttp.ClientSession) -> None:
        self.client = RetryClient(client_session=session)
        self._task = asyncio.create_task(self._run(), name="forwarder")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self.stopping:
            return
        error = "cancelled" if task.cancelled() else repr(task.exception())
        log.error("forwarder_stopped_unexpectedly", error=error)

    @property
    def alive(self) -> bool:
        """False once the forwarding loop has ended without being asked to."""
        return self.stopping or (self._task is not None and not self._task.done())

    async def stop(self, grace_s: float) -> None:
        """Stop pulling rows; give requests in flight `grace_s` to finish, then abandon them.
        An abandoned row was not deleted, so it is sent again after restart."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        pending = list(self.inflight.values())
        if pending:
            _done, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            for task in still:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            log.info("forwarder_stopped", finished=len(_done), abandoned=len(still))

    # ---- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if self.failing:
                    await self._probe()
                else:
                    await self._dispatch()
            except asyncio.CancelledError:
                raise
            except BufferError_ as exc:
                log.error("forwarder_buffer_error", error=str(exc))
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("forwarder_error")
                await asyncio.sleep(1.0)

    async def _dispatch(self) -> None:
        # Rows sent at once for waiting browsers come on top (sync_max_in_flight): they must
        # not take the backlog's slots (attack pass: s2s rows starved under browser load).
        free = self.config.concurrency - (self.sending - self.sync_sending)
        if free <= 0:
            self._slot_freed.clear()
            await self._slot_freed.wait()
            return
        self._unpark_due()
        if not self._ahead:
            self.buffer.new_data.clear()
            rewinds = self._rewinds
            rows = await self.buffer.fetch(
                self.cursor,
                READ_AHEAD_ROWS,
                skip=frozenset(self.inflight) | frozenset(self.parked),
                max_bytes=self._read_ahead_bytes,
            )
            if self._rewinds != rewinds:
                # A row failed while we read: the cursor went back for it, and moving it
                # forward past these rows would skip that row until the next restart. Again.
                return
            for row in rows:
                self.cursor = max(self.cursor, row.seq)
                if row.seq not in self.inflight:  # else sent at once for a browser meanwhile
                    self._ahead.add(row.seq, row, self._member(row))
        if not self._ahead:
            self._slot_freed.clear()
            waits: list[Any] = [self.buffer.new_data.wait(), self._slot_freed.wait()]
            if self.parked:
                due = min(self.parked.values()) - time.monotonic()
                waits.append(asyncio.sleep(max(0.0, due)))
            await _first(*waits)
            return
        for unit in self._ahead.take(free, self._batch_bytes, _seq, self._together):
            if unit.batch:
                self._launch_batch(unit)
            else:
                row = unit.items[0][0]
                self._launch(row, f"send-{row.seq}")

    def _member(self, row: Row) -> Member | None:
        if not self.config.coalesce or row.problem is not None:
            return None
        try:
            return member(row.method, row.path, row.headers, row.body, row.events)
        except Exception:
            # A row the coalescer cannot judge goes alone: skipping it would strand it.
            log.exception("coalesce_member_failed", seq=row.seq)
            return None

    def _together(self, row: Row) -> bool:
        """Whether the row may go in a batch now: not one to send alone, nor a browser's that
        a browser may still wait on (answer_now: Jitsu's answer to that event alone)."""
        if row.seq in self._alone:
            return False
        if self.config.sync_browser and not row.path.startswith("/api/s/s2s/"):
            age = time.time() - row.received_at
            return age > self.config.sync_timeout_s + SYNC_GRACE_S
        return True

    def _launch(self, row: Row, name: str, *, sync: bool = False) -> asyncio.Task[None]:
        self._ahead.pop(row.seq)
        self.sending += 1
        self.row_failures.sent(row.seq)
        task = asyncio.create_task(self._deliver(row, sync=sync), name=name)
        self.inflight[row.seq] = task
        return task

    async def answer_now(self, row: Row, timeout_s: float) -> UpstreamAnswer | None:
        """Send a just-committed row at once (or join its delivery, if the loop took it first)
        and return Jitsu's verdict if it comes within `timeout_s`. None when there is none to
        pass on: upstream is failing (no waiting then), too many such sends are out, the
        answer is trouble rather than a verdict, or it is late; the row is delivered from the
        buffer as usual in every case."""
        if self.failing or self.stopping or self.client is None:
            return None
        attempt = self._answered.get(row.seq)
        if attempt is None:
            waiter = self._waiters.get(row.seq)
            if waiter is None:
                if row.seq not in self.inflight:
                    if row.seq <= self.cursor and row.seq not in self._ahead:
                        return None  # the loop took it and settled it already
                    if self.sync_sending >= self.config.sync_max_in_flight:
                        return None
                    self._launch(row, f"sync-{row.seq}", sync=True)
                waiter = self._waiters[row.seq] = asyncio.get_running_loop().create_future()
            try:
                attempt = await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
            except TimeoutError:
                return None
        return None if attempt is None else self._browser_answer(attempt, row)

    def _unpark_due(self) -> None:
        now = time.monotonic()
        due = [seq for seq, at in self.parked.items() if at <= now]
        for seq in due:
            del self.parked[seq]
        if due:
            self._rewind()

    async def _probe(self) -> None:
        """While upstream fails: wait out the backoff, then send one row alone. Probes take
        turns over the backlog: the oldest row may be one that always fails on its own."""
        while self.inflight:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        if not self.failing:
            return  # a request in flight (the first to meet the failure) got through after all
        delay = self.backoff.delay(self.failures, self.retry_after_s)
        self.waiting(delay)
        await asyncio.sleep(delay)
        # Parked rows are not probes: they fail alone, on backoffs of their own.
        parked = frozenset(self.parked)
        # Every other probe is the newest row: a block of rows upstream never takes (from one
        # client, say) must not make the others wait a backoff per row of it (attack pass).
        self._probe_newest = not self._probe_newest
        rows = await self.buffer.fetch(0, 1, parked, newest=True) if self._probe_newest else []
        rows = (
            rows
            or await self.buffer.fetch(self.probe_after, 1, parked)
            or await self.buffer.fetch(0, 1, parked)
        )
        if not rows:
            self.failing = False  # nothing left but suspects: no sign of an outage
            return
        row = rows[0]
        if not self._probe_newest:
            self.probe_after = row.seq
        self.probe_seq = row.seq
        task = self._launch(row, f"probe-{row.seq}")
        try:
            await asyncio.shield(task)
        finally:
            self.probe_seq = None

    async def _deliver(self, row: Row, *, sync: bool = False) -> None:
        if sync:
            self.sync_sending += 1
        try:
            try:
                attempt = await self._attempt(row)
            finally:
                # The slot is free once upstream answered; the row stays excluded from fetches
                # (in `inflight`) until its delete or dead-letter is committed.
                self.sending -= 1
                if sync:
                    self.sync_sending -= 1
                self._slot_freed.set()
            self._answer_waiters(row.seq, attempt)
            self._note_key_verdict(row, attempt)
            await self._settle(row, attempt)
        except BufferError_ as exc:
            # Upstream may have it, our bookkeeping failed: it will be sent again (at least once).
            log.error("forwarder_bookkeeping_failed", seq=row.seq, error=str(exc))
            await self._after_bookkeeping_failure()
        finally:
            self.inflight.pop(row.seq, None)
            self._answered.pop(row.seq, None)
            self._answer_waiters(row.seq, None)
            if self.probe_seq == row.seq:
                self.probe_seq = None
            self._slot_freed.set()

    async def _settle(self, row: Row, attempt: Attempt) -> None:
        """Settle the row in the buffer by upstream's answer: delete it, dead-letter it, leave
        it for a retry, or, for a batch, event by event (a partial answer, a 413)."""
        self.metrics.upstream_requests.labels(attempt.outcome.value).inc()
        if attempt.outcome is Outcome.RETRY:
            verdict = self._failed(row, attempt)
            if verdict is None or not verdict.dead:
                return
            attempt = dataclasses.replace(
                attempt, outcome=Outcome.REJECTED, reason=_gave_up(attempt.reason, verdict)
            )
            self.row_failures.forget(row.seq)
        else:
            # Delivered or refused by Jitsu itself: either way, upstream works.
            self.row_failures.ok(row.seq)
            self._recovered()
        self._alone.discard(row.seq)
        tries = self.attempts.pop(row.seq, 1)
        if attempt.partial is not None:
            await self._settle_events(row, attempt.partial, attempt.status, tries)
            return
        if attempt.too_large and await self._split(row, tries):
            return
        if attempt.outcome is Outcome.DELIVERED:
            await self.buffer.delete(row.seq)
            self.metrics.events_delivered.inc(row.events)
            log.debug("envelope_forwarded", seq=row.seq, events=row.events, attempts=tries)
            return
        await self.buffer.dead_letter(row.seq, attempt.status, attempt.reason, tries)
        self._dead_lettered(row, attempt.status, attempt.reason, tries, row.events)

    async def _settle_events(
        self, row: Row, partial: PartialBatch, status: int | None, tries: int
    ) -> None:
        """Jitsu took some events of the batch: they leave the buffer, the ones it refused
        become dead letters of their own (one per reason), and the row keeps only the ones to
        send again, in one transaction. A replay then resends only what Jitsu refused."""
        key = row.headers.get("X-Write-Key")
        batch = partial.batch
        refused: dict[str, list[int]] = {}
        for index in partial.indices(EventFate.REFUSED):
            reason = _reason(f"upstream refused: {partial.verdicts[index].reason}", key)
            refused.setdefault(reason, []).append(index)
        retry = partial.indices(EventFate.RETRY)
        accepted = len(partial.indices(EventFate.ACCEPTED))
        await self.buffer.settle(
            RowSettlement(
                row.seq,
                keep=Piece(batch.body(retry), len(retry)) if retry else None,
                dead=tuple(
                    Piece(batch.body(ix), len(ix), reason) for reason, ix in refused.items()
                ),
                status=status,
                attempts=tries,
            )
        )
        dead = len(partial.verdicts) - accepted - len(retry)
        self.metrics.events_delivered.inc(accepted)
        log.info(
            "batch_partially_accepted",
            seq=row.seq,
            accepted=accepted,
            retrying=len(retry),
            dead_lettered=dead,
            key_id=row.key_id,
            retry_reason=_reason(partial.verdicts[retry[0]].reason, key) if retry else None,
        )
        for reason, indices in refused.items():
            self._dead_lettered(row, status, reason, tries, len(indices))
        if retry:
            # Progress was made (the row shrank), so this cannot go round for ever; a short
            # wait of the row's own lets a transient error pass. A row that then fails whole
            # is a failure like any other (RowFailures).
            self.parked[row.seq] = time.monotonic() + self.backoff.delay(1)

    async def _split(self, row: Row, tries: int) -> bool:
        """Upstream found the batch too large (413), or answered more than can be read: send
        it again in two halves, the first in the row's place, the second as a new row. False
        when there is nothing to split."""
        batch = read_stored_batch(row.body) if row.events > 1 else None
        if batch is None or len(batch.events) < 2:
            return False
        half = len(batch.events) // 2
        rest = range(half, len(batch.events))
        await self.buffer.settle(
            RowSettlement(
                row.seq,
                keep=Piece(batch.body(range(half)), half),
                more=(Piece(batch.body(rest), len(rest)),),
                status=413,
                attempts=tries,
            )
        )
        log.info(
            "batch_split",
            seq=row.seq,
            events=len(batch.events),
            into=[half, len(rest)],
            key_id=row.key_id,
        )
        self._rewind()  # the first half is behind the cursor now
        return True

    # ---- single events sent together (upstream.coalesce) ---------------------------------

    def _launch_batch(self, unit: Unit[Row]) -> None:
        """One request for the unit's rows: a batch in the first row's name (its seq for the
        in-request retries, the probe and the attempts), its headers (the same for all)."""
        rows = [row for row, _ in unit.items]
        lead = rows[0]
        sent = dataclasses.replace(
            lead, path=unit.members[0].batch_path, body=unit.body(), events=len(rows)
        )
        self.sending += 1
        for row in rows:
            self.row_failures.sent(row.seq)
        task = asyncio.create_task(self._deliver_together(sent, unit), name=f"batch-{lead.seq}")
        for row in rows:
            self.inflight[row.seq] = task

    async def _deliver_together(self, sent: Row, unit: Unit[Row]) -> None:
        alone: list[int] = []
        try:
            try:
                attempt = await self._attempt(sent, per_event=False)
            finally:
                self.sending -= 1
                self._slot_freed.set()
            alone = await self._settle_together(sent, unit, attempt)
        except BufferError_ as exc:
            log.error("forwarder_bookkeeping_failed", seq=sent.seq, error=str(exc))
            await self._after_bookkeeping_failure()
        finally:
            if alone:
                # Back behind the cursor for a request each; no await until they leave
                # `inflight`, so that no read of the buffer passes over them meanwhile.
                self._alone.update(alone)
                self._rewind()
            for row, _ in unit.items:
                self.inflight.pop(row.seq, None)
                self._answered.pop(row.seq, None)
                self._answer_waiters(row.seq, None)  # a browser late for it gets {"ok":true}
            if self.probe_seq == sent.seq:
                self.probe_seq = None
            self._slot_freed.set()

    async def _settle_together(self, sent: Row, unit: Unit[Row], attempt: Attempt) -> list[int]:
        """Settle rows sent together by Jitsu's answer to their batch; returns the rows to
        send alone. A request that failed is one failure (the outage logic, as for one row),
        and its rows stay; refused whole (Jitsu's strict key lookup for batches, a 413), each
        row goes alone and gets the answer Jitsu gives it alone."""
        everyone = [row.seq for row, _ in unit.items]
        fates: list[Settled] = []
        if attempt.outcome is Outcome.DELIVERED:
            payload = jitsu_json(attempt.body) if attempt.whole else None
            if payload is None:
                fates = [Settled(Fate.ALONE)] * len(everyone)
            else:
                fates = read_answer(unit.members, payload)
            retry = [f for f in fates if f.fate is Fate.RETRY]
            if retry and not any(f.fate in (Fate.TAKEN, Fate.REFUSED) for f in fates):
                # Nothing taken, nothing refused: Jitsu's own trouble (say Kafka).
                reason = f"upstream could not take {len(retry)} event(s): {retry[0].message}"
                reason = _reason(reason, sent.headers.get("X-Write-Key"))
                attempt = dataclasses.replace(attempt, outcome=Outcome.RETRY, reason=reason)
        self.metrics.upstream_requests.labels(attempt.outcome.value).inc()
        tries = self.attempts.pop(sent.seq, 1)
        status = attempt.status
        if attempt.outcome is Outcome.RETRY:
            if status is not None and 400 <= status < 500 and status not in RETRY_STATUSES:
                # Trouble with this request (an ingress's 404 for the batch route).
                return self._refused_whole(sent, attempt, everyone)
            verdict = self._failed(sent, attempt)
            if verdict is not None and verdict.lone:
                return everyone  # failing while others go through: which row, alone will say
            return [seq for seq, f in zip(everyone, fates, strict=False) if f.fate is Fate.ALONE]
        if status is not None:
            self._recovered()
        if attempt.outcome is Outcome.REJECTED:
            if status == 413 and len(sent.body) // 2 < self._batch_bytes:
                self._batch_bytes = max(MIN_BATCH_BYTES, len(sent.body) // 2)
            return self._refused_whole(sent, attempt, everyone)
        return await self._settle_fates(sent, unit, fates, status, tries)

    def _refused_whole(self, sent: Row, attempt: Attempt, everyone: list[int]) -> list[int]:
        log.info(
            "batch_coalesced_refused",
            seq=sent.seq,
            events=len(everyone),
            status=attempt.status,
            reason=attempt.reason,
            key_id=sent.key_id,
            batch_bytes=self._batch_bytes,
            then="each event alone",
        )
        return everyone

    async def _settle_fates(
        self, sent: Row, unit: Unit[Row], fates: list[Settled], status: int | None, tries: int
    ) -> list[int]:
        """Each row by its event's fate, in one transaction; returns the rows to send alone."""
        key = sent.headers.get("X-Write-Key")
        taken: list[int] = []
        dead: list[DeadRow] = []
        alone: list[int] = []
        again: list[tuple[Row, Settled]] = []
        for (row, m), fate in zip(unit.items, fates, strict=True):
            assert m is not None
            if fate.fate is Fate.TAKEN:
                taken.append(row.seq)
            elif fate.fate is Fate.REFUSED:
                refused_status, reason = refusal(m, fate.message)
                dead.append(DeadRow(row.seq, refused_status, _reason(reason, key), tries))
            elif fate.fate is Fate.ALONE:
                alone.append(row.seq)
                continue
            else:
                again.append((row, fate))
                continue
            self.row_failures.ok(row.seq)
        parked: dict[int, float] = {}
        for row, fate in again:
            # Others of the batch went through: a failure of this row's own (RowFailures).
            verdict = self.row_failures.failure(row.seq)
            reason = _reason(f"upstream could not take the event: {fate.message}", key)
            if verdict.dead:
                dead.append(DeadRow(row.seq, status, _gave_up(reason, verdict), tries))
                self.row_failures.forget(row.seq)
            else:
                parked[row.seq] = time.monotonic() + self.backoff.delay(verdict.failures)
        await self.buffer.settle(RowsSettlement(tuple(taken), tuple(dead)))
        self.parked.update(parked)
        self.metrics.events_delivered.inc(len(taken))
        rows = {row.seq: row for row, _ in unit.items}
        for letter in dead:
            self._dead_lettered(rows[letter.seq], letter.status, letter.reason, tries, 1)
        if taken and len(self.refusals):
            lead = unit.items[0][0]
            self.refusals.forget(fingerprint(key, lead.path, lead.headers))
        if len(taken) == len(fates):
            log.debug("batch_coalesced", seq=sent.seq, events=len(taken), attempts=tries)
        else:
            log.info(
                "batch_coalesced_partially_accepted",
                seq=sent.seq,
                accepted=len(taken),
                dead_lettered=len(dead),
                retrying=len(parked),
                alone=len(alone),
                key_id=sent.key_id,
                retry_reason=_reason(again[0][1].message, key) if again else None,
            )
        return alone

    def _dead_lettered(
        self, row: Row, status: int | None, reason: str, tries: int, events: int
    ) -> None:
        """Events of `row` became dead letters (committed): counted and logged, in one place."""
        self.metrics.dead_lettered(status, events)
        log.warning(
            "event_dead_lettered",
            seq=row.seq,
            path=row.path.split("?", 1)[0],
            key_id=row.key_id,
            status=status,
            reason=reason,
            attempts=tries,
            events=events,
        )

    async def _attempt(self, row: Row, *, per_event: bool = True) -> Attempt:
        """One delivery attempt; whatever goes wrong in it is an outcome, never an escape
        that would leave the row unsettled and skipped until the next restart."""
        if row.problem is not None:
            return Attempt(Outcome.REJECTED, None, f"row cannot be sent: {row.problem}")
        try:
            return await self._send(row, per_event=per_event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("forwarder_send_failed", seq=row.seq)
            key = row.headers.get("X-Write-Key")
            reason = redact(f"internal error: {type(exc).__name__}: {exc}", key)
            return Attempt(Outcome.RETRY, None, reason)

    def _answer_waiters(self, seq: int, attempt: Attempt | None) -> None:
        """Hand the first answer to a row to whoever waits for it (answer_now); keep it while
        the row is settled, for one who comes a moment late."""
        if attempt is not None:
            self._answered[seq] = attempt
        waiter = self._waiters.pop(seq, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(attempt)

    def _note_key_verdict(self, row: Row, attempt: Attempt) -> None:
        """Remember Jitsu's "stream not found" for this key, route kind and Host; forget it
        once an event under them gets through (the stream exists now)."""
        refused = attempt.outcome is Outcome.REJECTED and (attempt.jitsu_error or "").startswith(
            STREAM_NOT_FOUND
        )
        if not refused and (attempt.outcome is not Outcome.DELIVERED or not len(self.refusals)):
            return
        print_ = fingerprint(row.headers.get("X-Write-Key"), row.path, row.headers)
        if refused:
            assert attempt.jitsu_error is not None
            if self.refusals.refused(print_) is None:
                log.warning(
                    "key_refused_upstream",
                    key_id=row.key_id,
                    route=route_kind(row.path),
                    answered_at_edge_for_s=self.config.key_refusal_ttl_s,
                )
            # Remembered for whoever comes next with this key: routes names their host.
            self.refusals.remember(
                print_, attempt.jitsu_error.replace(self._upstream_domain, CLIENT_DOMAIN)
            )
        else:
            self.refusals.forget(print_)

    def waiting(self, delay: float) -> None:
        """Upstream fails: the next attempt goes out after `delay`."""
        self.backoff_s = delay
        self.next_probe_at = time.time() + delay

    def next_attempt_in_s(self) -> float:
        """How long until the next attempt while upstream fails; 0 when it works."""
        return max(0.0, self.next_probe_at - time.time()) if self.failing else 0.0

    def _recovered(self) -> None:
        """Upstream gave an answer that is not trouble: not failing any more."""
        self.failing = False
        self.failures = 0
        self.backoff_s = 0.0
        self.retry_after_s = None
        self.probe_after = 0
        if self.redirected_to is not None:
            log.info("upstream_redirect_cleared")
            self.redirected_to = None

    async def _after_bookkeeping_failure(self) -> None:
        """The rows go again, but not at once: a write that failed now likely fails again in a
        moment, and resending at once made a hot loop of requests and log lines. The rows stay
        in `inflight` (out of every fetch) while this waits."""
        await asyncio.sleep(BOOKKEEPING_RETRY_S)
        self._rewind()

    def _rewind(self) -> None:
        self.cursor = 0
        self._rewinds += 1
        self._ahead.clear()

    def _failed(self, row: Row, attempt: Attempt) -> RowVerdict | None:
        """A retryable failure: park the row if it fails alone, else upstream is failing."""
        self._rewind()  # resend from the oldest row once upstream is back
        if not attempt.sent:
            return None  # handed back before it was sent: nothing new was learnt about upstream
        # An answer from something in front of Jitsu about this request (400, 404, 414, 431
        # from an ingress) is the row's own trouble while others were delivered a moment ago.
        about_the_row = attempt.status is not None and 400 <= attempt.status < 500
        verdict = attempt.verdict or self.row_failures.failure(row.seq, about_the_row)
        if attempt.location is not None:
            if self.redirected_to is None:
                log.error(
                    "upstream_redirect",
                    status=attempt.status,
                    location=attempt.location,
                    hint="redirects are not followed; fix upstream.url",
                )
            self.redirected_to = attempt.location
        if verdict.lone:
            if not verdict.dead:
                delay = self.backoff.delay(verdict.failures, attempt.retry_after_s)
                self.parked[row.seq] = time.monotonic() + delay
                log.warning(
                    "upstream_retry_row",
                    seq=row.seq,
                    status=attempt.status,
                    reason=attempt.reason,
                    lone_failures=verdict.failures,
                    retry_in_s=round(delay, 3),
                )
            return verdict
        was_failing, self.failing = self.failing, True
        if self.probe_seq not in (None, row.seq):
            return verdict  # another request is the probe; only its failures shape the backoff
        if was_failing and self.probe_seq is None:
            # Rows that were in flight when upstream began to fail: one failure, not one
            # step of backoff each (16 at once sent it to its ceiling: second attack pass).
            return verdict
        self.failures += 1
        self.retry_after_s = attempt.retry_after_s
        log.warning(
            "upstream_retry",
            seq=row.seq,
            status=attempt.status,
            reason=attempt.reason,
            failures=self.failures,
            retry_after_s=attempt.retry_after_s,
        )
        return verdict

    async def _send(self, row: Row, *, per_event: bool = True) -> Attempt:
        """Send the row; a 2xx is read event by event (`per_event`) unless the caller does."""
        key = row.headers.get("X-Write-Key")
        try:
            assert self.client is not None, "start() first"
            async with self.client.request(
                row.method,
                self.base_url + row.path,
                data=row.body or None,
                headers=row.headers,
                timeout=self.timeout,
                # The key goes to upstream.url and nowhere else (issue 7, finding 2).
                allow_redirects=False,
                trace_request_ctx={"seq": row.seq},
                retry_options=_InRequestRetry(self, self.config.retry.request_attempts, row.seq),
            ) as resp:
                body, whole = await _read_answer(resp)
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                jitsu_error = resp.headers.get("X-Jitsu-Error")
                location = resp.headers.get("Location") if 300 <= status < 400 else None
        except _HandBack as hb:
            reason = f"upstream answered {hb.status}" if hb.status else "transport error"
            return Attempt(
                Outcome.RETRY,
                hb.status,
                reason,
                hb.retry_after_s,
                sent=hb.sent,
                verdict=hb.verdict,
            )
        except aiohttp.ClientSSLError as exc:
            # Upstream's certificate does not verify (upstream.ca_file?) or the handshake
            # failed: the path to upstream is wrong, not the row, which waits in the buffer.
            # Caught before ValueError: ssl.CertificateError is one (issue 10).
            reason = redact(f"TLS error: {type(exc).__name__}: {exc}", key)
            return Attempt(Outcome.RETRY, None, reason)
        except (aiohttp.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
            # The stored request itself cannot be sent (a header or URL aiohttp refuses):
            # retrying cannot help, and it must not sit at the head of the queue for ever.
            reason = redact(f"request cannot be sent: {type(exc).__name__}: {exc}", key)
            return Attempt(Outcome.REJECTED, None, reason)
        except (TimeoutError, aiohttp.ClientError) as exc:
            reason = redact(f"transport error: {type(exc).__name__}: {exc}", key)
            return Attempt(Outcome.RETRY, None, reason)
        outcome, reason = classify_answer(
            row.method,
            status,
            body,
            jitsu_error,
            whole=whole,
            to_destination=location is not None
            and _same_url(location, pixel_destination(row.path)),
        )
        reason = redact(reason, key)
        if outcome is Outcome.RETRY:
            return Attempt(
                outcome,
                status,
                reason,
                retry_after,
                location=None if location is None else _without_query(location),
            )
        if outcome is Outcome.REJECTED:
            return Attempt(
                outcome,
                status,
                reason[:MAX_REASON],
                too_large=status == 413,
                body=body,
                whole=whole,
                jitsu_error=_jitsu_error(row.method, body, jitsu_error, key),
            )
        if not per_event:
            return Attempt(outcome, status, reason, body=body, whole=whole)
        attempt = _per_event(row, status, body, key, whole=whole)
        return dataclasses.replace(attempt, body=body, whole=whole)

    def _browser_answer(self, attempt: Attempt, row: Row) -> UpstreamAnswer | None:
        """What of upstream's answer a waiting browser gets: Jitsu's verdict on the event only
        (not trouble on the way), its JSON only, the secret masked, and in place of the Host
        Jitsu names in "stream not found" ([domain: ...]: without upstream.preserve_host,
        upstream.url's, an internal name: attack pass, F7) the client's own. Worked out here,
        for the rows a browser waits on, not for every answer."""
        if attempt.outcome is Outcome.RETRY or attempt.status is None:
            return None
        body = _browser_body(attempt.body, row.headers.get("X-Write-Key"), attempt.whole)
        if body is None:
            return None
        upstream = self._upstream_domain.encode()
        if upstream in body:
            body = body.replace(upstream, _client_domain(row).encode())
        return UpstreamAnswer(attempt.status, body)

    # ---- state for health and metrics ------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "failing": self.failing,
            "consecutive_failures": self.failures,
            "redirected_to": self.redirected_to,
            "rows_retrying_alone": len(self.parked),
            "in_flight": self.sending,
            "in_flight_for_browsers": self.sync_sending,
            "keys_refused": len(self.refusals),
            "next_probe_in_s": round(self.next_attempt_in_s(), 3),
        }


def _same_url(location: str, destination: str | None) -> bool:
    """Jitsu's redirect is to `destination` as Go's http.Redirect writes it: non-ASCII bytes
    percent-escaped (a link to /größe comes back as /gr%c3%b6%c3%9fe)."""
    return destination is not None and unquote(location) == unquote(destination)


def _client_domain(row: Row) -> str:
    """How Jitsu would have named the client's Host ([domain: ...], getDataLocator)."""
    return f"[domain: {row.headers.get('X-Forwarded-Host', '').split(':', 1)[0]}]"


def _browser_body(body: bytes, key: str | None, whole: bool) -> bytes | None:
    """What of an answer may go to a browser: Jitsu's JSON only (an ingress's HTML 413 is not
    Jitsu's answer; a cut one would be broken JSON: the browser gets {"ok":true} then), with
    the secret masked however the JSON spells it (Jitsu quotes whole keys in its errors)."""
    payload = jitsu_json(body) if whole else None
    if payload is None:
        return None
    if not key:
        return body
    secret = key.split(":", 1)[-1]
    masked = _redact_strings(payload, key)
    if masked != payload or secret in body.decode("utf-8", "replace"):
        # Masked in the decoded strings: in the JSON text a secret with " or \ in it is
        # escaped, and a search there misses it (second attack pass, finding 2).
        return json.dumps(masked, ensure_ascii=False, separators=(",", ":")).encode()
    return body


def _redact_strings(value: Any, key: str) -> Any:
    """`value` (decoded JSON) with the key's secret masked in every string, keys included."""
    if isinstance(value, str):
        return redact(value, key)
    if isinstance(value, list):
        return [_redact_strings(v, key) for v in value]
    if isinstance(value, dict):
        return {redact(k, key): _redact_strings(v, key) for k, v in value.items()}
    return value


def _jitsu_error(method: str, body: bytes, header: str | None, key: str | None) -> str | None:
    """Jitsu's refusal message (the pixel's in X-Jitsu-Error, the others' in the JSON body),
    with the secret masked: Jitsu quotes the whole key in "stream not found" messages."""
    text: object = header
    if method != "GET":
        payload = jitsu_json(body)
        text = payload.get("error") if payload is not None else None
    return redact(text, key)[:1024] if isinstance(text, str) and text else None


def _per_event(
    row: Row, status: int, body: bytes, key: str | None, *, whole: bool = True
) -> Attempt:
    """A 2xx answer read event by event: Jitsu's batch answers 200 with `errors` naming the
    events it did not take (router_batch_handler.go). A batch is taken apart when some of its
    events went through or were refused; a row that is not a batch stands or falls whole."""
    if not whole:
        # Only a long list of errors makes Jitsu's batch answer this large: halves of the
        # batch get answers that can be read.
        batch = read_stored_batch(row.body) if row.events > 1 else None
        split = batch is not None and len(batch.events) > 1
        return Attempt(Outcome.DELIVERED, status, "ok", too_large=split)
    payload = jitsu_json(body)
    if payload is None or not payload.get("errors"):
        return Attempt(Outcome.DELIVERED, status, "ok")
    batch = read_stored_batch(row.body)
    if batch is not None:
        ids = batch.message_ids
    else:
        single = jitsu_json(row.body)
        ids = (single.get("messageId"),) if single is not None else (None,) * row.events
    verdicts = read_batch_answer(ids, payload)
    retry = [v for v in verdicts if v.fate is EventFate.RETRY]
    refused = [v for v in verdicts if v.fate is EventFate.REFUSED]
    if not retry and not refused:
        return Attempt(Outcome.DELIVERED, status, "ok")
    if batch is not None and len(retry) < len(verdicts):
        return Attempt(Outcome.DELIVERED, status, "ok", partial=PartialBatch(batch, verdicts))
    # Nothing taken and nothing refused (Jitsu's own trouble, say Kafka), or a row that cannot
    # be taken apart: it fails whole, as any row does.
    if retry:
        reason = f"upstream could not take {len(retry)} of {len(verdicts)} event(s)"
        return Attempt(Outcome.RETRY, status, _reason(f"{reason}: {retry[0].reason}", key))
    return Attempt(Outcome.REJECTED, status, _reason(f"upstream refused: {refused[0].reason}", key))


def _reason(text: str, key: str | None) -> str:
    return redact(text, key)[:MAX_REASON]


def _gave_up(reason: str, verdict: RowVerdict) -> str:
    return f"{reason}; failed {verdict.failures} times while other events were delivered"


def _seq(row: Row) -> int:
    return row.seq


async def _read_answer(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """Up to MAX_RESPONSE_BYTES of the answer, and whether that is all of it. (One read()
    returns what has arrived so far, not the whole answer.)"""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_RESPONSE_BYTES:
        chunk = await resp.content.read(MAX_RESPONSE_BYTES + 1 - size)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:MAX_RESPONSE_BYTES], False


def _without_query(url: str) -> str:
    """A Location for the log: no query string, which may carry anything."""
    return url.split("?", 1)[0].split("#", 1)[0][:200]


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
