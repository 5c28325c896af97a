"""Forwarding through failures: retries, Retry-After, dead letters, outages."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from proxy.buffer import Row
from proxy.forwarder import Attempt
from proxy.retry import Outcome
from tests.conftest import state, until
from tests.fakejitsu import Answer, FakeJitsu

KEY = "kid:sUperSecretValue123"


async def send(proxy: TestClient[Any, Any], message_id: str, path: str = "/api/s/s2s/track") -> Any:
    """An s2s event by default: its answer is the proxy's own `{"ok":true}` whatever upstream
    says later. (A browser route answers with upstream's verdict when it comes in time.)"""
    resp = await proxy.post(
        path, headers={"X-Write-Key": KEY}, json={"event": "e", "messageId": message_id}
    )
    assert resp.status == 200
    answer = await resp.json()
    if path == "/api/s/s2s/track":
        assert answer == {"ok": True}
    return answer


async def test_503_then_200_is_retried_and_delivered_once(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    upstream.script.extend([Answer(503, {"error": "producer error"}), Answer(503)])
    await send(proxy, "m1")
    await upstream.wait_delivered(1)
    assert [r.status for r in upstream.received] == [503, 503, 200]
    bodies = {r.body for r in upstream.received}
    assert len(bodies) == 1, "every retry must carry the identical bytes"
    assert upstream.delivered_ids() == ["m1"]
    await until(lambda: state(proxy).buffer.rows == 0)


async def test_retry_after_is_honoured(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(upstream={"retry": {"request_attempts": 1}})
    upstream.script.append(Answer(429, {"error": "slow down"}, {"Retry-After": "1"}))
    await send(proxy, "m-429")
    await upstream.wait_delivered(1, timeout=10)
    first, second = upstream.received
    assert first.status == 429
    # Our own backoff is capped at 0.2 s here; only Retry-After can explain a wait of 1 s.
    assert second.at - first.at >= 1.0


async def test_retry_after_inside_one_request_is_honoured(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    upstream.script.append(Answer(503, {}, {"Retry-After": "1"}))
    await send(proxy, "m-503-ra")
    await upstream.wait_delivered(1, timeout=10)
    first, second = upstream.received
    assert second.at - first.at >= 1.0


async def test_400_is_dead_lettered_and_does_not_block_the_next_events(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    upstream.reject.add("bad")
    for mid in ("m1", "bad", "m2", "m3"):
        await send(proxy, mid)
    await upstream.wait_for(lambda f: sorted(f.delivered_ids()) == ["m1", "m2", "m3"])
    buffer = state(proxy).buffer
    await until(lambda: buffer.dead_rows == 1 and buffer.rows == 0)
    (dead,) = await buffer.dead_letters()
    assert dead["status"] == 400
    assert "rejected by test" in dead["reason"]
    assert dead["attempts"] == 1
    assert b'"messageId":"bad"' in dead["body"]
    rejected = [r for r in upstream.received if r.status == 400]
    assert len(rejected) == 1, "a permanent rejection is not retried"


async def test_browser_200_with_error_is_dead_lettered_without_the_secret(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    # Jitsu echoes the unmasked key in this message (research notes §2.4).
    upstream.script.append(
        Answer(200, {"error": f"stream not found: for: [writeKey: {KEY}][ingestType: writeKey]"})
    )
    answer = await send(proxy, "m-unknown", path="/api/s/page")
    # The browser gets Jitsu's own answer (upstream.sync_browser), the secret masked.
    assert answer == {"error": "stream not found: for: [writeKey: kid:***][ingestType: writeKey]"}
    buffer = state(proxy).buffer
    await until(lambda: buffer.dead_rows == 1)
    (dead,) = await buffer.dead_letters()
    assert "stream not found" in dead["reason"]
    assert "sUperSecretValue123" not in dead["reason"]
    assert "kid:***" in dead["reason"]


async def test_batch_partly_refused_is_kept_in_dead_letters(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    upstream.script.append(
        Answer(200, {"ok": False, "errors": ["Message ID: b2: quota exceeded"], "okEvents": 1})
    )
    resp = await proxy.post(
        "/v1/batch",
        headers={"X-Write-Key": KEY},
        json={"batch": [{"type": "track", "event": "a", "messageId": f"b{i}"} for i in (1, 2)]},
    )
    assert resp.status == 200
    buffer = state(proxy).buffer
    await until(lambda: buffer.dead_rows == 1 and buffer.rows == 0)
    (dead,) = await buffer.dead_letters()
    assert "quota exceeded" in dead["reason"]


async def test_upstream_down_then_up_delivers_everything_in_order(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    await upstream.stop()
    ids = [f"m{i:03d}" for i in range(40)]
    for mid in ids:
        await send(proxy, mid)
    fwd = state(proxy).forwarder
    await until(lambda: fwd.failing and fwd.failures >= 3)
    assert state(proxy).buffer.rows == 40
    await upstream.start()
    await upstream.wait_for(lambda f: len(set(f.delivered_ids())) == 40, timeout=15)
    # The probe that meets the recovery goes first, then the backlog from its oldest event.
    delivered = upstream.delivered_ids()
    rest = [mid for mid in delivered if mid != delivered[0]]
    # The first wave (upstream.concurrency: 16) is the 16 oldest, in whatever order they land.
    assert set(rest[:16]) == set([mid for mid in ids if mid != delivered[0]][:16]), delivered
    assert sorted(set(delivered)) == ids
    await until(lambda: state(proxy).buffer.rows == 0)


async def test_only_one_probe_in_flight_while_upstream_fails(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"concurrency": 8})
    # Slow failures, so that overlapping requests would be seen at the fake upstream.
    upstream.script.extend(Answer(503, delay_s=0.05) for _ in range(40))
    for i in range(30):
        await send(proxy, f"m{i}")
    fwd = state(proxy).forwarder
    await until(lambda: fwd.failing and fwd.failures >= 2 and upstream.in_flight <= 1)
    # From here on upstream is known to fail: only the probe may be in flight.
    upstream.max_in_flight = upstream.in_flight
    probes_before = len(upstream.received)
    await upstream.wait_for(lambda f: not f.script, timeout=20)
    assert len(upstream.received) - probes_before >= 5
    assert upstream.max_in_flight == 1
    # Every later failure is a probe, and probes take turns over the backlog (so that one
    # row that always fails cannot pass for an outage): consecutive probes, oldest first,
    # every other one the newest row (so that a block of such rows cannot either).
    probed = [int(r.message_ids[0][1:]) for r in upstream.received[probes_before:]]
    turns = [n for i, n in enumerate(probed) if i == 0 or probed[i - 1] != n]
    rotation = [n for n in turns if n != 29]
    assert 29 in turns and rotation == sorted(rotation) and len(rotation) >= 2, probed
    # Healthy again: the backlog drains with the configured concurrency.
    upstream.max_in_flight = 0
    await upstream.wait_for(lambda f: len(set(f.delivered_ids())) == 30, timeout=15)
    assert upstream.max_in_flight <= 8


async def test_hanging_upstream_times_out_and_is_retried(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"timeout_s": 0.3, "retry": {"request_attempts": 1}})
    upstream.hang = True
    await send(proxy, "m-hang")
    fwd = state(proxy).forwarder
    await until(lambda: fwd.failures >= 2, timeout=10)
    upstream.hang = False
    await upstream.wait_delivered(1, timeout=10)
    assert upstream.delivered_ids() == ["m-hang"]


async def test_metrics_count_what_happened(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    upstream.reject.add("bad")
    for mid in ("a", "bad", "b"):
        await send(proxy, mid)
    buffer = state(proxy).buffer
    await until(lambda: buffer.rows == 0 and buffer.dead_rows == 1)
    text = await (await proxy.get("/metrics")).text()
    assert "proxy_events_accepted_total 3.0" in text
    assert "proxy_events_delivered_total 2.0" in text
    assert "proxy_events_dead_lettered_total 1.0" in text
    assert "proxy_buffer_rows 0.0" in text
    assert 'proxy_ingest_requests_total{route="/api/s/s2s/{type}",status="200"} 3.0' in text
    assert "sUperSecretValue123" not in text


async def test_rows_in_flight_when_upstream_begins_to_fail_are_one_step_of_backoff(
    proxy: TestClient[Any, Any],
) -> None:
    """Failures found outside aiohttp-retry (an answer cut mid-body) each added a step of
    backoff: a 1 s blip with 16 rows in flight sent it to its 30 s ceiling (second attack
    pass). Until a probe is chosen, the rows in flight count once."""
    fwd = state(proxy).forwarder
    for seq in range(1, 17):
        row = Row(seq, 0.0, "kid", "/api/s/s2s/track", {}, b"{}", 10, 1)
        fwd._failed(row, Attempt(Outcome.RETRY, None, "transport error: payload cut"))
    assert fwd.failing and fwd.failures == 1
