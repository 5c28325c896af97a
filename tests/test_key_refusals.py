"""Wrong keys are answered as Jitsu answers them (issue 8, point 2): once upstream said "stream
not found" for a key, the proxy answers that key itself for upstream.key_refusal_ttl_s, and
keeps nothing of its events."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

from proxy.refusals import KeyRefusals, fingerprint, route_kind
from tests.conftest import until
from tests.fakejitsu import Answer, FakeJitsu, Received
from tests.test_forwarding import state

WRONG = "wid:wrongSecretValue42"
RIGHT = "kid:sUperSecretValue123"
JITSU_MESSAGE = (
    "stream not found: for: [slug: ][domain: 127.0.0.1][writeKey: {key}][ingestType: {t}]"
)


def jitsu_refuses_wrong_key(rec: Received) -> Answer | None:
    """Jitsu's answers to a key it has no stream for: 401 on s2s and batch routes, 200 with the
    error on browser routes, the GIF with X-Jitsu-Error on the pixel; the key quoted whole."""
    if rec.headers.get("X-Write-Key") != WRONG:
        return None
    message = JITSU_MESSAGE.format(key=WRONG, t="writeKey")
    if rec.method == "GET":
        return Answer(200, {}, {"X-Jitsu-Error": message})
    browser = rec.path.startswith("/api/s/") and not rec.path.startswith("/api/s/s2s/")
    return Answer(200 if browser else 401, {"error": message})


MASKED = JITSU_MESSAGE.format(key="wid:***", t="writeKey")


async def post(proxy: Any, path: str, key: str, mid: str) -> tuple[int, Any]:
    body: Any = {"type": "track", "event": "e", "messageId": mid}
    if path == "/v1/batch":
        body = {"batch": [body]}
    resp = await proxy.post(path, headers={"X-Write-Key": key}, json=body)
    return resp.status, await resp.json()


async def test_s2s_wrong_key_is_remembered_and_answered_401_without_buffering(
    proxy: Any, upstream: FakeJitsu, logs: io.StringIO
) -> None:
    upstream.fault = jitsu_refuses_wrong_key
    # The first is taken (the proxy cannot know yet) and refused upstream: dead-lettered.
    assert await post(proxy, "/api/s/s2s/track", WRONG, "w1") == (200, {"ok": True})
    buffer = state(proxy).buffer
    await until(lambda: buffer.dead_rows == 1 and buffer.rows == 0)
    sent = len(upstream.received)
    for mid in ("w2", "w3"):
        assert await post(proxy, "/api/s/s2s/track", WRONG, mid) == (401, {"error": MASKED})
    assert buffer.rows == 0 and buffer.dead_rows == 1, "nothing kept of a refused key"
    # Another key on the same route still goes through.
    assert await post(proxy, "/api/s/s2s/track", RIGHT, "r1") == (200, {"ok": True})
    await upstream.wait_for(lambda f: "r1" in f.delivered_set)
    assert len(upstream.received) == sent + 1
    metrics = await (await proxy.get("/metrics")).text()
    assert 'proxy_events_refused_total{reason="key_refused_upstream"} 2.0' in metrics
    assert "proxy_key_refusals_remembered 1.0" in metrics
    for text in (metrics, logs.getvalue()):
        assert "wrongSecretValue42" not in text
    (line,) = [json.loads(x) for x in logs.getvalue().splitlines() if "key_refused_upstream" in x]
    assert (line["key_id"], line["route"]) == ("wid", "/api/s/s2s/*")
    ready = await (await proxy.get("/readyz")).json()
    assert ready["upstream"]["keys_refused"] == 1


async def test_browser_route_first_request_already_gets_jitsus_answer(
    proxy: Any, upstream: FakeJitsu
) -> None:
    upstream.fault = jitsu_refuses_wrong_key
    assert await post(proxy, "/api/s/track", WRONG, "b1") == (200, {"error": MASKED})
    sent = len(upstream.received)
    assert await post(proxy, "/api/s/page", WRONG, "b2") == (200, {"error": MASKED})
    assert len(upstream.received) == sent, "the second came from memory"
    # The refusal was for browser routes; s2s ones look the key up differently in Jitsu.
    assert await post(proxy, "/api/s/s2s/track", WRONG, "b3") == (200, {"ok": True})
    await upstream.wait_for(lambda f: len(f.received) == sent + 1)


async def test_batch_and_pixel_with_a_refused_key(proxy: Any, upstream: FakeJitsu) -> None:
    upstream.fault = jitsu_refuses_wrong_key
    buffer = state(proxy).buffer
    assert (await post(proxy, "/v1/batch", WRONG, "v1"))[0] == 200
    await until(lambda: buffer.dead_rows == 1)
    assert await post(proxy, "/v1/batch", WRONG, "v2") == (401, {"error": MASKED})

    data = base64.b64encode(json.dumps({"messageId": "p1"}).encode()).decode()
    first = await proxy.get(f"/api/px/page?writekey={WRONG}&data={data}")
    assert first.status == 200, first.headers
    assert "X-Jitsu-Error" not in first.headers, first.headers["X-Jitsu-Error"]
    await until(lambda: buffer.dead_rows == 2)
    again = await proxy.get(
        f"/api/px/page?writekey={WRONG}&data={data}&destination_url=https://example.com/x"
    )
    # Jitsu's refusal: the GIF, no redirect, the reason in X-Jitsu-Error (secret masked).
    assert again.status == 200 and again.content_type == "image/gif"
    assert again.headers["X-Jitsu-Error"] == MASKED
    assert buffer.dead_rows == 2 and buffer.rows == 0


async def test_ttl_zero_never_remembers(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(upstream={"key_refusal_ttl_s": 0})
    upstream.fault = jitsu_refuses_wrong_key
    assert await post(proxy, "/api/s/s2s/track", WRONG, "t1") == (200, {"ok": True})
    buffer = state(proxy).buffer
    await until(lambda: buffer.dead_rows == 1)
    assert await post(proxy, "/api/s/s2s/track", WRONG, "t2") == (200, {"ok": True})
    await until(lambda: buffer.dead_rows == 2)


def test_memory_expires_is_bounded_and_forgets() -> None:
    now = [0.0]
    memory = KeyRefusals(ttl_s=10, max_entries=2, clock=lambda: now[0])
    a, b, c = (fingerprint(k, "/api/s/s2s/track", {}) for k in ("a:1", "b:2", "c:3"))
    memory.remember(a, "no a")
    assert memory.refused(a) == "no a"
    now[0] = 10.0
    assert memory.refused(a) is None and len(memory) == 0  # expired
    for print_ in (a, b, c):
        memory.remember(print_, "no")
    assert len(memory) == 2 and memory.refused(a) is None  # the oldest went
    memory.forget(b)
    assert memory.refused(b) is None and memory.refused(c) == "no"


def test_what_a_refusal_is_remembered_under() -> None:
    assert route_kind("/api/s/page?x=1") == route_kind("/api/s/track") == "/api/s/*"
    assert route_kind("/api/s/s2s/identify") == "/api/s/s2s/*"
    assert route_kind("/api/s/s2s/batch") == "/api/s/s2s/batch"
    assert route_kind("/v1/batch") == "/v1/batch"
    assert route_kind("/api/px/track") == "/api/px/*"
    # The classic tracker's randomize_url names every event's path anew.
    assert route_kind("/api.k3x9q?ip_policy=x") == route_kind("/api.zz") == "/api.*"
    base = fingerprint("k:s", "/api/s/page", {})
    assert base == fingerprint("k:s", "/api/s/track", {"User-Agent": "x"})
    assert base != fingerprint("k:other", "/api/s/page", {})
    assert base != fingerprint("k:s", "/api/s/page", {"Host": "shop.example.com"})
    assert len(base) == 16  # a digest: the secret is not kept


async def test_a_refusal_names_the_clients_host_never_upstreams(
    proxy: Any, upstream: FakeJitsu
) -> None:
    """Jitsu names the Host it saw: without preserve_host, upstream.url's, an internal name no
    client should learn (attack pass, F7). The client sees its own, as from Jitsu directly."""
    upstream.fault = jitsu_refuses_wrong_key
    body = {"type": "track", "event": "e", "messageId": "h1"}
    headers = {"X-Write-Key": WRONG, "Host": "shop.example"}
    first = await proxy.post("/api/s/track", headers=headers, json=body)
    assert (await first.json())["error"] == MASKED.replace("127.0.0.1", "shop.example")
    headers["Host"] = "other.example:8080"
    again = await proxy.post("/api/s/track", headers=headers, json=body)
    assert (await again.json())["error"] == MASKED.replace("127.0.0.1", "other.example")


async def test_a_refusal_is_forgotten_once_an_event_under_the_key_gets_through(
    proxy: Any, upstream: FakeJitsu
) -> None:
    """The stream was created meanwhile: an event buffered before the refusal is taken, and
    the key is answered at the edge no more."""
    release = asyncio.Event()

    def answer(rec: Received) -> Answer | None:
        if rec.message_ids == ["early"]:
            return Answer(hold=release)  # taken, once Jitsu knows the key
        return jitsu_refuses_wrong_key(rec)

    upstream.fault = answer
    assert await post(proxy, "/api/s/s2s/track", WRONG, "early") == (200, {"ok": True})
    await upstream.wait_for(lambda f: len(f.arrived) == 1)
    assert await post(proxy, "/api/s/s2s/track", WRONG, "refused") == (200, {"ok": True})
    refusals = state(proxy).refusals
    await until(lambda: len(refusals) == 1)
    assert (await post(proxy, "/api/s/s2s/track", WRONG, "edge"))[0] == 401
    release.set()
    await upstream.wait_for(lambda f: "early" in f.delivered_set)
    await until(lambda: len(refusals) == 0)
    upstream.fault = None
    assert await post(proxy, "/api/s/s2s/track", WRONG, "later") == (200, {"ok": True})
    await upstream.wait_for(lambda f: "later" in f.delivered_set)
