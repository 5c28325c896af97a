"""Ingest through the proxy to a real fake Jitsu: what arrives upstream, and what clients see."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.state import APP_STATE
from tests.conftest import until
from tests.fakejitsu import FakeJitsu

EXAMPLES = json.loads((Path(__file__).parent / "data" / "jitsu_http_api_examples.json").read_text())
KEY = "js0Zq5dSlPwRhdMUMqF9bWzRCzB6qYht:sX1AHnyVkMbhMB8OKE8rbHlMaJnp0J7D"
SECRET = KEY.split(":")[1]
AUTH_HEADERS = {"Authorization", "X-Write-Key"}


def only_write_key(headers: Any, key: str) -> None:
    assert headers["X-Write-Key"] == key
    assert "Authorization" not in headers
    assert "Cookie" not in headers


@pytest.mark.parametrize("example", EXAMPLES, ids=[e["type"] for e in EXAMPLES])
async def test_documented_examples_arrive_intact(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, example: dict[str, Any]
) -> None:
    resp = await proxy.post(
        f"/api/s/{example['type']}", headers=example["headers"], data=json.dumps(example["body"])
    )
    assert resp.status == 200
    assert await resp.json() == {"ok": True}
    (got,) = await upstream.wait_delivered(1)
    assert got.method == "POST"
    assert got.path == f"/api/s/{example['type']}"
    assert got.json() == example["body"]
    only_write_key(got.headers, example["headers"]["X-Write-Key"])
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["Host"] == f"127.0.0.1:{upstream.port}"


async def test_basic_auth_is_normalised_to_x_write_key(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    token = base64.b64encode(f"{KEY}:".encode()).decode()
    resp = await proxy.post(
        "/api/s/s2s/track",
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        json={"type": "track", "event": "signup", "messageId": "m-basic"},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.path == "/api/s/s2s/track"
    only_write_key(got.headers, KEY)


async def test_basic_auth_wins_over_x_write_key(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    token = base64.b64encode(f"{KEY}:".encode()).decode()
    resp = await proxy.post(
        "/api/s/track",
        headers={"Authorization": f"Basic {token}", "X-Write-Key": "other:key"},
        json={"type": "track", "event": "x"},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    only_write_key(got.headers, KEY)


async def test_query_writekey_is_moved_to_header(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.post(
        f"/api/s/page?writekey={KEY}&utm_source=x",
        json={"type": "page", "messageId": "m-q"},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.path == "/api/s/page"
    assert got.query == {"utm_source": "x"}
    only_write_key(got.headers, KEY)


async def test_missing_message_id_is_assigned_at_the_edge(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.post("/api/s/identify", headers={"X-Write-Key": KEY}, json={"userId": "u1"})
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    message_id = got.json()["messageId"]
    assert isinstance(message_id, str) and len(message_id) == 36


async def test_event_route_and_one_letter_alias(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    r1 = await proxy.post(
        "/api/s/event", headers={"X-Write-Key": KEY}, json={"type": "group", "groupId": "g"}
    )
    r2 = await proxy.post("/api/s/t", headers={"X-Write-Key": KEY}, json={"event": "clicked"})
    assert (r1.status, r2.status) == (200, 200)
    got = await upstream.wait_delivered(2)
    assert sorted(r.path for r in got) == ["/api/s/event", "/api/s/t"]


async def test_beacon_text_plain_is_accepted(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.post(
        f"/api/s/track?writekey={KEY}",
        data=json.dumps({"type": "track", "event": "beacon"}),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.json()["event"] == "beacon"
    # The beacon's own type, as Jitsu would have seen it (it takes text/plain too).
    assert got.headers["Content-Type"] == "text/plain;charset=UTF-8"


async def test_batch_keeps_top_level_context_and_drops_body_key(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    payload = {
        "writeKey": KEY,
        "context": {"device": {"type": "phone"}, "library": {"name": "analytics-python"}},
        "batch": [
            {"type": "track", "event": "a", "messageId": "b-1"},
            {"type": "identify", "userId": "u", "messageId": "b-2"},
            {"type": "page", "messageId": "b-3", "context": {"page": {"url": "https://x"}}},
        ],
    }
    resp = await proxy.post("/v1/batch", json=payload)
    assert resp.status == 200
    assert await resp.json() == {"ok": True, "okEvents": 3, "receivedEvents": 3}
    (got,) = await upstream.wait_delivered(1)
    assert got.path == "/v1/batch"
    body = got.json()
    assert "writeKey" not in body
    assert SECRET not in got.body.decode()
    assert body["context"] == payload["context"]
    # Each event as sent, stamped with the time the proxy accepted it (it had none).
    assert [{k: v for k, v in e.items() if k != "timestamp"} for e in body["batch"]] == (
        payload["batch"]
    )
    assert len({e["timestamp"] for e in body["batch"]}) == 1
    only_write_key(got.headers, KEY)


@pytest.mark.parametrize("path", ["/v1/b", "/batch", "/b", "/v1/batch/b", "/api/s/s2s/batch"])
async def test_batch_aliases(proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str) -> None:
    resp = await proxy.post(
        path, json={"batch": [{"type": "track", "event": "e"}]}, headers={"X-Write-Key": KEY}
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.path == path
    assert len(got.json()["batch"]) == 1


async def test_gzip_batch(proxy: TestClient[Any, Any], upstream: FakeJitsu) -> None:
    payload = {"writeKey": KEY, "batch": [{"type": "track", "event": f"e{i}"} for i in range(50)]}
    resp = await proxy.post(
        "/v1/batch",
        data=gzip.compress(json.dumps(payload).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 200, await resp.text()
    (got,) = await upstream.wait_delivered(1)
    assert [e["event"] for e in got.json()["batch"]] == [f"e{i}" for i in range(50)]
    assert "Content-Encoding" not in got.headers


async def test_batch_with_bad_events_forwards_the_good_ones(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    payload = {
        "batch": [
            {"type": "track", "event": "ok", "messageId": "good"},
            {"type": "nonsense", "messageId": "bad"},
            "not an object",
        ]
    }
    resp = await proxy.post("/v1/batch", json=payload, headers={"X-Write-Key": KEY})
    assert resp.status == 200
    answer = await resp.json()
    assert answer["ok"] is False
    assert (answer["okEvents"], answer["receivedEvents"]) == (1, 3)
    assert answer["errors"][0].startswith("Message ID: bad: event error: Unknown event type")
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["good"]


async def test_client_ip_and_passthrough_headers(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(server={"trusted_proxies": ["127.0.0.0/8"]})
    headers = {
        "X-Write-Key": KEY,
        "X-Forwarded-For": "198.51.100.7, 203.0.113.9",
        "User-Agent": "Mozilla/5.0 test",
        "Accept-Language": "de-DE",
        "X-IP-Policy": "stripLastOctet",
        "Origin": "https://shop.example",
        "Referer": "https://shop.example/cart",
        "Cookie": "__eventn_id=abc",
    }
    resp = await proxy.post("/api/s/page", headers=headers, json={"type": "page"})
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    # The rightmost address our trusted peer did not add is the client.
    assert got.headers["X-Real-IP"] == "203.0.113.9"
    assert got.headers.getall("X-Forwarded-For") == ["203.0.113.9"]
    for name in ("User-Agent", "Accept-Language", "X-IP-Policy", "Origin", "Referer"):
        assert got.headers[name] == headers[name]
    only_write_key(got.headers, KEY)


async def test_spoofed_forwarding_headers_from_untrusted_peer_are_ignored(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(server={"trusted_proxies": []})
    resp = await proxy.post(
        "/api/s/track",
        headers={"X-Write-Key": KEY, "X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6"},
        json={"event": "x"},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.headers["X-Real-IP"] == "127.0.0.1"
    assert got.headers["X-Forwarded-For"] == "127.0.0.1"


@pytest.mark.parametrize("path", ["/api/s/page", "/api/s/s2s/track", "/v1/batch"])
async def test_cors_preflight_is_answered_at_the_edge(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str
) -> None:
    resp = await proxy.options(
        path,
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-write-key",
        },
    )
    assert resp.status == 200
    assert resp.headers.getall("Access-Control-Allow-Origin") == ["https://shop.example"]
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    allowed = {h.strip() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {
        "x-write-key",
        "content-type",
        "authorization",
        "x-ip-policy",
        "x-enable-debug",
        "cache-control",
        "x-jitsu-custom",
    } <= allowed
    assert upstream.received == []


async def test_cors_on_post_echoes_origin_once(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.post(
        "/api/s/track",
        headers={"Origin": "https://shop.example", "X-Write-Key": KEY},
        json={"event": "x"},
    )
    assert resp.headers.getall("Access-Control-Allow-Origin") == ["https://shop.example"]
    no_origin = await proxy.post("/api/s/track", headers={"X-Write-Key": KEY}, json={"event": "x"})
    assert "Access-Control-Allow-Origin" not in no_origin.headers


async def test_missing_key_on_s2s_and_batch_is_401(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    r1 = await proxy.post("/api/s/s2s/track", json={"event": "x"})
    r2 = await proxy.post("/v1/batch", json={"batch": [{"type": "track", "event": "x"}]})
    for resp in (r1, r2):
        assert resp.status == 401
        assert "stream not found" in (await resp.json())["error"]
    health = await proxy.get("/healthz")
    assert health.status == 200
    assert upstream.received == []


@pytest.mark.parametrize(
    "path", ["/v1/projects/segKey/settings", "/projects/projects/segKey/settings"]
)
async def test_segment_libraries_get_their_settings_document(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str
) -> None:
    resp = await proxy.get(path, headers={"Origin": "https://shop.example"})
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "public, max-age=86400"
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    # What Jitsu serves today (router_segment_settings_handler.go), byte for byte.
    assert await resp.read() == (
        b'{"integrations":{"Segment.io":{"apiKey":"segKey","versionSettings":{"version":"4.4.7",'
        b'"componentTypes":["browser"]}}},"plan":{"track":{"__default":{"enabled":true}},'
        b'"identify":{"__default":{"enabled":true}},"group":{"__default":{"enabled":true}}},'
        b'"analyticsNextEnabled":true}'
    )
    assert upstream.received == []


async def test_no_user_agent_of_the_proxys_own_goes_upstream(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """Jitsu stores the request's User-Agent with the event; aiohttp's own once went up for
    clients that sent none (issue 8). So did its Accept and Accept-Encoding, which Jitsu keeps
    among the headers for functions."""
    headers = {"X-Write-Key": "kid:secretsecret", "Content-Type": "application/json"}
    for mid, agent in (("no-ua", None), ("ua", "curl/8.5")):
        sent = dict(headers) if agent is None else {**headers, "User-Agent": agent}
        resp = await proxy.post(
            "/api/s/s2s/track",
            data=json.dumps({"event": "e", "messageId": mid}),
            headers=sent,
            skip_auto_headers=["User-Agent", "Accept", "Accept-Encoding"],
        )
        assert resp.status == 200
    await upstream.wait_for(lambda f: {"no-ua", "ua"} <= f.delivered_set)
    by_id = {r.message_ids[0]: r for r in upstream.delivered}
    for name in ("User-Agent", "Accept", "Accept-Encoding"):
        assert name not in by_id["no-ua"].headers
    assert by_id["ua"].headers["User-Agent"] == "curl/8.5"


async def test_health_and_robots_are_answered_as_jitsu_answers_them(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.get("/health")
    assert (resp.status, await resp.json()) == (200, {"status": "pass"})
    robots = await proxy.get("/robots.txt")
    assert (robots.status, await robots.text()) == (200, "User-agent: *\nDisallow: /\n")
    assert (await proxy.post("/health")).status == 405
    assert upstream.received == []
    task = proxy.server.app[APP_STATE].forwarder._task  # type: ignore[union-attr]
    task.cancel()
    await until(task.done)
    resp = await proxy.get("/health")
    assert (resp.status, await resp.json()) == (
        503,
        {"status": "fail", "output": "forwarder stopped"},
    )


async def test_events_without_a_timestamp_get_the_time_of_acceptance(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """Jitsu stamps an event that has none when it receives it: after an outage that would be
    the time of delivery, hours late. The edge stamps it when it accepts it; a client's own
    timestamp is never changed, null included (Jitsu keeps that too: SetIfAbsent)."""
    await upstream.stop()
    before = datetime.datetime.now(datetime.UTC)
    headers = {"X-Write-Key": KEY}
    for path, body in (
        ("/api/s/s2s/track", {"event": "e", "messageId": "s1"}),
        ("/api/s/track", {"event": "e", "messageId": "s2", "timestamp": "2020-01-02T03:04:05Z"}),
        ("/v1/batch", {"batch": [{"type": "page", "messageId": "s3"}]}),
        ("/api/s/s2s/track", {"event": "e", "messageId": "s5", "timestamp": None}),
    ):
        assert (await proxy.post(path, json=body, headers=headers)).status == 200
    pixel = await proxy.get(
        "/api/px/track", params={"writekey": KEY, "event": "e", "messageId": "s4"}
    )
    assert pixel.status == 200
    after = datetime.datetime.now(datetime.UTC)
    await asyncio.sleep(1.2)  # an outage: delivery comes later than acceptance
    await upstream.start()
    # Five events; after the outage the two s2s singles may go as one batch (upstream.coalesce).
    await upstream.wait_for(
        lambda f: sum(1 if r.method == "GET" else len(r.message_ids) for r in f.delivered) >= 5,
        timeout=15,
    )
    stamps = {}
    for rec in upstream.delivered:
        if rec.method == "GET":
            stamps[rec.query["messageId"]] = rec.query["timestamp"]
            continue
        payload = rec.json()
        for event in payload.get("batch", [payload]):
            stamps[event["messageId"]] = event["timestamp"]
    assert stamps["s2"] == "2020-01-02T03:04:05Z"
    assert stamps["s5"] is None
    for mid in ("s1", "s3", "s4"):
        stamp = stamps[mid]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
        when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.UTC
        )
        assert before - datetime.timedelta(milliseconds=1) <= when <= after, (mid, stamp)
