"""The fault suite's evidence and its one check: what clients were told (the ledger, kept by the
load clients here), what the fake upstream took, and what the proxy's SQLite file still holds.

The invariants are the proxy's promises (README, "Guarantees"; research notes §2.1-2.2):
accepted ⊆ delivered ∪ dead-lettered once drained; every copy of an event that reached
upstream is byte-identical; nothing is delivered that no client sent, or not as it was sent.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from proxy import fleet
from proxy.envelope import read_stored_batch
from tests.fakejitsu import FakeJitsu, Received
from tests.procs import ProxyProcess

KEY = "kidfault00000000000000000000000:FaultSecret000000000000000000000"
SINGLE_PATH = "/api/s/s2s/track"
BATCH_PATH = "/v1/batch"
COLUMNS = ("scenario", "sent", "accepted", "delivered", "dead-lettered", "duplicates", "lost")

# Every summary of this run, for the table printed at the end of the session (conftest).
RESULTS: list[Summary] = []


# ---- what clients sent and were told -------------------------------------------------------


@dataclasses.dataclass
class Ledger:
    """Every event a client tried to send, and which of them got a 2xx."""

    sent: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    accepted: set[str] = dataclasses.field(default_factory=set)
    # One entry per 2xx'd request, in the order the answers arrived: its messageIds.
    accepted_rows: list[list[str]] = dataclasses.field(default_factory=list)
    refused: int = 0  # requests answered, but not with a 2xx
    failed: int = 0  # requests with no answer at all (refused connection, reset, kill -9)

    def row_of(self, message_id: str) -> list[str]:
        """The messageIds of the accepted request that carried `message_id` (one buffer row)."""
        return next(ids for ids in self.accepted_rows if message_id in ids)


def make_event(message_id: str, pad: int = 0) -> dict[str, Any]:
    props: dict[str, Any] = {"source": "faults", "n": message_id.rsplit("-", 1)[-1]}
    if pad:
        props["pad"] = "x" * pad
    return {"type": "track", "event": "fault_test", "messageId": message_id, "properties": props}


async def send(
    session: aiohttp.ClientSession, base_url: str, ledger: Ledger, events: list[dict[str, Any]]
) -> bool:
    """One ingest request (a single event, or a batch of several), recorded in the ledger."""
    for event in events:
        ledger.sent[event["messageId"]] = event
    if len(events) == 1:
        url, payload = base_url + SINGLE_PATH, events[0]
    else:
        url, payload = base_url + BATCH_PATH, {"batch": events}
    try:
        async with session.post(url, json=payload, headers={"X-Write-Key": KEY}) as resp:
            answer = await resp.json(content_type=None)
            ok = resp.status == 200 and isinstance(answer, dict) and answer.get("ok") is True
    except (TimeoutError, aiohttp.ClientError, ValueError):
        ledger.failed += 1
        return False
    if not ok:
        ledger.refused += 1
        return False
    ids = [e["messageId"] for e in events]
    ledger.accepted.update(ids)
    ledger.accepted_rows.append(ids)
    return True


@dataclasses.dataclass
class Load:
    """Clients that send until told to stop or until `max_events`, each request a single event
    or a batch of 2-`max_batch`; they pause briefly after an error, as real SDKs back off."""

    session: aiohttp.ClientSession
    base_url: str
    ledger: Ledger
    rng: random.Random
    prefix: str
    clients: int = 4
    max_events: int = 2000
    max_batch: int = 20
    batch_share: float = 0.5
    pad: int = 0
    pause_s: float = 0.0
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    _next: int = dataclasses.field(default=0, init=False)

    def _take(self, n: int) -> list[str]:
        n = min(n, self.max_events - self._next)
        ids = [f"{self.prefix}-{self._next + i:06d}" for i in range(n)]
        self._next += n
        return ids

    async def _client(self) -> None:
        while not self.stop.is_set():
            size = (
                1 if self.rng.random() >= self.batch_share else self.rng.randint(2, self.max_batch)
            )
            ids = self._take(size)
            if not ids:
                return
            ok = await send(
                self.session, self.base_url, self.ledger, [make_event(i, self.pad) for i in ids]
            )
            if not ok:
                await asyncio.sleep(0.05)
            elif self.pause_s:
                await asyncio.sleep(self.pause_s)

    async def run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.run(), name=f"load-{self.prefix}")


# ---- what the proxy's file holds -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BufferRow:
    table: str
    seq: int
    body: bytes
    status: int | None = None
    reason: str | None = None
    attempts: int | None = None

    @property
    def message_ids(self) -> list[str]:
        return body_message_ids(self.body)


@dataclasses.dataclass(frozen=True)
class BufferFile:
    pending: list[BufferRow]  # still in `events`: not yet delivered
    dead: list[BufferRow]  # in `dead_letter`


def read_buffer(*dbs: Path) -> BufferFile:
    """Read the proxy's SQLite files (one per worker's shard) straight from disk; call it after
    the proxy stopped."""
    pending: list[BufferRow] = []
    dead: list[BufferRow] = []
    for db in dbs:
        conn = sqlite3.connect(db)
        try:
            pending += [
                BufferRow("events", seq, bytes(body))
                for seq, body in conn.execute("SELECT seq, body FROM events ORDER BY seq")
            ]
            dead += [
                BufferRow("dead_letter", seq, bytes(body), status, reason, attempts)
                for seq, body, status, reason, attempts in conn.execute(
                    "SELECT seq, body, status, reason, attempts FROM dead_letter ORDER BY seq"
                )
            ]
        finally:
            conn.close()
    return BufferFile(pending, dead)


def body_events(body: bytes) -> list[dict[str, Any]]:
    payload = json.loads(body)
    if isinstance(payload, dict) and isinstance(payload.get("batch"), list):
        return list(payload["batch"])
    return [payload]


def body_message_ids(body: bytes) -> list[str]:
    return [str(e.get("messageId")) for e in body_events(body)]


def event_bytes(body: bytes) -> list[tuple[str, bytes]]:
    """Each event of a request body, by messageId, with its own bytes."""
    stored = read_stored_batch(body)
    if stored is None:
        return [(str(e.get("messageId")), body) for e in body_events(body)]
    return [(str(mid), raw) for mid, raw in zip(stored.message_ids, stored.events, strict=True)]


# ---- the check -----------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    scenario: str
    sent: int
    accepted: int
    delivered: int
    dead_lettered: int
    duplicates: int
    lost: int
    # Sent without a 2xx (the request failed) and delivered anyway: committed, answer lost.
    unacked_delivered: int
    seed: str
    violations: list[str]

    def row(self) -> str:
        cells = (
            self.scenario,
            self.sent,
            self.accepted,
            self.delivered,
            self.dead_lettered,
            self.duplicates,
            self.lost,
        )
        return "| " + " | ".join(str(c) for c in cells) + " |"

    def detail(self, ledger: Ledger) -> str:
        return (
            f"requests without an answer: {ledger.failed}, refused: {ledger.refused}; "
            f"delivered although the client got no 2xx (committed, answer lost): "
            f"{self.unacked_delivered}"
        )

    @staticmethod
    def header() -> str:
        return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)

    def assert_ok(self) -> None:
        assert not self.violations, (
            f"{self.scenario} (seed {self.seed}): {len(self.violations)} violation(s):\n"
            + "\n".join(self.violations[:40])
        )


def check(
    scenario: str,
    ledger: Ledger,
    upstream: Sequence[Received],
    buffer: BufferFile,
    *,
    seed: str = "",
    expect_dead: Iterable[str] = (),
    max_duplicates: int | None = None,
) -> Summary:
    """Check the invariants after a drained run; record, print and return the summary.
    `expect_dead` lists the events upstream refused for good; any other dead letter is an event
    the proxy gave up on, which it must never do for a retryable failure."""
    violations: list[str] = []
    expect = set(expect_dead)

    delivered_count: collections.Counter[str] = collections.Counter()
    # messageId -> every distinct form of the event: in upstream requests of any status, and
    # in the rows still in the file. One id, one form: a resend may carry the event alone or
    # in another batch (coalesced with others, split after a 413), never altered.
    bodies: dict[str, set[bytes]] = collections.defaultdict(set)
    for rec in upstream:
        try:
            events = body_events(rec.body)
        except ValueError:
            if rec.status:  # status 0: cut off mid-body, never a request upstream could take
                violations.append(f"upstream answered a body that is not JSON: {rec.body[:80]!r}")
            continue
        for mid, raw in event_bytes(rec.body):
            bodies[mid].add(raw)
        for event in events:
            mid = str(event.get("messageId"))
            if 200 <= rec.status < 300:
                delivered_count[mid] += 1
            _check_content(mid, event, ledger, violations)

    dead: set[str] = set()
    for row in buffer.dead:
        ids = row.message_ids
        dead.update(ids)
        for mid, raw in event_bytes(row.body):
            bodies[mid].add(raw)
        if not row.reason or not row.attempts:
            violations.append(f"dead letter {row.seq} has no reason or attempts: {row}")
    pending = {mid for row in buffer.pending for mid in row.message_ids}
    if buffer.pending:
        violations.append(f"{len(buffer.pending)} row(s) still in `events` after the drain")

    delivered = set(delivered_count)
    lost = ledger.accepted - delivered - dead
    if lost:
        violations.append(f"{len(lost)} accepted event(s) lost: {sorted(lost)[:20]}")
    for mid, seen in sorted(bodies.items()):
        if len(seen) > 1:
            violations.append(f"{mid} reached upstream in {len(seen)} different forms")
    unknown = (delivered | dead | pending) - set(ledger.sent)
    if unknown:
        violations.append(f"{len(unknown)} event(s) no client sent: {sorted(unknown)[:20]}")
    gave_up = dead - expect
    if gave_up:
        violations.append(f"{len(gave_up)} event(s) dead-lettered unexpectedly: {sorted(gave_up)}")
    missed = (expect & ledger.accepted) - dead
    if missed:
        violations.append(f"rejected event(s) not in dead_letter: {sorted(missed)}")
    duplicates = sum(n - 1 for n in delivered_count.values())
    if max_duplicates is not None and duplicates > max_duplicates:
        violations.append(f"{duplicates} duplicate deliveries, expected at most {max_duplicates}")

    summary = Summary(
        scenario=scenario,
        sent=len(ledger.sent),
        accepted=len(ledger.accepted),
        delivered=len(delivered),
        dead_lettered=len(dead),
        duplicates=duplicates,
        lost=len(lost),
        unacked_delivered=len((delivered | dead) - ledger.accepted),
        seed=seed,
        violations=violations,
    )
    RESULTS.append(summary)
    print(f"\n{Summary.header()}\n{summary.row()}\n{summary.detail(ledger)}")
    return summary


def _check_content(mid: str, event: dict[str, Any], ledger: Ledger, violations: list[str]) -> None:
    """Each field the client sent arrives unchanged (the proxy may add, never alter)."""
    sent = ledger.sent.get(mid)
    if sent is None:
        return  # reported as "no client sent"
    changed = [k for k, v in sent.items() if event.get(k) != v]
    if changed:
        violations.append(f"{mid} arrived altered in {changed}")


def first_delivery_order(upstream: Sequence[Received], rows: list[list[str]]) -> list[str]:
    """The first messageId of each of `rows` (buffer rows: their events' ids), in the order
    upstream first took (2xx) one of its events, alone or in a batch with other rows."""
    taken: dict[str, int] = {}
    for n, rec in enumerate(
        sorted((r for r in upstream if 200 <= r.status < 300), key=lambda r: r.at)
    ):
        for mid in rec.message_ids:
            taken.setdefault(mid, n)
    firsts = [(min(taken.get(m, 1 << 30) for m in ids), i) for i, ids in enumerate(rows)]
    return [rows[i][0] for _, i in sorted(firsts)]


def max_displacement(accepted_rows: list[list[str]], delivered_heads: list[str]) -> int:
    """How far (in rows) the upstream order strays from the acceptance order."""
    position = {head: i for i, head in enumerate(delivered_heads)}
    worst = 0
    for i, ids in enumerate(accepted_rows):
        worst = max(worst, abs(position.get(ids[0], 1 << 30) - i))
    return worst


# ---- drain, stop, check ------------------------------------------------------------------


# A forwarder that leaves rows buffered while upstream is healthy and nothing is in flight has
# lost its place in the buffer (the bug test_forwarder_races.py guards against): fail loudly.
STALL_S = 3.0


async def drain(proxy: ProxyProcess, session: aiohttp.ClientSession, timeout: float = 60) -> None:
    """Wait until the buffer holds no row. With workers, /readyz adds up reports each worker
    writes twice a second: a row committed just before the clients stopped may not be in the
    others' reports yet, so "no row" counts only when it still holds a report period later."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    idle_since: float | None = None
    empty_since: float | None = None
    while True:
        state = await proxy.wait_state(session, lambda s: True, timeout=10)
        rows = state["buffer"]["rows"]
        upstream = state.get("upstream", {})
        if rows == 0:
            if "workers" not in state:
                return
            empty_since = empty_since if empty_since is not None else loop.time()
            if loop.time() - empty_since > 2 * fleet.PUBLISH_EVERY_S:
                return
            await asyncio.sleep(0.1)
            continue
        empty_since = None
        now = loop.time()
        if upstream.get("failing") or upstream.get("in_flight"):
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since > STALL_S:
            raise AssertionError(
                f"forwarder stalled: {rows} row(s) buffered, upstream healthy, nothing in "
                f"flight for {STALL_S} s: {state}"
            )
        if now > deadline:
            raise TimeoutError(f"buffer not drained in {timeout} s: {state}")
        await asyncio.sleep(0.1)


async def drain_and_check(
    scenario: str,
    proxy: ProxyProcess,
    upstream: FakeJitsu,
    session: aiohttp.ClientSession,
    ledger: Ledger,
    *,
    seed: str,
    drain_timeout: float = 60,
    **expect: Any,
) -> Summary:
    """Faults off, wait until the buffer is empty, stop the proxy (it must exit 0), then check
    its file and what upstream recorded."""
    upstream.fault = None
    await drain(proxy, session, drain_timeout)
    code = await proxy.terminate_async()
    assert code == 0, f"exit code {code}:\n{proxy.log_text()[-3000:]}"
    # Requests still held by the fake (hangs) end now and are recorded as not delivered.
    await upstream.stop()
    buffer = read_buffer(*proxy.buffer_dbs)
    summary = check(scenario, ledger, upstream.received, buffer, seed=seed, **expect)
    summary.assert_ok()
    return summary
