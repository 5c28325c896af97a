"""A misbehaving upstream (issue 7, findings 2-4): redirects, one event that always fails, an
ingress that answers for Jitsu. Only Jitsu's verdicts dead-letter; nothing stalls the rest; the
write key goes to upstream.url and nowhere else."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import until
from tests.fakejitsu import Answer, FakeJitsu, Received
from tests.test_forwarding import KEY, send, state

SECRET = KEY.split(":", 1)[1]


@pytest.fixture
async def elsewhere() -> AsyncIterator[FakeJitsu]:
    """Another host a redirect points at: it must never hear from us."""
    fake = FakeJitsu()
    await fake.start()
    yield fake
    await fake.stop()


async def metric(proxy: TestClient[Any, Any], name: str) -> float:
    text = await (await proxy.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirects_are_not_followed_and_lose_nothing(
    proxy: TestClient[Any, Any],
    upstream: FakeJitsu,
    elsewhere: FakeJitsu,
    status: int,
    logs: io.StringIO,
) -> None:
    upstream.fault = lambda _rec: Answer(
        status, {}, {"Location": f"{elsewhere.url}/api/s/track?x=1"}
    )
    for i in range(3):
        await send(proxy, f"r{i}")
    fwd = state(proxy).forwarder
    await until(lambda: fwd.redirected_to is not None and fwd.failures >= 2)

    assert elsewhere.received == [], "the event and its key went to another host"
    assert state(proxy).buffer.rows == 3 and state(proxy).buffer.dead_rows == 0
    ready = await (await proxy.get("/readyz")).json()
    assert ready["upstream"]["redirected_to"] == f"{elsewhere.url}/api/s/track"
    assert await metric(proxy, "proxy_upstream_redirected") == 1
    said = [json.loads(line) for line in logs.getvalue().splitlines()]
    (line,) = [x for x in said if x["event"] == "upstream_redirect"]  # once, not per attempt
    assert line["location"] == f"{elsewhere.url}/api/s/track" and line["level"] == "error"

    upstream.fault = None  # upstream.url fixed (here: upstream stops redirecting)
    await upstream.wait_for(lambda f: len(f.delivered_set) == 3)
    await until(lambda: state(proxy).buffer.rows == 0 and fwd.redirected_to is None)
    assert elsewhere.received == []
    assert await metric(proxy, "proxy_upstream_redirected") == 0


async def test_one_event_that_always_fails_does_not_hold_back_the_rest(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"retry": {"max_row_failures": 3}})

    def poison(rec: Received) -> Answer | None:
        return Answer(500, {"error": "panic"}) if "bad" in rec.message_ids else None

    upstream.fault = poison
    await send(proxy, "bad")
    good = [f"g{i}" for i in range(20)]
    for mid in good:
        await send(proxy, mid)
    await upstream.wait_for(lambda f: f.delivered_set >= set(good), timeout=10)

    # The bad row leaves the queue within a bounded number of attempts, with its reason, as
    # long as other events keep showing that upstream works (the site keeps sending).
    buf = state(proxy).buffer
    for i in range(200):
        if buf.dead_rows:
            break
        await send(proxy, f"later{i}")
        await asyncio.sleep(0.05)
    await until(lambda: buf.dead_rows == 1 and buf.rows == 0, timeout=20)
    (dead,) = await buf.dead_letters()
    assert dead["status"] == 500
    assert "while other events were delivered" in dead["reason"]
    attempts = sum(1 for r in upstream.received if "bad" in r.message_ids)
    assert attempts <= 3 * 3 + 3, f"the bad row was sent {attempts} times"


async def test_during_an_outage_nothing_is_dead_lettered(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"retry": {"max_row_failures": 2}})
    upstream.fault = lambda _rec: Answer(503, {"error": "producer error"})
    for i in range(20):
        await send(proxy, f"o{i}")
    fwd = state(proxy).forwarder
    await until(lambda: fwd.failures >= 8)
    upstream.fault = None
    await upstream.wait_for(lambda f: len(f.delivered_set) == 20)
    await until(lambda: state(proxy).buffer.rows == 0)
    assert state(proxy).buffer.dead_rows == 0


@pytest.mark.parametrize(
    "answer",
    [
        Answer(404, text="default backend - 404"),  # an ingress during a rollout
        Answer(404, {"error": "not found"}),  # JSON, but Jitsu's ingest routes exist
        Answer(405, text="Method Not Allowed"),
        Answer(403, text="<html><body>Forbidden</body></html>", content_type="text/html"),
        Answer(400, text="<html>400 Bad Request (nginx)</html>", content_type="text/html"),
        Answer(200, text="<html>Welcome to nginx!</html>", content_type="text/html"),
    ],
    ids=["ingress-404", "json-404", "405", "html-403", "html-400", "html-200"],
)
async def test_answers_that_are_not_jitsus_verdict_are_retried(
    make_proxy: Any, upstream: FakeJitsu, answer: Answer
) -> None:
    proxy = await make_proxy(upstream={"retry": {"max_row_failures": 2}})
    upstream.fault = lambda _rec: answer
    for i in range(10):
        await send(proxy, f"n{i}")
    fwd = state(proxy).forwarder
    await until(lambda: fwd.failures >= 3)
    assert state(proxy).buffer.dead_rows == 0
    upstream.fault = None
    await upstream.wait_for(lambda f: len(f.delivered_set) == 10)
    await until(lambda: state(proxy).buffer.rows == 0)
    assert state(proxy).buffer.dead_rows == 0


async def test_jitsus_own_verdict_still_dead_letters(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    upstream.reject = {"refused"}
    await send(proxy, "refused")
    await send(proxy, "fine")
    await upstream.wait_for(lambda f: "fine" in f.delivered_set)
    buf = state(proxy).buffer
    await until(lambda: buf.dead_rows == 1 and buf.rows == 0)
    (dead,) = await buf.dead_letters()
    assert (dead["status"], dead["reason"]) == (
        400,
        "upstream answered 400: event error: rejected by test",
    )


async def test_poison_rows_at_low_traffic_back_off_alone_and_upstream_stays_up(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Two poison rows and then no traffic: once they failed each other into an 'outage' (the
    gauge said upstream was down) and were resent every few hundred ms for ever."""
    proxy = await make_proxy(upstream={"retry": {"initial_backoff_s": 0.1, "max_backoff_s": 2}})

    def poison(rec: Received) -> Answer | None:
        return Answer(500) if any(m.startswith("bad") for m in rec.message_ids) else None

    upstream.fault = poison
    for i in range(30):
        await send(proxy, f"bad{i}" if i in (5, 17) else f"g{i}")
    await upstream.wait_for(lambda f: len(f.delivered_set) == 28)
    fwd = state(proxy).forwarder
    await until(lambda: len(fwd.parked) == 2)
    before = sum(1 for r in upstream.received if r.message_ids[0].startswith("bad"))
    await asyncio.sleep(3)
    attempts = sum(1 for r in upstream.received if r.message_ids[0].startswith("bad")) - before
    # Own backoffs that grow (0.1 s doubling to 2 s): a handful each in 3 s, not dozens.
    assert attempts <= 2 * 6, attempts
    assert not fwd.failing
    assert await metric(proxy, "proxy_upstream_up") == 1
    assert await metric(proxy, "proxy_rows_retrying_alone") == 2
    await send(proxy, "fresh")
    await upstream.wait_for(lambda f: "fresh" in f.delivered_set)


@pytest.mark.parametrize("pad", [70_000, 3_000_000])
async def test_a_large_answer_from_jitsu_is_read_whole_or_trusted(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, pad: int
) -> None:
    """Jitsu answers browser events with their device destinations, code and all: an answer
    over 64 KiB was once cut, judged not JSON, and the event resent for ever."""
    destinations = [{"id": "d", "code": "x" * pad}]
    upstream.fault = lambda _rec: Answer(200, {"ok": True, "destinations": destinations})
    answer = await send(proxy, "big-ack", path="/api/s/track")
    # The browser gets Jitsu's answer when it was read whole, else the proxy's own.
    assert answer == ({"ok": True, "destinations": destinations} if pad < 1e6 else {"ok": True})
    await upstream.wait_for(lambda f: "big-ack" in f.delivered_set)
    await until(lambda: state(proxy).buffer.rows == 0)
    assert sum(1 for r in upstream.received if r.message_ids == ["big-ack"]) == 1
    assert not state(proxy).forwarder.failing


async def test_a_block_of_rows_upstream_never_takes_does_not_hold_up_the_rest(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Rows that all fail together look like an outage; probes then took turns over the
    backlog one row per backoff, so 40 such rows at its head (one client's, say) held every
    later event for a backoff each (attack pass). Every other probe is now the newest row."""
    proxy = await make_proxy(
        upstream={
            "concurrency": 40,
            "retry": {"request_attempts": 1, "initial_backoff_s": 0.5, "max_backoff_s": 2},
        }
    )

    def poison(rec: Received) -> Answer | None:
        if any(m.startswith("bad") for m in rec.message_ids):
            return Answer(404, text="404 page not found")
        return None

    upstream.fault = poison
    await asyncio.gather(*(send(proxy, f"bad{i}") for i in range(40)))
    await until(lambda: state(proxy).forwarder.failing)
    for i in range(3):
        await send(proxy, f"good{i}")
    # Without the newest-row probes: 40 poison probes at 0.5-2 s each before any good one.
    await upstream.wait_for(lambda f: {"good0", "good1", "good2"} <= f.delivered_set, timeout=10)


async def test_rows_an_ingress_refuses_do_not_pass_for_an_outage(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Rows a client made that an ingress in front of Jitsu answers with its own 4xx page,
    all failing at once with nothing delivered in between, once put the forwarder into outage
    mode (second attack pass: 10 such requests a second stalled everyone). A 4xx about the
    request, a moment after upstream took another row, is the row's own trouble."""
    proxy = await make_proxy(upstream={"retry": {"request_attempts": 1}})

    def ingress(rec: Received) -> Answer | None:
        if any(m.startswith("bad") for m in rec.message_ids):
            return Answer(400, text="<html>400 Request Header Or Cookie Too Large</html>")
        return None

    upstream.fault = ingress
    await send(proxy, "good0")
    await upstream.wait_for(lambda f: "good0" in f.delivered_set)
    fwd = state(proxy).forwarder
    await asyncio.gather(*(send(proxy, f"bad{i}") for i in range(20)))
    await upstream.wait_for(lambda f: sum(r.status == 400 for r in f.received) >= 20)
    await until(lambda: len(fwd.parked) == 20)
    assert not fwd.failing
    await send(proxy, "good1")
    await upstream.wait_for(lambda f: "good1" in f.delivered_set, timeout=5)


@pytest.mark.parametrize("route", ["/api/s/s2s/track", "/v1/batch"])
async def test_a_refusal_whose_reason_holds_a_lone_surrogate_is_dead_lettered_once(
    make_proxy: Any, upstream: FakeJitsu, route: str
) -> None:
    """JSON may escape a lone surrogate ("\\ud800"), which SQLite cannot store: the dead-letter
    write failed and the row went upstream again at once, thousands of times a second, with the
    buffer reported unwritable meanwhile (attack pass, issue 10). The reason is stored with
    U+FFFD in its place; the row is sent once."""
    proxy = await make_proxy(upstream={"coalesce": False})
    answer = '{"error":"event error: \\ud800 lone \\udfff"}'
    if route == "/v1/batch":
        answer = (
            '{"ok":false,"receivedEvents":1,"okEvents":0,'
            '"errors":["Message ID: m1: event error: \\ud800 lone \\udfff"]}'
        )
        upstream.fault = lambda rec: Answer(200, text=answer, content_type="application/json")
        body: dict[str, Any] = {"batch": [{"type": "track", "event": "e", "messageId": "m1"}]}
    else:
        upstream.fault = lambda rec: Answer(400, text=answer, content_type="application/json")
        body = {"type": "track", "event": "e", "messageId": "m1"}
    resp = await proxy.post(route, json=body, headers={"X-Write-Key": KEY})
    assert resp.status == 200
    buf = state(proxy).buffer
    await until(lambda: buf.dead_rows == 1 and buf.rows == 0, timeout=10)
    (dead,) = await buf.dead_letters()
    assert "\ufffd lone \ufffd" in dead["reason"]
    await asyncio.sleep(0.5)
    assert len([r for r in upstream.received if "m1" in r.message_ids]) == 1
    assert buf.writable
