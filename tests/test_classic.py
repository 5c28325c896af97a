"""Jitsu's Classic API through the proxy: routes, key places and their precedence, answers,
and durability, checked against what Jitsu's classic handler does
(ingest/router_classic_handler.go)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.auth import KeySource, WriteKey, find_classic_key
from tests.conftest import state, until
from tests.fakejitsu import Answer, FakeJitsu, Received

KEY = "clsKeyId:clsSecret42"
SECRET = KEY.split(":")[1]
OTHER = "otherId:otherSecret77"

# Every classic route (path to POST to, path Jitsu gets, s2s).
ROUTES = [
    ("/api/v1/event", False),
    ("/api/v1/events", False),
    ("/api.x7k2q", False),
    ("/api/v1/s2s/event", True),
    ("/api/v1/s2s/event/", True),
    ("/api/v1/s2s/events", True),
]
BROWSER, S2S = "/api/v1/event", "/api/v1/s2s/event"


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def no_key_anywhere_but_x_write_key(got: Received, key: str) -> None:
    assert got.headers["X-Write-Key"] == key
    for name in ("Authorization", "X-Auth-Token", "api_key"):
        assert name not in got.headers
    for name, _ in got.query_pairs:
        assert name not in {"token", "writekey"} and not name.startswith("p_"), name


@pytest.mark.parametrize(("path", "s2s"), ROUTES)
async def test_every_classic_route_is_buffered_and_forwarded_to_the_same_path(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str, s2s: bool
) -> None:
    resp = await proxy.post(
        f"{path}?token={KEY}&ip_policy=strict",
        json={"event_type": "pageview", "eventn_ctx_event_id": "c1", "user": {"id": 7}},
    )
    assert resp.status == 200
    assert await resp.json() == {"ok": True}
    (got,) = await upstream.wait_delivered(1)
    assert got.method == "POST" and got.path == path
    no_key_anywhere_but_x_write_key(got, KEY)
    # Jitsu reads ip_policy from the query of a classic request: it goes on.
    assert got.query_pairs == [("ip_policy", "strict")]
    assert got.headers["Content-Type"] == "application/json"
    event = got.json()
    assert event["event_type"] == "pageview" and event["user"] == {"id": 7}
    assert event["eventn_ctx_event_id"] == "c1"


@pytest.mark.parametrize(
    ("where", "request_kw"),
    [
        ("authorization", {"headers": {"Authorization": basic(KEY)}}),
        ("x-write-key", {"headers": {"X-Write-Key": KEY}}),
        ("writekey", {"params": {"writekey": KEY}}),
        ("token", {"params": {"token": KEY}}),
        ("x-auth-token", {"headers": {"X-Auth-Token": KEY}}),
        ("api_key header", {"headers": {"api_key": KEY}}),
        ("p_ parameter", {"params": {"p_q81zr": KEY}}),
    ],
)
async def test_each_key_place_ends_up_in_x_write_key_only(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, where: str, request_kw: dict[str, Any]
) -> None:
    resp = await proxy.post(S2S, json={"event_type": "signup"}, **request_kw)
    assert resp.status == 200, where
    (got,) = await upstream.wait_delivered(1)
    no_key_anywhere_but_x_write_key(got, KEY)
    assert got.query_pairs == []


@pytest.mark.parametrize(
    ("request_kw", "winner"),
    [
        ({"headers": {"Authorization": basic(KEY), "X-Write-Key": OTHER}}, KEY),
        ({"headers": {"X-Write-Key": KEY}, "params": {"writekey": OTHER, "token": OTHER}}, KEY),
        ({"params": {"writekey": KEY, "token": OTHER}}, KEY),
        ({"params": {"token": KEY}, "headers": {"X-Auth-Token": OTHER, "api_key": OTHER}}, KEY),
        ({"headers": {"X-Auth-Token": KEY, "api_key": OTHER}, "params": {"p_a": OTHER}}, KEY),
        ({"headers": {"api_key": KEY}, "params": {"p_a": OTHER}}, KEY),
        ({"params": [("p_b", KEY), ("p_a", OTHER)]}, KEY),
    ],
)
async def test_key_precedence_is_jitsus_and_every_other_place_is_emptied(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, request_kw: dict[str, Any], winner: str
) -> None:
    """getDataLocator's places first (Authorization, X-Write-Key, ?writekey=), then the
    classic handler's: ?token=, X-Auth-Token, api_key, a ?p_*= parameter. The losers carry a
    key too: none of them goes upstream."""
    resp = await proxy.post(BROWSER, json={"event_type": "e"}, **request_kw)
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    no_key_anywhere_but_x_write_key(got, winner)
    sent = got.path + json.dumps(got.query_pairs) + json.dumps(dict(got.headers))
    assert "otherSecret77" not in sent + got.body.decode()


def test_find_classic_key_precedence_and_blanks() -> None:
    headers = {"X-Auth-Token": "a:1", "api_key": "b:2"}
    assert find_classic_key(headers, [("token", "t:0")]) == WriteKey("t:0", KeySource.CLASSIC)
    assert find_classic_key(headers, [("token", "")]) == WriteKey("a:1", KeySource.CLASSIC)
    assert find_classic_key({"api_key": "b:2"}, []) == WriteKey("b:2", KeySource.CLASSIC)
    # The first value of a repeated ?token=, as Go's c.Query reads it.
    assert find_classic_key({}, [("token", "t:1"), ("token", "t:2")]) == WriteKey(
        "t:1", KeySource.CLASSIC
    )
    # Jitsu takes the p_ parameter's value even when empty: then there is no key.
    assert find_classic_key({}, [("p_x", ""), ("p_y", "p:1")]) is None
    assert find_classic_key({}, [("q", "v")]) is None
    # An Authorization that holds no key still wins: Jitsu asks no other place.
    empty_basic = base64.b64encode(b":").decode()
    assert find_classic_key({"Authorization": f"Basic {empty_basic}"}, [("token", "t:0")]) is None


@pytest.mark.parametrize(("path", "status"), [(BROWSER, 200), (S2S, 400)])
async def test_malformed_authorization_is_answered_as_jitsu_does(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str, status: int
) -> None:
    resp = await proxy.post(
        f"{path}?token={KEY}", headers={"Authorization": "Basic %%%"}, json={"event_type": "e"}
    )
    assert resp.status == status
    assert "failed to decode writeKey from Authorization header" in (await resp.json())["error"]
    assert state(proxy).buffer.rows == 0 and upstream.received == []


@pytest.mark.parametrize(("path", "status", "kind"), [(BROWSER, 200, "browser"), (S2S, 401, "s2s")])
async def test_missing_key_is_stream_not_found_and_nothing_is_stored(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str, status: int, kind: str
) -> None:
    """Jitsu finds classic streams by key only (getStream strict): no Host or sole-stream
    fallback, so without a key the answer is known at the edge."""
    resp = await proxy.post(path, json={"event_type": "e"}, headers={"Host": "data.shop.example"})
    assert resp.status == status
    assert await resp.json() == {
        "error": f"stream not found: for: [slug: ][domain: data.shop.example][writeKey: ]"
        f"[ingestType: {kind}]"
    }
    assert state(proxy).buffer.rows == 0 and upstream.received == []


async def test_body_api_key_is_masked_and_unused_key_params_are_dropped(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """The classic tracker puts the key in the body's api_key too. Jitsu overwrites that field
    with the key it found the stream by, so the body's value only carried the secret."""
    resp = await proxy.post(
        f"{BROWSER}?token={KEY}&p_zz={KEY}&cookie_policy=strict",
        json={"api_key": KEY, "event_type": "pageview", "src": "jitsu"},
        headers={"X-Auth-Token": KEY, "api_key": KEY},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    no_key_anywhere_but_x_write_key(got, KEY)
    event = got.json()
    assert list(event)[:3] == ["api_key", "event_type", "src"], "field order kept"
    assert event["api_key"] == "clsKeyId:***"
    assert got.query_pairs == [("cookie_policy", "strict")]
    assert SECRET not in got.body.decode() + got.path + json.dumps(got.query_pairs)


async def test_an_array_is_forwarded_event_by_event(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    empty = await proxy.post(f"{S2S}?token={KEY}", json=[])
    assert empty.status == 200 and await empty.json() == {"ok": True}
    assert state(proxy).buffer.rows == 0
    body = [{"event_type": "a", "eventn_ctx_event_id": "a1"}, {"event_type": "b"}]
    resp = await proxy.post(f"{S2S}?token={KEY}", json=body)
    assert resp.status == 200 and await resp.json() == {"ok": True}
    delivered = await upstream.wait_delivered(2)
    events = sorted((r.json() for r in delivered), key=lambda e: e["event_type"])
    assert [e["event_type"] for e in events] == ["a", "b"]
    assert events[0]["eventn_ctx_event_id"] == "a1"
    # One is given at the edge, so that a retry of it dedupes upstream.
    assert re.fullmatch(r"[0-9a-f-]{36}", events[1]["eventn_ctx_event_id"])


async def test_utc_time_is_set_at_acceptance_when_absent(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """patchClassicEvent sets utc_time to the time of receipt when the event has none (and
    _timestamp always); through the proxy receipt would be delivery, late after an outage."""
    await upstream.stop()
    before = datetime.datetime.now(datetime.UTC)
    body = [
        {"event_type": "stamped", "eventn_ctx_event_id": "u1"},
        {"event_type": "own", "eventn_ctx_event_id": "u2", "utc_time": "2020-01-02T03:04:05Z"},
        {"event_type": "null", "eventn_ctx_event_id": "u3", "utc_time": None},
    ]
    assert (await proxy.post(f"{S2S}?token={KEY}", json=body)).status == 200
    after = datetime.datetime.now(datetime.UTC)
    await asyncio.sleep(1.2)  # delivery comes well after acceptance
    await upstream.start()
    delivered = await upstream.wait_delivered(3, timeout=15)
    by_id = {r.json()["eventn_ctx_event_id"]: r.json() for r in delivered}
    stamp = by_id["u1"]["utc_time"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
    assert before - datetime.timedelta(milliseconds=1) <= when <= after
    assert by_id["u2"]["utc_time"] == "2020-01-02T03:04:05Z"
    assert by_id["u3"]["utc_time"] is None, "present, if null: SetIfAbsent leaves it"


@pytest.mark.parametrize(
    ("content_type", "body", "browser", "s2s", "error"),
    [
        ("text/html", b"{}", 400, 400, "invalid content type: text/html"),
        ("application/json", b"{nope", 200, 400, "error parsing message"),
        ("application/json", b'"text"', 200, 400, "error parsing message"),
        ("application/json", b"[1, 2]", 200, 400, "error parsing message"),
        # Only a body whose first byte is `[` is read as an array (body[0] == '[').
        ("application/json", b' [{"a": 1}]', 200, 400, "error parsing message"),
        # Jitsu indexes an empty body and reads a null event: both panic, recovered as 500.
        ("application/json", b"", 500, 500, ": panic"),
        ("application/json", b"null", 500, 500, ": panic"),
        ("application/json", b'[{"a": 1}, null]', 500, 500, ": panic"),
    ],
)
async def test_bad_bodies_are_answered_as_jitsu_answers_them(
    proxy: TestClient[Any, Any],
    upstream: FakeJitsu,
    content_type: str,
    body: bytes,
    browser: int,
    s2s: int,
    error: str,
) -> None:
    for path, status in ((BROWSER, browser), (S2S, s2s)):
        resp = await proxy.post(
            f"{path}?token={KEY}", data=body, headers={"Content-Type": content_type}
        )
        assert resp.status == status, path
        assert error in (await resp.json())["error"]
    assert state(proxy).buffer.rows == 0 and upstream.received == []


async def test_beacon_text_plain_is_accepted(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.post(
        f"/api.r4nd0m?p_k3y={KEY}",
        data=b'{"event_type":"beacon"}',
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.path == "/api.r4nd0m" and got.json()["event_type"] == "beacon"
    no_key_anywhere_but_x_write_key(got, KEY)


async def test_an_event_too_large_is_refused_and_the_others_go_on(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(limits={"max_event_bytes": 200})
    body = [{"event_type": "small"}, {"event_type": "big", "pad": "x" * 300}, {"event_type": "ok"}]
    resp = await proxy.post(f"{S2S}?token={KEY}", json=body)
    assert resp.status == 400
    assert "event error: message size" in (await resp.json())["error"]
    delivered = await upstream.wait_delivered(2)
    assert sorted(r.json()["event_type"] for r in delivered) == ["ok", "small"]
    browser = await proxy.post(f"{BROWSER}?token={KEY}", json=body[1])
    assert browser.status == 200 and "message size" in (await browser.json())["error"]


async def test_body_over_max_request_bytes_is_413(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(limits={"max_request_bytes": 1024})
    resp = await proxy.post(f"{S2S}?token={KEY}", json={"pad": "x" * 2000})
    assert resp.status == 413
    assert state(proxy).buffer.rows == 0


@pytest.mark.parametrize("path", [path for path, _ in ROUTES] + ["/s/lib.js"])
async def test_preflight_and_cors_as_on_every_public_route(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str
) -> None:
    resp = await proxy.options(
        path,
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"},
    )
    assert resp.status == 200
    assert resp.headers.getall("Access-Control-Allow-Origin") == ["https://shop.example"]
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert "x-write-key" in resp.headers["Access-Control-Allow-Headers"]
    if path != "/s/lib.js":
        post = await proxy.post(
            f"{path}?token={KEY}", json={}, headers={"Origin": "https://shop.example"}
        )
        assert post.headers.getall("Access-Control-Allow-Origin") == ["https://shop.example"]
        assert "Origin" in post.headers["Vary"]


async def test_event_is_durable_before_the_answer(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    await upstream.stop()
    resp = await proxy.post(f"{BROWSER}?token={KEY}", json={"event_type": "outage"})
    assert resp.status == 200 and await resp.json() == {"ok": True}
    assert state(proxy).buffer.rows == 1
    await upstream.start()
    (got,) = await upstream.wait_delivered(1, timeout=15)
    assert got.json()["event_type"] == "outage"
    no_key_anywhere_but_x_write_key(got, KEY)


async def test_jitsus_refusal_with_its_ok_behind_it_is_dead_lettered(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """The classic handler answers a refused event with its error and then {"ok":true} in
    one body (gin appends each c.JSON): a verdict, not an answer to retry for ever."""
    upstream.script.append(
        Answer(
            400,
            text='{"error":"event error: message size 2000 is too big"}{"ok":true}',
            content_type="application/json",
        )
    )
    assert (await proxy.post(f"{S2S}?token={KEY}", json={"event_type": "e"})).status == 200
    buffer = state(proxy).buffer
    await until(lambda: buffer.dead_rows == 1 and buffer.rows == 0, timeout=10)
    (dead,) = await buffer.dead_letters()
    assert "message size 2000 is too big" in dead["reason"]
    assert len(upstream.received) == 1


async def test_allowed_key_ids_and_key_rate_limit_apply(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(
        security={
            "allowed_key_ids": ["clsKeyId"],
            "rate_limit": {"per_key_rps": 1, "per_key_burst": 1},
        }
    )
    browser = await proxy.post(f"{BROWSER}?token={OTHER}", json={})
    assert browser.status == 200 and "stream not found" in (await browser.json())["error"]
    s2s = await proxy.post(S2S, headers={"X-Auth-Token": OTHER}, json={})
    assert s2s.status == 401
    assert "otherSecret77" not in await browser.text() + await s2s.text()
    first = await proxy.post(f"{S2S}?token={KEY}", json={})
    second = await proxy.post(f"{S2S}?token={KEY}", json={})
    assert (first.status, second.status) == (200, 429)
    await upstream.wait_delivered(1)
    assert len(upstream.received) == 1


async def test_the_secret_never_reaches_the_log(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, logs: io.StringIO
) -> None:
    await proxy.post(f"/api.abc?p_abc={KEY}", json={"api_key": KEY})
    await proxy.post(
        S2S, headers={"X-Auth-Token": KEY, "Content-Type": "application/json"}, data=b"{bad"
    )
    await upstream.wait_delivered(1)
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    requests = [line for line in lines if line["event"] == "request"]
    assert [r["route"] for r in requests] == ["/api.{ignored}", S2S]
    assert {r["key_id"] for r in requests} == {"clsKeyId"}
    assert SECRET not in logs.getvalue()


async def test_classic_routes_follow_routes_jitsu_paths(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(routes={"jitsu_paths": False, "event_prefix": "/e"})
    for path in (BROWSER, S2S, "/api.abc"):
        assert (await proxy.post(f"{path}?token={KEY}", json={})).status == 404
    assert (await proxy.get("/s/lib.js")).status == 404


@pytest.mark.parametrize("raw", ["/api.x%2Fy", "/api.x%2F", "/api.%2F..%2Fv1%2Fevent"])
async def test_a_path_jitsu_cannot_route_is_refused_not_buffered(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, raw: str
) -> None:
    """`/api.x%2Fy` matched /api.{ignored} here, was taken with 200 and went up as it came;
    Jitsu decodes it to /api.x/y, has no route for it, and the 404 (or gin's 307 for a
    trailing slash) was retried as an outage: one such request of 5,000 array items stalled
    all delivery (attack pass). Jitsu answers 404 to it; so does the proxy, keeping nothing."""
    url = URL(str(proxy.make_url("/")).rstrip("/") + raw + f"?token={KEY}", encoded=True)
    resp = await proxy.session.post(url, json=[{"event_type": "x"}] * 3)
    assert resp.status == 404
    assert state(proxy).buffer.rows == 0
    assert upstream.received == []


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/api.a%20b", "/api.a%20b"),  # Jitsu decodes and routes it: the same segment goes up
        ("/api.%41bc", "/api.Abc"),
        ("/api/v1/%65vent", "/api/v1/event"),  # a fixed route goes up under its own name
        ("/api/v1/s2s/event/", "/api/v1/s2s/event/"),
    ],
)
async def test_classic_paths_go_up_as_jitsu_routes_them(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, raw: str, forwarded: str
) -> None:
    url = URL(str(proxy.make_url("/")).rstrip("/") + raw + f"?token={KEY}", encoded=True)
    resp = await proxy.session.post(url, json={"event_type": "x", "eventn_ctx_event_id": "p1"})
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.path == URL(forwarded, encoded=True).path


async def test_an_array_cannot_multiply_its_headers_past_the_bound(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Every event of an array is stored with the request's headers: 200 tiny events under
    8 KB of headers would cost the buffer 1.6 MB for a 10 KB request (attack pass, F3)."""
    proxy = await make_proxy(limits={"max_decompressed_bytes": 1_000_000})
    headers = {f"X-Pad-{i}": "p" * 1000 for i in range(8)}
    events = [{"event_type": "x", "eventn_ctx_event_id": f"a{i}"} for i in range(200)]
    resp = await proxy.post(f"{BROWSER}?token={KEY}", json=events, headers=headers)
    assert resp.status == 413
    assert "request too large once stored" in (await resp.json())["error"]
    assert state(proxy).buffer.rows == 0
    ok = await proxy.post(f"{BROWSER}?token={KEY}", json=events[:50], headers=headers)
    assert ok.status == 200
    await until(lambda: len(upstream.delivered) == 50)
