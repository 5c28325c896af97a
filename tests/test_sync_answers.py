"""Browser routes answer with Jitsu's own answer when it comes in time (upstream.sync_browser):
device destinations reach the page, and durability and deadlines stay as they were (issue 8)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import until
from tests.fakejitsu import Answer, FakeJitsu, Received
from tests.test_forwarding import KEY, state

DESTINATIONS = [
    {
        "id": "ga4",
        "destinationType": "ga4-tag",
        "deviceOptions": {"type": "internal-plugin", "name": "ga4-tag"},
        "credentials": {"measurementIds": "G-TEST"},
        "newEvents": [],
    }
]


async def browser_event(proxy: Any, message_id: str, path: str = "/api/s/page") -> Any:
    resp = await proxy.post(
        path, headers={"X-Write-Key": KEY}, json={"type": "page", "messageId": message_id}
    )
    return resp.status, await resp.json()


async def test_browser_gets_jitsus_device_destinations_and_the_row_is_settled_once(
    proxy: Any, upstream: FakeJitsu
) -> None:
    rows_when_sent: list[int] = []

    def answer(_rec: Received) -> Answer:
        # Committed before it is sent: the row is in the buffer while upstream reads it.
        rows_when_sent.append(state(proxy).buffer.rows)
        return Answer(200, {"ok": True, "destinations": DESTINATIONS})

    upstream.fault = answer
    status, body = await browser_event(proxy, "d1")
    assert (status, body) == (200, {"ok": True, "destinations": DESTINATIONS})
    assert rows_when_sent == [1]
    await until(lambda: state(proxy).buffer.rows == 0)
    assert [r.message_ids for r in upstream.received] == [["d1"]]
    metrics = await (await proxy.get("/metrics")).text()
    assert 'proxy_browser_answers_total{source="upstream"} 1.0' in metrics


async def test_many_browser_events_at_once_each_get_their_answer_and_go_up_once(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """The forwarder's loop and the browser's send race for the same rows: one row is never
    in flight twice, and every browser still hears Jitsu's answer. (Without the check for
    rows taken meanwhile, some of the 300 went up twice.)"""
    proxy = await make_proxy(upstream={"sync_max_in_flight": 1000})
    upstream.fault = lambda rec: Answer(
        200, {"ok": True, "destinations": [{"id": rec.message_ids[0]}]}, delay_s=0.05
    )
    ids = [f"m{i}" for i in range(300)]
    answers = await asyncio.gather(*(browser_event(proxy, mid) for mid in ids))
    assert [a for a in answers] == [
        (200, {"ok": True, "destinations": [{"id": mid}]}) for mid in ids
    ]
    await until(lambda: state(proxy).buffer.rows == 0)
    sent = sorted(mid for r in upstream.received for mid in r.message_ids)
    assert sent == sorted(ids)


async def test_late_answer_gets_ok_and_the_forwarder_delivers_the_same_event_later(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(
        upstream={"sync_timeout_s": 0.3, "timeout_s": 1, "retry": {"request_attempts": 1}}
    )
    upstream.script.append(Answer(200, {"ok": True, "destinations": DESTINATIONS}, delay_s=30))
    started = time.monotonic()
    status, body = await browser_event(proxy, "slow")
    waited = time.monotonic() - started
    assert (status, body) == (200, {"ok": True})
    assert waited < 5, "the browser waits sync_timeout_s, not for upstream"
    await upstream.wait_delivered(1, timeout=15)
    first, second = upstream.arrived
    assert first.body == second.body  # the same messageId (and bytes) both times
    # Sent again only once the first request timed out (upstream.timeout_s): never two at once.
    assert second.at - first.at >= 0.9
    metrics = await (await proxy.get("/metrics")).text()
    assert 'proxy_browser_answers_total{source="edge"} 1.0' in metrics


async def test_while_upstream_is_down_browsers_are_answered_without_waiting(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(
        upstream={"sync_timeout_s": 5, "retry": {"request_attempts": 1, "max_backoff_s": 0.5}}
    )
    await upstream.stop()
    status, body = await browser_event(proxy, "first")  # meets the outage: ok, kept
    assert (status, body) == (200, {"ok": True})
    await until(lambda: state(proxy).forwarder.failing)
    started = time.monotonic()
    answers = await asyncio.gather(*(browser_event(proxy, f"down{i}") for i in range(5)))
    waited = time.monotonic() - started
    assert answers == [(200, {"ok": True})] * 5
    assert waited < 2.5, "a known outage must not cost each browser sync_timeout_s (5 s)"
    await upstream.start()
    await upstream.wait_for(lambda f: len(f.delivered_set) == 6, timeout=15)


async def test_trouble_on_the_way_is_not_passed_to_the_browser(
    proxy: Any, upstream: FakeJitsu
) -> None:
    """A 503 (or an ingress's HTML) is not Jitsu's verdict on the event: the browser gets
    {"ok":true} and the row is retried."""
    upstream.script.extend(
        [Answer(503, {"error": "producer error"}), Answer(502, text="<html>bad gateway</html>")]
    )
    assert await browser_event(proxy, "r1") == (200, {"ok": True})
    await upstream.wait_for(lambda f: "r1" in f.delivered_set)


async def test_jitsus_refusal_reaches_the_browser_and_the_event_is_dead_lettered(
    proxy: Any, upstream: FakeJitsu
) -> None:
    upstream.script.append(Answer(200, {"error": "event error: messageId is required"}))
    assert await browser_event(proxy, "x1") == (
        200,
        {"error": "event error: messageId is required"},
    )
    buffer = state(proxy).buffer
    await until(lambda: buffer.dead_rows == 1 and buffer.rows == 0)


async def test_sync_browser_off_answers_at_the_edge(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(upstream={"sync_browser": False})
    upstream.fault = lambda _rec: Answer(200, {"ok": True, "destinations": DESTINATIONS})
    assert await browser_event(proxy, "e1") == (200, {"ok": True})
    await upstream.wait_for(lambda f: "e1" in f.delivered_set)


async def test_s2s_routes_answer_at_the_edge(proxy: Any, upstream: FakeJitsu) -> None:
    upstream.fault = lambda _rec: Answer(200, {"ok": True, "destinations": DESTINATIONS})
    assert await browser_event(proxy, "s1", path="/api/s/s2s/page") == (200, {"ok": True})
    await upstream.wait_for(lambda f: "s1" in f.delivered_set)


async def test_past_sync_max_in_flight_browsers_get_ok_at_once(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"sync_max_in_flight": 1, "sync_timeout_s": 30})
    release = asyncio.Event()
    upstream.script.append(Answer(200, {"ok": True, "destinations": DESTINATIONS}, hold=release))
    first = asyncio.create_task(browser_event(proxy, "held"))
    await upstream.wait_for(lambda f: len(f.arrived) == 1)
    # The one sync slot is taken: this browser is answered by the proxy, not made to wait.
    assert await browser_event(proxy, "next") == (200, {"ok": True})
    release.set()
    assert await first == (200, {"ok": True, "destinations": DESTINATIONS})
    await upstream.wait_for(lambda f: {"held", "next"} <= f.delivered_set)


async def test_browser_sends_do_not_take_the_backlogs_slots(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """sync_max_in_flight comes on top of upstream.concurrency: with every slot held by
    browser sends, s2s rows once waited for them (attack pass)."""
    proxy = await make_proxy(upstream={"concurrency": 1, "sync_timeout_s": 30})
    release = asyncio.Event()
    upstream.fault = lambda rec: Answer(hold=release) if rec.path == "/api/s/page" else None
    held = asyncio.create_task(browser_event(proxy, "held"))
    await upstream.wait_for(lambda f: len(f.arrived) == 1)
    assert await browser_event(proxy, "s1", path="/api/s/s2s/page") == (200, {"ok": True})
    await upstream.wait_for(lambda f: "s1" in f.delivered_set, timeout=5)
    release.set()
    assert await held == (200, {"ok": True})


async def test_only_jitsus_json_reaches_the_browser_and_never_the_secret(
    proxy: Any, upstream: FakeJitsu
) -> None:
    """Attack pass, F5: an ingress's HTML 413 went to the browser as it came, upstream's
    Content-Type with it, and a 2xx or JSON-escaped spelling of the key was not masked."""
    secret = KEY.split(":")[1]
    escaped = KEY.replace(secret[0], f"\\u{ord(secret[0]):04x}", 1)
    upstream.script.extend(
        [
            Answer(413, text="<html><script>x()</script></html>", content_type="text/html"),
            Answer(200, text='{"ok":true,"destinations":[]}', content_type="text/html"),
            Answer(200, {"error": f"no destinations found for stream: [writeKey: {KEY}]"}),
            Answer(200, text='{"error":"stream not found: [writeKey: ' + escaped + ']"}'),
        ]
    )
    seen = []
    for mid in ("h1", "h2", "h3", "h4"):
        resp = await proxy.post(
            "/api/s/page", headers={"X-Write-Key": KEY}, json={"type": "page", "messageId": mid}
        )
        seen.append((resp.status, resp.content_type, await resp.text()))
    assert seen[0] == (200, "application/json", '{"ok":true}')
    assert seen[1] == (200, "application/json", '{"ok":true,"destinations":[]}')
    assert seen[2][:2] == (200, "application/json") and "kid:***" in seen[2][2]
    assert seen[3][:2] == (200, "application/json") and "kid:***" in seen[3][2]
    for _status, _type, text in seen:
        assert secret not in text and secret not in text.encode().decode("unicode_escape")


async def test_the_first_browser_to_meet_an_outage_is_not_kept_for_the_retries(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Its row fails and is retried inside the request after a backoff (here 2 s): the
    browser once waited for those retries, up to sync_timeout_s (here 10 s)."""
    proxy = await make_proxy(
        upstream={"sync_timeout_s": 10, "retry": {"initial_backoff_s": 2, "max_backoff_s": 4}}
    )
    await upstream.stop()
    started = time.monotonic()
    assert await browser_event(proxy, "first") == (200, {"ok": True})
    assert time.monotonic() - started < 1.5
    await upstream.start()
    await upstream.wait_for(lambda f: "first" in f.delivered_set, timeout=15)


async def test_a_secret_with_quotes_or_backslashes_is_masked_in_jitsus_answer(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Second attack pass, F2: the secret was looked for in the JSON text, where Jitsu's echo
    of it has " and \\ escaped; the browser got the key whole."""
    proxy = await make_proxy()
    key = 'kid:Se"Cr\\Et77x'
    upstream.script.append(Answer(401, {"error": f"stream not found: [writeKey: {key}]"}))
    resp = await proxy.post(
        "/api/s/page", headers={"X-Write-Key": key}, json={"type": "page", "messageId": "q1"}
    )
    text = await resp.text()
    assert "kid:***" in text
    assert "Se" not in text.replace("\\", "")
