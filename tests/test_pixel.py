"""The tracking pixel and the ITP visitor-id endpoint, answered at the edge."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy import cookies
from proxy import envelope as env
from tests.conftest import state, until
from tests.fakejitsu import Answer, FakeJitsu

KEY = "pxKeyId:pxSecret"


def data(event: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(event).encode()).decode()


async def test_pixel_answers_the_gif_and_forwards_the_event(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.get(
        "/api/px/track",
        params={
            "writekey": KEY,
            "data": data({"event": "opened", "messageId": "px1"}),
            "properties.campaign": "spring",
        },
        headers={
            "Cookie": "__eventn_id=anon-1; session=private; __group_id=g1; other=x",
            "Referer": "https://shop.example/mail",
        },
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "image/gif"
    assert await resp.read() == cookies.GIF and len(cookies.GIF) == 43
    assert resp.headers["Cache-Control"] == "no-cache, no-store, must-revalidate"
    assert "X-Jitsu-Error" not in resp.headers
    (got,) = await upstream.wait_delivered(1)
    assert got.method == "GET" and got.path == "/api/px/track"
    assert "writekey" not in got.query
    assert got.query["properties.campaign"] == "spring"
    assert got.headers["X-Write-Key"] == KEY
    assert got.headers["Cookie"] == "__eventn_id=anon-1; __group_id=g1"
    assert got.headers["Referer"] == "https://shop.example/mail"


async def test_pixel_sets_the_visitor_cookie_on_the_sites_domain(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.get(
        "/api/px/page",
        params={"writekey": KEY, "process_headers": "true"},
        headers={"Host": "data.shop.example.co.uk"},
    )
    set_cookie = resp.headers["Set-Cookie"]
    assert set_cookie.startswith("__eventn_id=")
    assert "Domain=example.co.uk" in set_cookie
    visitor = set_cookie.split(";")[0].split("=", 1)[1]
    (got,) = await upstream.wait_delivered(1)
    assert got.headers["Cookie"] == f"__eventn_id={visitor}"
    assert got.query["messageId"]
    # With the cookie present, no new one is set.
    again = await proxy.get(
        "/api/px/page",
        params={"writekey": KEY, "process_headers": "1"},
        headers={"Cookie": f"__eventn_id={visitor}"},
    )
    assert "Set-Cookie" not in again.headers


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"writekey": KEY, "data": "%%%"}, "error parsing message"),
        ({"writekey": KEY}, "'event' property is required"),
    ],
)
async def test_pixel_errors_ride_in_a_header_and_nothing_is_forwarded(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, params: dict[str, str], error: str
) -> None:
    resp = await proxy.get("/api/px/track", params=params)
    assert resp.status == 200 and await resp.read() == cookies.GIF
    assert error in resp.headers["X-Jitsu-Error"]
    assert upstream.received == []


async def test_pixel_redirects_to_a_valid_destination(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    ok = await proxy.get(
        "/api/px/page",
        params={"writekey": KEY, "destination_url": "https://shop.example/landing"},
        allow_redirects=False,
    )
    assert ok.status == 302 and ok.headers["Location"] == "https://shop.example/landing"
    bad = await proxy.get(
        "/api/px/page",
        params={"writekey": KEY, "destination_url": "http://1.2.3.4/x"},
        allow_redirects=False,
    )
    assert bad.status == 200
    await upstream.wait_delivered(2)


@pytest.mark.parametrize(
    "url",
    [
        "https://shop.example:443/x",  # Jitsu wants no port at all, the default one included
        "https://shop.example:8443/x",
        "http://shop.example/x",
        "https://[2001:db8::1]/x",
        "https://localhost/x",  # the pixel's own host
    ],
)
def test_destinations_jitsu_would_not_redirect_to(url: str) -> None:
    assert not cookies.valid_destination(url, "localhost")
    assert cookies.valid_destination("https://shop.example/x", "localhost")


async def test_id_endpoint_sets_first_party_cookies(proxy: TestClient[Any, Any]) -> None:
    resp = await proxy.get(
        "/api/id", params={"domain": "shop.example"}, headers={"Host": "www.shop.example"}
    )
    assert resp.status == 200 and await resp.text() == "OK"
    assert resp.headers["Cache-Control"] == "must-revalidate,no-cache,no-store"
    lines = resp.headers.getall("Set-Cookie")
    assert len(lines) == 2
    plain, server = lines
    assert plain.startswith("__eventn_id=") and "HttpOnly" not in plain
    assert server.startswith("__eventn_id_srvr=") and "HttpOnly" in server
    assert plain.split(";")[0].split("=")[1] == server.split(";")[0].split("=")[1]
    for line in lines:
        assert "Domain=shop.example" in line and "Max-Age=157680000" in line
        assert "SameSite=Lax" in line, "plain http: no Secure, so no SameSite=None"


async def test_id_endpoint_keeps_the_known_visitor_and_user(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(server={"trusted_proxies": ["127.0.0.0/8"]})
    resp = await proxy.get(
        "/api/id",
        params={"domain": "evil.example"},  # not a parent of the host: ignored
        headers={
            "Host": "shop.example",
            "X-Forwarded-Proto": "https",
            "Cookie": "__eventn_id_srvr=known-visitor; __eventn_uid=user-7",
            "Origin": "https://shop.example",
        },
    )
    lines = resp.headers.getall("Set-Cookie")
    assert [line.split(";")[0] for line in lines] == [
        "__eventn_id=known-visitor",
        "__eventn_id_srvr=known-visitor",
        "__eventn_uid=user-7",
        "__eventn_uid_srvr=user-7",
    ]
    for line in lines:
        assert "Domain=shop.example" in line
        assert "SameSite=None; Secure" in line
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("www.shop.example.com", "example.com"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("example.com:8080", "example.com"),
        ("localhost", "localhost"),
        ("127.0.0.1:8080", "127.0.0.1"),
    ],
)
def test_registrable_domain(host: str, expected: str) -> None:
    assert cookies.registrable_domain(host) == expected


async def pixel_then_marker(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, query: str, **kw: Any
) -> tuple[Any, list[Any]]:
    """GET the pixel with a raw query string, then a plain pixel that is surely forwarded:
    once that one arrived, everything the first one made upstream get has arrived too."""
    resp = await proxy.get(f"/api/px/{query}", allow_redirects=False, **kw)
    marker = uuid.uuid4().hex
    sent = await proxy.get(
        "/api/px/track", params={"writekey": KEY, "event": "marker", "messageId": marker}
    )
    assert "X-Jitsu-Error" not in sent.headers
    await upstream.wait_for(lambda f: any(r.query.get("messageId") == marker for r in f.delivered))
    return resp, [r for r in upstream.delivered if r.query.get("event") != "marker"]


def pairs(received: Any, name: str) -> list[str]:
    return [v for k, v in received.query_pairs if k == name]


async def test_pixel_repeated_parameter_is_validated_as_forwarded(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    # Issue 7, finding 12: the event was validated with the last `type` and forwarded with
    # the first, so a type the edge never accepted went upstream. Now both values go, as an
    # array, which Jitsu's patchEvent reads as no type at all (GetS), whatever their order.
    for types in ("type=bogus&type=track", "type=track&type=bogus"):
        resp, got = await pixel_then_marker(
            proxy, upstream, f"event?writekey={KEY}&event=opened&{types}"
        )
        assert "type property of event is required" in resp.headers["X-Jitsu-Error"]
        assert got == []


async def test_pixel_repeated_track_name_is_validated_as_forwarded(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    for names in ("event=&event=opened", "event=opened&event=clicked"):
        resp, got = await pixel_then_marker(proxy, upstream, f"track?writekey={KEY}&{names}")
        assert "'event' property" in resp.headers["X-Jitsu-Error"]
        assert got == []


async def test_pixel_forwards_every_value_of_a_repeated_parameter(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """Jitsu's parsePixelEvent makes an array of a repeated parameter: all its values go
    upstream, in order. Of the control parameters and the key Jitsu reads the first value
    only (url.Values.Get): the first steers the answer and is the only one forwarded."""
    first = data({"event": "first", "messageId": "px-first"})
    second = data({"event": "second", "messageId": "px-second"})
    query = (
        f"track?writekey={KEY}&writekey=otherId:otherSecret"
        f"&data={first}&data={second}"
        "&destination_url=https://shop.example/first&destination_url=https://evil.example/x"
        "&process_headers=1&process_headers=0"
        "&cookie_domain=shop.example&cookie_domain=data.shop.example"
        "&properties.campaign=spring&properties.tags=a&properties.campaign=autumn"
        "&properties.tags=b&properties.tags=c"
    )
    resp, got = await pixel_then_marker(
        proxy, upstream, query.replace("+", "%2B"), headers={"Host": "data.shop.example"}
    )
    assert "X-Jitsu-Error" not in resp.headers
    assert resp.status == 302 and resp.headers["Location"] == "https://shop.example/first"
    assert "Domain=shop.example;" in resp.headers["Set-Cookie"]
    (event,) = got
    assert event.headers["X-Write-Key"] == KEY
    assert pairs(event, "writekey") == []
    assert pairs(event, "data") == [first]
    assert pairs(event, "destination_url") == ["https://shop.example/first"]
    assert pairs(event, "process_headers") == ["1"]
    assert pairs(event, "cookie_domain") == ["shop.example"]
    assert pairs(event, "properties.campaign") == ["spring", "autumn"]
    assert pairs(event, "properties.tags") == ["a", "b", "c"]


def test_pixel_event_is_built_as_jitsu_builds_it() -> None:
    """Arrays for repeated names, and jsonorder's SetPath: a dotted name under a field that is
    no object sets nothing, in whichever order the names come."""
    query = env.pixel_query(
        [
            ("data", data({"event": "opened", "user": "u1"})),
            ("properties.tags", "a"),
            ("properties.tags", "b"),
            ("properties.one", "1"),
            ("user.id", "dropped"),
            ("ctx.page.url", "https://shop.example/"),
            ("ctx", "plain"),
            ("ctx.late", "dropped"),
            ("event.sub", "dropped"),
        ]
    )
    assert env.pixel_event(query, "track") == {
        "event": "opened",
        "user": "u1",
        "properties": {"tags": ["a", "b"], "one": "1"},
        "ctx": "plain",
    }


async def test_pixel_dotted_name_under_a_plain_field_is_not_an_object(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """`event=opened&event.x=1`: Jitsu keeps the name a string (SetPath sets nothing under
    it), so the event is valid and goes upstream; it was refused as a non-string name."""
    resp, got = await pixel_then_marker(
        proxy, upstream, f"track?writekey={KEY}&event=opened&event.x=1"
    )
    assert "X-Jitsu-Error" not in resp.headers
    (event,) = got
    assert pairs(event, "event") == ["opened"] and pairs(event, "event.x") == ["1"]


async def test_pixel_empty_destination_in_the_query_wins_over_the_event(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """gin's DefaultQuery: a destination_url in the query, even an empty one, is the one."""
    event = data({"event": "opened", "destination_url": "https://shop.example/offer"})
    resp, _got = await pixel_then_marker(
        proxy, upstream, f"track?writekey={KEY}&data={event}&destination_url="
    )
    assert resp.status == 200 and resp.content_type == "image/gif"


async def test_a_key_inside_the_pixel_data_is_masked_upstream(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    secret_key = "kid:PIXSECRET999"
    data = base64.b64encode(
        json.dumps({"event": "px", "writeKey": secret_key, "messageId": "pxk"}).encode()
    ).decode()
    resp = await proxy.get("/api/px/track", params={"data": data, "writekey": secret_key})
    assert resp.status == 200
    await upstream.wait_for(lambda f: len(f.delivered) == 1)
    (got,) = upstream.delivered
    assert "PIXSECRET999" not in got.path + json.dumps(got.query) + got.body.decode()
    forwarded = json.loads(base64.b64decode(got.query["data"]))
    assert forwarded == {"event": "px", "writeKey": "kid:***", "messageId": "pxk"}
    assert got.headers["X-Write-Key"] == secret_key


async def test_a_repeated_key_inside_the_pixel_data_is_masked_too(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """Found by the second attack pass: with writeKey twice in `data`, the parsed (last) one
    was already masked and the raw data, secret and all, went upstream."""
    raw = b'{"event":"dup","writeKey":"kid:DUPSECRET77","writeKey":"kid:***","messageId":"dup"}'
    resp = await proxy.get("/api/px/track", params={"data": base64.b64encode(raw).decode()})
    assert resp.status == 200
    await upstream.wait_for(lambda f: len(f.delivered) == 1)
    (got,) = upstream.delivered
    assert b"DUPSECRET77" not in base64.b64decode(got.query["data"])


async def test_pixel_reads_destination_and_cookie_domain_from_its_event_as_jitsu_does(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """Jitsu takes destination_url from the query, else from the event's data; cookie_domain
    only from the event (the query's is skipped when the event is built)."""
    event = data({"destination_url": "https://shop.example/offer", "cookie_domain": "shop.example"})
    resp = await proxy.get(
        "/api/px/page",
        params={"writekey": KEY, "data": event, "process_headers": "1"},
        headers={"Host": "a.b.shop.example"},
        allow_redirects=False,
    )
    assert resp.status == 302 and resp.headers["Location"] == "https://shop.example/offer"
    assert "Domain=shop.example;" in resp.headers["Set-Cookie"] + ";"
    ignored = await proxy.get(
        "/api/px/page",
        params={"writekey": KEY, "process_headers": "1", "cookie_domain": "b.shop.example"},
        headers={"Host": "a.b.shop.example"},
    )
    # The query's cookie_domain is not Jitsu's: the registrable domain applies.
    assert "Domain=shop.example;" in ignored.headers["Set-Cookie"] + ";"
    await upstream.wait_delivered(2)


async def test_head_on_the_pixel_records_nothing(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.head("/api/px/track", params={"writekey": KEY, "event": "opened"})
    assert resp.status == 405
    assert state(proxy).buffer.rows == 0  # type: ignore[union-attr]
    assert upstream.received == []


async def test_pixel_answers_gif_or_redirect_when_the_event_cannot_be_stored(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Click-tracking links once landed on a JSON error page under a full buffer."""
    await upstream.stop()
    proxy = await make_proxy(buffer={"max_bytes": 1_500})
    params = {"writekey": KEY, "event": "opened", "properties.pad": "x" * 300}
    for _ in range(50):  # fill the buffer
        if (await proxy.get("/api/px/track", params=params)).status != 200:
            break
        if state(proxy).buffer.rows and not state(proxy).buffer.writable:
            break
    full = await proxy.get("/api/px/track", params=params)
    assert full.status == 200 and await full.read() == cookies.GIF
    assert "event not stored: buffer full" in full.headers["X-Jitsu-Error"]
    away = await proxy.get(
        "/api/px/track",
        params={**params, "destination_url": "https://shop.example/next"},
        allow_redirects=False,
    )
    assert away.status == 302 and away.headers["Location"] == "https://shop.example/next"
    assert "buffer full" in away.headers["X-Jitsu-Error"]


async def test_pixel_answers_gif_when_rate_limited(make_proxy: Any) -> None:
    proxy = await make_proxy(security={"rate_limit": {"per_ip_rps": 1, "per_ip_burst": 1}})
    answers = [
        await proxy.get("/api/px/track", params={"writekey": KEY, "event": "e"}) for _ in range(3)
    ]
    assert all(a.status == 200 and a.content_type == "image/gif" for a in answers)
    assert "rate limit" in answers[-1].headers["X-Jitsu-Error"]


async def test_jitsus_redirect_to_a_non_ascii_destination_is_a_delivery(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, logs: Any
) -> None:
    """Go's http.Redirect percent-escapes non-ASCII bytes in Location: compared as it came,
    Jitsu's acceptance of a pixel with /größe passed for a wrong upstream.url, and the event
    was sent (and stored by Jitsu) over and over (second attack pass)."""
    escaped = "https://shop.example/gr%c3%b6%c3%9fe"
    upstream.fault = lambda rec: (
        Answer(302, {}, {"Location": escaped}) if rec.method == "GET" else None
    )
    resp = await proxy.get(
        "/api/px/page",
        params={"writekey": KEY, "destination_url": "https://shop.example/größe"},
        allow_redirects=False,
    )
    assert resp.status == 302
    buf = state(proxy).buffer  # type: ignore[union-attr]
    await upstream.wait_for(lambda f: len(f.received) == 1)
    await until(lambda: buf.rows == 0)
    assert (buf.rows, buf.dead_rows, len(upstream.received)) == (0, 0, 1)
    assert "upstream_redirect" not in logs.getvalue()
