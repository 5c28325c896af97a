"""Bounded cost per request, and bounds that are bounds (issue 7, findings 5-8): gzip members,
events per batch, errors per answer, forwarded batch size, the buffer's byte count, the
dead-letter store, and the request size whatever its Content-Encoding says."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import sqlite3
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.envelope import Envelope
from tests.conftest import until
from tests.fakejitsu import Answer, FakeJitsu, Received
from tests.test_forwarding import KEY, state
from tests.test_hostile_upstream import metric

HEADERS = {"X-Write-Key": KEY, "Content-Type": "application/json"}
LONG = "E" * 50_000


async def test_gzip_members_are_capped(proxy: TestClient[Any, Any], upstream: FakeJitsu) -> None:
    # 160 000 tiny members once took 18 s of event loop (quadratic copying of the rest).
    member = gzip.compress(b" ")
    body = b"".join([member] * 160_000) + gzip.compress(b'{"batch":[{"type":"page"}]}')
    resp = await proxy.post(
        "/v1/batch", data=io.BytesIO(body), headers={**HEADERS, "Content-Encoding": "gzip"}
    )
    assert resp.status == 413
    assert (await resp.json())["error"] == "request body too large: more than 100 gzip members"
    # Under the cap, every member counts.
    body = b"".join([member] * 99) + gzip.compress(b'{"batch":[{"type":"page"}]}')
    resp = await proxy.post("/v1/batch", data=body, headers={**HEADERS, "Content-Encoding": "gzip"})
    assert resp.status == 200 and (await resp.json())["okEvents"] == 1
    await upstream.wait_delivered(1)


async def test_health_answers_while_a_large_batch_is_parsed(make_proxy: Any) -> None:
    proxy = await make_proxy(limits={"max_batch_events": 40_000})
    event = {"type": "track", "event": "e", "properties": {"p": "x" * 20, "n": [1, 2, 3]}}
    body = json.dumps({"batch": [event] * 36_000}).encode()  # about 3 MB, 36 000 events
    big = asyncio.create_task(proxy.post("/v1/batch", data=io.BytesIO(body), headers=HEADERS))
    # Parsed on the event loop, it would never wait for the worker: this would time out.
    await until(lambda: state(proxy).offload.pending == 1)
    health = await proxy.get("/healthz")
    assert health.status == 200
    assert not big.done(), "the large batch was parsed on the event loop, ahead of /healthz"
    resp = await big
    assert resp.status == 200 and (await resp.json())["okEvents"] == 36_000


async def test_a_small_body_cannot_become_millions_of_events(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    for batch in (b"{},", b"1,"):
        plain = b'{"eventsName":"x","batch":[' + batch * 5_000_000 + batch[:-1] + b"]}"
        resp = await proxy.post(
            "/v1/batch",
            data=gzip.compress(plain),
            headers={**HEADERS, "Content-Encoding": "gzip"},
        )
        assert resp.status == 413
        assert await resp.json() == {
            "error": "request body too large: a batch holds at most 10000 events"
        }
    assert upstream.received == []


async def test_the_error_list_of_a_batch_answer_is_capped(proxy: TestClient[Any, Any]) -> None:
    resp = await proxy.post(
        "/v1/batch", data=b'{"batch":[' + b"1," * 4999 + b"1]}", headers=HEADERS
    )
    answer = await resp.json()
    assert (answer["okEvents"], answer["receivedEvents"]) == (0, 5000)
    assert len(answer["errors"]) == 101
    assert answer["errors"][0] == "Event #0: error parsing message: event must be a JSON object"
    assert answer["errors"][-1] == "4900 more event(s) refused, not listed"


async def test_large_batches_go_upstream_in_pieces_with_their_context(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"max_batch_bytes": 64 * 1024})
    events = [
        {"type": "track", "event": "e", "messageId": f"m{i}", "properties": {"pad": "x" * 5000}}
        for i in range(40)
    ]
    payload = {"batch": events, "context": {"library": {"name": "sdk"}}, "writeKey": KEY}
    resp = await proxy.post("/v1/batch", json=payload)
    assert (await resp.json())["okEvents"] == 40
    await upstream.wait_for(lambda f: len(f.delivered_set) == 40)
    pieces = upstream.delivered
    assert len(pieces) >= 3
    for piece in pieces:
        assert len(piece.body) <= 64 * 1024
        assert piece.json()["context"] == {"library": {"name": "sdk"}}
        assert "writeKey" not in piece.json()
    assert [m for p in pieces for m in p.message_ids] == [f"m{i}" for i in range(40)]


async def test_buffer_bytes_count_everything_stored(make_proxy: Any, upstream: FakeJitsu) -> None:
    await upstream.stop()
    proxy = await make_proxy(buffer={"max_bytes": 200_000})
    statuses = []
    for i in range(60):
        resp = await proxy.post(
            "/api/s/track",
            json={"event": "e", "messageId": f"h{i}"},
            headers={"X-Write-Key": KEY, "User-Agent": "u" * 8000, "Referer": "r" * 8000},
        )
        statuses.append(resp.status)
    assert 503 in statuses, "400 tiny events with big headers once took 21 MB as 32 KB"
    buf = state(proxy).buffer
    with sqlite3.connect(buf.dir / "buffer.db") as conn:
        (stored,) = conn.execute(
            "SELECT sum(length(body) + length(CAST(path AS BLOB)) + length(CAST(headers AS BLOB))"
            " + length(CAST(key_id AS BLOB))) FROM events"
        ).fetchone()
    assert buf.bytes <= 200_000
    assert stored <= buf.bytes, "the buffer counts less than it stores"


def test_stored_size_counts_headers_key_and_path() -> None:
    small = Envelope("/api/s/track", {}, b"{}", 1, "k")
    big = Envelope("/api/s/track?x=" + "q" * 100, {"User-Agent": "u" * 1000}, b"{}", 1, "k" * 50)
    assert big.stored_size - small.stored_size >= 100 + 1000 + 49


async def test_dead_letters_have_a_bound_of_their_own(
    make_proxy: Any, upstream: FakeJitsu, logs: io.StringIO
) -> None:
    proxy = await make_proxy(buffer={"max_dead_letter_bytes": 20_000})
    ids = [f"d{i}" for i in range(60)]
    upstream.reject = set(ids)
    for mid in ids:
        resp = await proxy.post(
            "/api/s/s2s/track",
            json={"event": "e", "messageId": mid, "properties": {"pad": "p" * 600}},
            headers={"X-Write-Key": KEY},
        )
        assert resp.status == 200
    buf = state(proxy).buffer
    await until(lambda: buf.rows == 0 and buf.dead_dropped_rows > 0)
    await until(lambda: buf.dead_bytes <= 20_000)
    with sqlite3.connect(buf.dir / "buffer.db") as conn:
        (on_disk,) = conn.execute(
            "SELECT coalesce(sum(size + length(CAST(reason AS BLOB))), 0) FROM dead_letter"
        ).fetchone()
        (kept,) = conn.execute("SELECT min(seq) FROM dead_letter").fetchone()
    assert on_disk == buf.dead_bytes <= 20_000
    assert kept > 1, "the oldest dead letters go first"
    assert await metric(proxy, "proxy_dead_letters_dropped_total") == buf.dead_dropped_rows
    assert buf.dead_rows + buf.dead_dropped_rows == 60
    said = [json.loads(line) for line in logs.getvalue().splitlines()]
    drops = [x for x in said if x["event"] == "dead_letters_dropped"]
    assert sum(x["rows"] for x in drops) == buf.dead_dropped_rows, "every drop is logged"


async def test_request_size_limit_holds_whatever_the_encoding_says(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(limits={"max_request_bytes": 1_000_000})
    plain = b'{"batch":[{"type":"page","p":"' + b"x" * 2_000_000 + b'"}]}'
    for encoding in ("gzip", "identity", ""):
        resp = await proxy.post(
            "/v1/batch", data=io.BytesIO(plain), headers={**HEADERS, "Content-Encoding": encoding}
        )
        assert resp.status == 413, encoding
    assert upstream.received == []


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_nesting_at_the_recursion_limit_is_never_a_500(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """Deep enough to parse, too deep to write back out a few frames lower: once a 500."""
    for depth in (900, 960, 980, 990, 995, 1000, 1500, 5000):
        single = f'{{"event":"deep","p":{nested(depth)}}}'.encode()
        batch = f'{{"batch":[{{"type":"track","event":"deep","p":{nested(depth)}}}]}}'.encode()
        pad = "x" * 70_000  # large enough for the worker process
        big = f'{{"batch":[{{"type":"track","event":"e","pad":"{pad}","p":{nested(depth)}}}]}}'
        for path, body in (("/api/s/s2s/track", single), ("/v1/batch", batch)):
            resp = await proxy.post(path, data=body, headers=HEADERS)
            assert resp.status in (200, 400), (depth, path, resp.status)
        resp = await proxy.post("/v1/batch", data=big.encode(), headers=HEADERS)
        assert resp.status in (200, 400), (depth, "big", resp.status)
    ok = await proxy.post("/api/s/s2s/track", json={"event": "after"}, headers=HEADERS)
    assert ok.status == 200


async def test_a_large_context_is_not_copied_into_every_piece(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"max_batch_bytes": 64 * 1024})
    payload = {"context": {"pad": "c" * 40_000}, "batch": [{"type": "page"}] * 500}
    body = json.dumps(payload).encode()
    resp = await proxy.post("/v1/batch", data=body, headers=HEADERS)
    assert (await resp.json())["okEvents"] == 500
    await upstream.wait_for(lambda f: len(f.delivered_set) == 500)
    sent = sum(len(r.body) for r in upstream.delivered)
    assert sent < 2 * len(body), f"{sent} bytes forwarded for a {len(body)}-byte batch"


async def test_large_requests_queue_for_the_parser_only_so_far(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """30 concurrent 4 MB batches once queued without bound, and a small gzip batch behind
    them waited 9 s: past limits.max_parse_queue large requests get 503 at once."""
    proxy = await make_proxy(limits={"max_parse_queue": 1, "max_batch_events": 50_000})
    event = {"type": "track", "event": "e", "properties": {"p": "x" * 20}}
    body = json.dumps({"batch": [event] * 30_000}).encode()

    async def big() -> tuple[int, Any]:
        resp = await proxy.post("/v1/batch", data=io.BytesIO(body), headers=HEADERS)
        return resp.status, (resp.headers.get("Retry-After"), await resp.json())

    answers = await asyncio.gather(*(big() for _ in range(8)))
    statuses = sorted(status for status, _ in answers)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    for status, (retry_after, answer) in answers:
        if status == 503:
            assert retry_after and "try again" in answer["error"]
        else:
            assert answer["okEvents"] == 30_000
    accepted = statuses.count(200) * 30_000
    await upstream.wait_for(lambda f: sum(len(r.message_ids) for r in f.delivered) == accepted)


async def test_a_refused_key_costs_no_parsing(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(security={"allowed_key_ids": ["someoneelse"]})
    body = json.dumps({"batch": [{"type": "page"}] * 20_000}).encode()
    resp = await proxy.post("/v1/batch", data=io.BytesIO(body), headers=HEADERS)
    assert resp.status == 401
    assert state(proxy).offload.pending == 0 and state(proxy).offload._pool is None


async def test_dead_letter_reasons_count_against_their_bound(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """An upstream answering with long error lists once filled 291 MB of disk under a
    200 KB dead-letter bound: reasons were neither cut nor counted."""
    proxy = await make_proxy(buffer={"max_dead_letter_bytes": 30_000})

    def refuse_at_length(rec: Received) -> Answer:
        (mid,) = rec.message_ids
        return Answer(200, {"ok": False, "errors": [f"Message ID: {mid}: event error: {LONG}"]})

    upstream.fault = refuse_at_length
    for i in range(40):
        resp = await proxy.post(
            "/v1/batch", json={"batch": [{"type": "page", "messageId": f"r{i}"}]}, headers=HEADERS
        )
        assert resp.status == 200
    buf = state(proxy).buffer
    await until(lambda: buf.rows == 0 and buf.dead_rows + buf.dead_dropped_rows == 40)
    await until(lambda: buf.dead_bytes <= 30_000)
    with sqlite3.connect(buf.dir / "buffer.db") as conn:
        (stored, longest) = conn.execute(
            "SELECT sum(size + length(CAST(reason AS BLOB))), max(length(reason)) FROM dead_letter"
        ).fetchone()
    assert stored == buf.dead_bytes <= 30_000
    assert longest <= 1024
