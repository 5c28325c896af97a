"""Batches settled event by event (issue 8, point 6): what Jitsu took leaves the buffer once and
is never sent again, what it refused is dead-lettered on its own, what failed on its side is
retried; a batch upstream finds too large is split until it fits or one event is left."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.buffer import DB_NAME as BUFFER_DB
from proxy.buffer import Buffer, DeadLetterFilter, Piece, RowSettlement
from proxy.deadletters import replay
from proxy.envelope import Envelope, read_stored_batch
from proxy.errors import BufferError_
from proxy.retry import (
    EventFate,
    EventVerdict,
    jitsu_message_id,
    read_batch_answer,
)
from tests.conftest import test_config, until
from tests.fakejitsu import Answer, FakeJitsu
from tests.faults.invariants import drain, read_buffer
from tests.procs import ProxyProcess
from tests.test_forwarding import KEY, send, state
from tests.test_hostile_upstream import metric

SECRET = KEY.split(":", 1)[1]
REFUSED = "event error: Unknown event type: nope"
PRODUCER = "error# 6fQ2: producer error"
NO_DST = "no destinations found for stream: s1"
A, R, T = EventFate.ACCEPTED, EventFate.REFUSED, EventFate.RETRY


def batch(*ids: Any, **extra: Any) -> dict[str, Any]:
    return {"batch": [{"type": "track", "event": "e", "messageId": m, **extra} for m in ids]}


async def post_batch(proxy: TestClient[Any, Any], payload: dict[str, Any]) -> None:
    resp = await proxy.post("/v1/batch", headers={"X-Write-Key": KEY}, json=payload)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["ok"] is True


def log_lines(logs: io.StringIO, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in logs.getvalue().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == event]


def fates(verdicts: tuple[EventVerdict, ...]) -> list[EventFate]:
    return [v.fate for v in verdicts]


# ---- Jitsu's answer, read event by event (pure) -------------------------------------------


@pytest.mark.parametrize(
    ("message_id", "jitsu_id"),
    [
        ("Ab-1.2_3", "Ab-1.2_3"),
        ("a b/c:é", "a_b_c__"),  # one `_` per character, as Go's regexp does per rune
        ("😀x", "_x"),
        ("x" * 70, "x" * 64),  # utils.ShortenString(…, 64)
        ("", None),  # Jitsu makes up a uuid
        (123, None),  # GetS: not a string, so none
        (None, None),
    ],
)
def test_jitsu_message_id_mirrors_the_batch_handler(message_id: Any, jitsu_id: str | None) -> None:
    assert jitsu_message_id(message_id) == jitsu_id


def test_each_event_gets_jitsus_verdict() -> None:
    answer = {
        "ok": False,
        "receivedEvents": 5,
        "okEvents": 1,
        "errors": [
            f"Message ID: b: {REFUSED}",
            f"Message ID: c: {PRODUCER}",
            f"Message ID: d: {NO_DST}",
            "Message ID: e_f: quota exceeded: billing quota exceeded, event throttled",
        ],
    }
    verdicts = read_batch_answer(["a", "b", "c", "d", "e f"], answer)
    assert fates(verdicts) == [A, R, T, A, R]
    assert verdicts[1].reason == REFUSED
    assert verdicts[2].reason == PRODUCER
    # No errors at all, or only "no destinations" (in-batch duplicates are simply not named).
    assert fates(read_batch_answer(["a", "b"], {"ok": True, "okEvents": 2})) == [A, A]
    harmless = {"errors": [f"Message ID: zz: {NO_DST}"], "deduplicatedEvents": 1}
    assert fates(read_batch_answer(["a", "b"], harmless)) == [A, A]


def test_errors_that_cannot_be_pinned_on_events_resend_without_dead_lettering() -> None:
    # Not Jitsu's form: any event not named may be the one; none is dead-lettered unnamed.
    odd = {"errors": [f"Message ID: b: {REFUSED}", "something broke"]}
    assert fates(read_batch_answer(["a", "b", "c"], odd)) == [T, R, T]
    # An id Jitsu made up is about an event without a string messageId: that one only.
    made_up = {"errors": [f"Message ID: 0b5c2c4e-uuid: {REFUSED}"]}
    assert fates(read_batch_answer(["a", 7, "c"], made_up)) == [A, T, A]
    # ...unless no event lacks one: then the answer is not understood.
    assert fates(read_batch_answer(["a", "c"], made_up)) == [T, T]
    # Counts that do not describe this batch: everything again.
    assert fates(read_batch_answer(["a", "b"], {"receivedEvents": 3, "errors": ["x"]})) == [T, T]
    # Two events share an id: errors in order when every one is named, else both again.
    twice = {"errors": [f"Message ID: x: {REFUSED}", f"Message ID: x: {PRODUCER}"]}
    assert fates(read_batch_answer(["x", "y", "x"], twice)) == [R, A, T]
    once = {"errors": [f"Message ID: x: {REFUSED}"]}
    assert fates(read_batch_answer(["x", "y", "x"], once)) == [T, A, T]
    # Errors that are not a list (attack pass: taken as "none", 39 of 40 events counted as
    # delivered that upstream never stored): nothing is known, everything again.
    for odd_errors in ("everything failed", {"a": "x"}, 1, True):
        assert fates(read_batch_answer(["a", "b"], {"ok": True, "errors": odd_errors})) == [T, T]


def test_a_stored_batch_comes_apart_with_its_bytes() -> None:
    body = b'{"context":{"ip":"1.2.3.4"},"batch":[{"messageId":"a","n":1.0E5},{"messageId":7}]}'
    stored = read_stored_batch(body)
    assert stored is not None
    assert stored.message_ids == ("a", 7)
    assert stored.body(range(2)) == body
    assert stored.body([1]) == b'{"context":{"ip":"1.2.3.4"},"batch":[{"messageId":7}]}'
    assert read_stored_batch(b'{"messageId":"single"}') is None


# ---- the buffer: one transaction ----------------------------------------------------------


def stored_batch_envelope(*ids: str) -> Envelope:
    body = json.dumps(batch(*ids), separators=(",", ":")).encode()
    return Envelope("/v1/batch", {"X-Write-Key": KEY}, body, len(ids), "kid")


def table_totals(path: Path) -> tuple[int, ...]:
    with sqlite3.connect(path / BUFFER_DB) as conn:
        live = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(events), 0) FROM events"
        ).fetchone()
        dead = conn.execute(
            "SELECT count(*), coalesce(sum(size + length(CAST(reason AS BLOB))), 0)"
            " FROM dead_letter"
        ).fetchone()
    return (*live, *dead)


def booked(buf: Buffer) -> tuple[int, ...]:
    return (buf.rows, buf.bytes, buf.events, buf.dead_rows, buf.dead_bytes)


async def test_a_settlement_that_fails_midway_leaves_the_row_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "buffer"
    buf = Buffer(path, 10_000_000)
    await buf.open()
    env = stored_batch_envelope("a", "b", "c", "d")
    (seq,) = await buf.append([env])
    before = booked(buf)
    stored = read_stored_batch(env.body)
    assert stored is not None
    settlement = RowSettlement(
        seq,
        keep=Piece(stored.body([2]), 1),
        more=(Piece(stored.body([3]), 1),),
        dead=(Piece(stored.body([1]), 1, "upstream refused: " + REFUSED),),
        status=200,
        attempts=2,
    )
    # The last step of the transaction fails: the split-off row written before it must go too.
    with sqlite3.connect(path / BUFFER_DB) as conn:
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON dead_letter"
            " BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
    with pytest.raises(BufferError_):
        await buf.settle(settlement)
    (row,) = await buf.fetch(0, 10)
    assert (row.seq, row.body, row.events, row.size) == (seq, env.body, 4, env.stored_size)
    assert booked(buf) == before == table_totals(path)
    assert await buf.dead_letters() == []

    with sqlite3.connect(path / BUFFER_DB) as conn:
        conn.execute("DROP TRIGGER boom")
    await buf.settle(settlement)
    kept, split_off = await buf.fetch(0, 10)
    assert (kept.seq, kept.body, kept.events) == (seq, stored.body([2]), 1)
    assert split_off.seq > seq and split_off.body == stored.body([3])
    assert split_off.received_at == kept.received_at  # the events' age stays true
    # Sizes as if each piece had been stored on its own.
    for got in (kept, split_off):
        alone = Envelope(env.path, env.headers, got.body, 1, env.key_id)
        assert got.size == alone.stored_size
    (dead,) = await buf.dead_letters()
    assert dead["body"] == stored.body([1]) and dead["events"] == 1
    assert (dead["status"], dead["attempts"], dead["reason"]) == (
        200,
        2,
        f"upstream refused: {REFUSED}",
    )
    assert dead["seq"] not in (kept.seq, split_off.seq)
    assert booked(buf) == table_totals(path)
    await buf.close()
    reopened = Buffer(path, 10_000_000)
    await reopened.open()
    assert booked(reopened) == table_totals(path)
    await reopened.close()


# ---- through the proxy --------------------------------------------------------------------


async def test_a_partial_answer_settles_each_event(
    make_proxy: Any, upstream: FakeJitsu, tmp_path: Path, logs: io.StringIO
) -> None:
    tries: dict[str, int] = {}

    def jitsu(mid: Any) -> str | None:
        tries[mid] = tries.get(mid, 0) + 1
        if mid == "c" and tries[mid] <= 2:
            return PRODUCER
        return {"b": REFUSED, "d": NO_DST}.get(mid)

    upstream.event_error = jitsu
    proxy = await make_proxy()
    await post_batch(proxy, batch("a", "b", "c", "d"))
    buf = state(proxy).buffer
    await until(lambda: buf.rows == 0 and buf.dead_rows == 1)

    sent = [r.message_ids for r in upstream.received]
    assert sent == [["a", "b", "c", "d"], ["c"], ["c"]], "only what Jitsu did not take goes again"
    assert sorted(upstream.taken_ids()) == ["a", "c", "d"]
    (dead,) = await buf.dead_letters()
    assert [e["messageId"] for e in json.loads(dead["body"])["batch"]] == ["b"]
    assert (dead["events"], dead["status"]) == (1, 200)
    assert dead["reason"] == f"upstream refused: {REFUSED}"
    assert await metric(proxy, "proxy_events_delivered_total") == 3
    assert await metric(proxy, "proxy_events_dead_lettered_total") == 1
    first = log_lines(logs, "batch_partially_accepted")[0]
    assert {k: first[k] for k in ("accepted", "retrying", "dead_lettered", "key_id")} == {
        "accepted": 2,  # "no destinations" is what Jitsu does without the proxy too
        "retrying": 1,
        "dead_lettered": 1,
        "key_id": "kid",
    }
    assert SECRET not in logs.getvalue()

    # After a restart nothing is left to send; a replay sends the refused event, and only it.
    await proxy.close()
    upstream.event_error = None
    restarted = await make_proxy()
    assert state(restarted).buffer.rows == 0
    await restarted.close()
    assert await replay(test_config(tmp_path, upstream.url), DeadLetterFilter()) == 1
    replayed = await make_proxy()
    await upstream.wait_for(lambda f: len(f.received) == 4)
    await until(lambda: state(replayed).buffer.rows == 0)
    assert upstream.received[-1].message_ids == ["b"]
    assert sorted(upstream.taken_ids()) == ["a", "b", "c", "d"]


async def test_transient_errors_on_every_event_are_retried_like_an_outage(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, logs: io.StringIO
) -> None:
    answers = iter([PRODUCER] * 6)
    upstream.event_error = lambda _mid: next(answers, None)
    await post_batch(proxy, batch("a", "b", "c"))
    await upstream.wait_for(lambda f: sorted(f.taken_ids()) == ["a", "b", "c"])
    buf = state(proxy).buffer
    await until(lambda: buf.rows == 0)
    assert buf.dead_rows == 0
    assert [len(r.message_ids) for r in upstream.received] == [3, 3, 3]
    assert [x["status"] for x in log_lines(logs, "upstream_retry")] == [200, 200]
    assert log_lines(logs, "batch_partially_accepted") == []


async def test_a_batch_too_large_for_upstream_is_split_until_it_fits(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, logs: io.StringIO
) -> None:
    upstream.max_batch_events = 2
    ids = [f"m{i}" for i in range(7)]
    await post_batch(proxy, batch(*ids))
    buf = state(proxy).buffer
    await upstream.wait_for(lambda f: sorted(f.taken_ids()) == ids)
    await until(lambda: buf.rows == 0)
    assert buf.dead_rows == 0
    too_large = [r for r in upstream.received if r.status == 413]
    assert too_large and all(len(r.message_ids) > 2 for r in too_large)
    assert upstream.taken_ids().count("m0") == 1, "each event is taken once"
    splits = [(x["events"], x["into"]) for x in log_lines(logs, "batch_split")]
    assert splits[0] == (7, [3, 4])
    assert all(x["key_id"] == "kid" for x in log_lines(logs, "batch_split"))
    assert await metric(proxy, "proxy_events_delivered_total") == 7


async def test_an_event_too_large_on_its_own_is_dead_lettered(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    upstream.max_body_bytes = 4000
    payload = batch("a", "b", "c", "d")
    payload["batch"][2]["properties"] = {"blob": "x" * 5000}
    await post_batch(proxy, payload)
    resp = await proxy.post(
        "/api/s/s2s/track",
        headers={"X-Write-Key": KEY},
        json={"event": "e", "messageId": "single", "properties": {"blob": "y" * 5000}},
    )
    assert resp.status == 200  # (a browser route would pass Jitsu's 413 on: sync_browser)
    buf = state(proxy).buffer
    await upstream.wait_for(lambda f: sorted(f.taken_ids()) == ["a", "b", "d"])
    await until(lambda: buf.rows == 0 and buf.dead_rows == 2)
    dead = {tuple(_ids(d["body"])): d for d in await buf.dead_letters()}
    assert set(dead) == {("c",), ("single",)}
    for letter in dead.values():
        assert letter["status"] == 413 and letter["events"] == 1
        assert letter["reason"].startswith("upstream answered 413: request too large")
    assert await metric(proxy, "proxy_events_dead_lettered_total") == 2


def _ids(body: bytes) -> list[Any]:
    payload = json.loads(body)
    events = payload["batch"] if "batch" in payload else [payload]
    return [e.get("messageId") for e in events]


async def test_no_destinations_is_a_delivery(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    upstream.event_error = lambda _mid: NO_DST
    await post_batch(proxy, batch("a", "b"))
    # A single event: Jitsu answers 200 {"error": "no destinations..."} (router_ingest_handler).
    upstream.script.append(Answer(200, {"error": NO_DST}))
    await send(proxy, "single")
    buf = state(proxy).buffer
    await until(lambda: buf.rows == 0)
    assert buf.dead_rows == 0
    assert len(upstream.received) == 2, "nothing is sent twice"
    assert await metric(proxy, "proxy_events_delivered_total") == 3


async def test_an_answer_too_large_to_read_splits_the_batch(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    # Four errors of 300 KB: more than the 1 MB of an answer the forwarder reads.
    upstream.event_error = lambda _mid: "event error: " + "x" * 300_000
    await post_batch(proxy, batch("a", "b", "c", "d"))
    buf = state(proxy).buffer
    await until(lambda: buf.rows == 0 and buf.dead_rows == 2)
    # One dead letter per half: events refused for the same reason stay together.
    assert sorted(_ids(d["body"]) for d in await buf.dead_letters()) == [["a", "b"], ["c", "d"]]
    assert upstream.taken_ids() == []
    assert await metric(proxy, "proxy_events_dead_lettered_total") == 4


async def test_an_error_naming_no_event_is_retried_then_dead_lettered_alone(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Jitsu names an event without a string messageId by an id of its own: the proxy cannot
    tell it from the others, so it sends it again (never dead-lettering what was taken), and
    only RowFailures' bound, while other events go through, dead-letters it."""
    proxy = await make_proxy(upstream={"retry": {"max_row_failures": 2}})
    upstream.event_error = lambda mid: REFUSED if mid == 7 else None
    await post_batch(proxy, batch("a", 7, "b"))
    buf = state(proxy).buffer
    n = 0
    while buf.dead_rows == 0:
        n += 1
        assert n < 500, "never dead-lettered"
        await send(proxy, f"other{n}")  # traffic that goes through, to tell a lone failure
        await until(lambda: buf.rows <= 1)
    (dead,) = await buf.dead_letters()
    assert _ids(dead["body"]) == [7]
    assert "names no event" in dead["reason"]
    assert upstream.taken_ids().count("a") == 1 and upstream.taken_ids().count("b") == 1


@pytest.mark.slow
async def test_kill_9_while_batches_settle_loses_nothing_and_doubles_no_dead_letter(
    tmp_path: Path, upstream: FakeJitsu
) -> None:
    """The proxy dies at random moments while it settles batches that Jitsu takes in part:
    afterwards every event Jitsu refused is dead-lettered exactly once, every other event was
    taken, and no event that Jitsu took is in the dead letters."""
    rng = random.Random("batch-settle-kill-9")
    tries: collections.Counter[str] = collections.Counter()

    def jitsu(mid: Any) -> str | None:
        tries[mid] += 1
        if mid.endswith("-3"):
            return REFUSED
        return PRODUCER if mid.endswith("-7") and tries[mid] == 1 else None

    upstream.event_error = jitsu
    upstream.event_delay_s = 0.01
    await upstream.stop()
    proxy = ProxyProcess(tmp_path, upstream.url, upstream={"concurrency": 2})
    proxy.start()
    ids: list[str] = []
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as session:
            for b in range(60):
                some = [f"k{b:02d}-{i}" for i in range(10)]
                async with session.post(
                    proxy.url + "/v1/batch", json=batch(*some), headers={"X-Write-Key": KEY}
                ) as resp:
                    assert resp.status == 200
                ids += some
            await upstream.start()
            for _ in range(3):
                await upstream.wait_for(lambda f: f.in_flight >= 1)
                await asyncio.sleep(rng.uniform(0, 0.05))
                proxy.kill()
                proxy.start()
                await proxy.wait_ready()
            await drain(proxy, session)
            assert await proxy.terminate_async() == 0
    finally:
        proxy.stop()
    held = read_buffer(proxy.buffer_db)
    refused = sorted(i for i in ids if i.endswith("-3"))
    assert sorted(mid for row in held.dead for mid in row.message_ids) == refused
    assert held.pending == []
    assert set(upstream.taken_ids()) == set(ids) - set(refused)
    # Every copy of an event, whichever body carried it, is the event as first stored.
    copies: dict[str, set[str]] = collections.defaultdict(set)
    for rec in upstream.received:
        for event in rec.json()["batch"]:
            copies[event["messageId"]].add(json.dumps(event, sort_keys=True))
    assert all(len(seen) == 1 for seen in copies.values())
