"""What goes upstream of the client's request headers: all its end-to-end headers, as Jitsu
would have seen them, less hop-by-hop ones, credentials, the body's own and the ones the proxy
sets itself; X-Forwarded-Host/-Proto; the client's Host with upstream.preserve_host (issue 8,
points 4 and 5).

Jitsu keeps the request headers for functions as ctx.headers (ingest/router.go
buildIngestMessage: repeated ones joined by ",", x-jitsu-* and x-vercel* left out by Jitsu
itself) and finds streams by Host (getDataLocator). The exact header sets below are what the
fake upstream received, the headers aiohttp's client sets itself (Content-Length, Host)
included; of Accept-Encoding only the client's codings the forwarder can read go up.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from yarl import URL

from proxy.auth import KeySource, WriteKey
from proxy.errors import IngestError
from proxy.headers import ClientOrigin, forward_headers, readable_codings
from proxy.state import APP_STATE
from tests.fakejitsu import FakeJitsu, Received

KEY = "hdrKeyId:hdrSecretValue42"
AUTHORIZATION = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
WRITE_KEY = WriteKey(KEY, KeySource.AUTHORIZATION)
# aiohttp's client asks for what it can decode, whatever the browser asked for.


def received(got: Received) -> dict[str, str]:
    """The upstream request's headers by lower-case name; each arrived on one line."""
    names = [name.lower() for name in got.headers]
    assert len(names) == len(set(names)), got.headers
    return {name.lower(): value for name, value in got.headers.items()}


def browser_headers() -> CIMultiDict[str]:
    """A browser's request through a hostile or careless client: custom headers, hop-by-hop
    ones, one named in Connection, credentials and forged forwarding headers."""
    return CIMultiDict(
        [
            ("Host", "shop.example:8443"),
            ("Authorization", AUTHORIZATION),
            ("X-Auth-Token", KEY),
            ("Cookie", "session=private; __eventn_id=v1"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("Forwarded", "for=6.6.6.6;proto=https"),
            ("CF-Connecting-IP", "6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
            ("Connection", "keep-alive, X-Hop-Private"),
            ("X-Hop-Private", "for the next hop only"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic cHJveHk6cHc="),
            ("Accept-Encoding", "gzip, deflate, br, zstd"),
            ("Accept", "application/json"),
            ("Accept", "text/plain"),
            ("X-Multi", "a"),
            ("X-Multi", "b"),
            ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) test"),
            ("Accept-Language", "de-DE,de;q=0.9"),
            ("Origin", "https://shop.example"),
            ("Referer", "https://shop.example/cart"),
            ("X-Jitsu-Custom", '{"plan":"pro"}'),
            ("X-Vercel-Id", "fra1::abc"),
            ("Cache-Control", "no-cache"),
            ("X-Empty", ""),
        ]
    )


# What Jitsu gets of browser_headers() besides what the proxy sets: as sent, repeats joined.
PASSED = {
    "accept": "application/json,text/plain",
    "x-multi": "a,b",
    "user-agent": "Mozilla/5.0 (X11; Linux x86_64) test",
    "accept-language": "de-DE,de;q=0.9",
    "origin": "https://shop.example",
    "referer": "https://shop.example/cart",
    "x-jitsu-custom": '{"plan":"pro"}',
    "x-vercel-id": "fra1::abc",
    "cache-control": "no-cache",
    "x-empty": "",
}


async def test_end_to_end_headers_go_upstream_as_jitsu_would_see_them(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(server={"trusted_proxies": []})
    headers = browser_headers()
    headers["Content-Type"] = "application/json"
    resp = await proxy.post("/api/s/page", headers=headers, data=b'{"type":"page"}')
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert received(got) == {
        **PASSED,
        "host": f"127.0.0.1:{upstream.port}",
        "content-type": "application/json",
        "content-length": str(len(got.body)),
        # The client's, less the codings the forwarder cannot read (br, zstd).
        "accept-encoding": "gzip, deflate",
        "x-write-key": KEY,
        "x-real-ip": "127.0.0.1",
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-host": "shop.example:8443",
        "x-forwarded-proto": "http",
    }


async def test_forwarding_headers_are_believed_from_trusted_proxies_only(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(server={"trusted_proxies": ["127.0.0.0/8"]})
    forwarded = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Host": "shop.example, cdn-origin.example",
        "X-Forwarded-Proto": "https, http",
    }
    for mid, extra in (("via-cdn", forwarded), ("direct", {})):
        resp = await proxy.post(
            "/api/s/s2s/track",
            headers={"X-Write-Key": KEY, "Host": "data.shop.example", **extra},
            json={"event": "e", "messageId": mid},
            skip_auto_headers=["User-Agent"],
        )
        assert resp.status == 200
    await upstream.wait_for(lambda f: {"via-cdn", "direct"} <= f.delivered_set)
    by_id = {r.message_ids[0]: received(r) for r in upstream.delivered}
    # The first value: what the first proxy saw of the client.
    assert by_id["via-cdn"]["x-forwarded-host"] == "shop.example"
    assert by_id["via-cdn"]["x-forwarded-proto"] == "https"
    assert by_id["via-cdn"]["x-real-ip"] == "203.0.113.9"
    assert by_id["direct"]["x-forwarded-host"] == "data.shop.example"
    assert by_id["direct"]["x-forwarded-proto"] == "http"
    for headers in by_id.values():
        assert headers["host"] == f"127.0.0.1:{upstream.port}"
        assert "user-agent" not in headers


async def test_no_user_agent_or_accept_of_the_proxys_own_on_any_route(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    quiet = {"skip_auto_headers": ["User-Agent", "Accept"], "headers": {"X-Write-Key": KEY}}
    single = await proxy.post("/api/s/track", json={"event": "e", "messageId": "s"}, **quiet)
    batch = await proxy.post(
        "/v1/batch", json={"batch": [{"type": "track", "event": "e", "messageId": "b"}]}, **quiet
    )
    pixel = await proxy.get("/api/px/track", params={"event": "e", "messageId": "x"}, **quiet)
    assert (single.status, batch.status, pixel.status) == (200, 200, 200)
    await upstream.wait_delivered(3)
    for got in upstream.delivered:
        assert "user-agent" not in received(got), got.path
        assert "accept" not in received(got), got.path


async def test_a_gzip_batch_goes_up_inflated_without_content_encoding(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    body = json.dumps({"batch": [{"type": "track", "event": "z", "messageId": "gz"}]})
    resp = await proxy.post(
        "/v1/batch",
        data=gzip.compress(body.encode()),
        headers={
            "X-Write-Key": KEY,
            "Content-Type": "text/plain",
            "Content-Encoding": "gzip",
            "X-Batch-Tag": "t1",
        },
        skip_auto_headers=["User-Agent", "Accept"],
    )
    assert (await resp.json())["okEvents"] == 1
    (got,) = await upstream.wait_delivered(1)
    assert got.json()["batch"][0]["messageId"] == "gz"
    assert received(got) == {
        "host": f"127.0.0.1:{upstream.port}",
        "content-type": "text/plain",
        "content-length": str(len(got.body)),
        "accept-encoding": "gzip, deflate",  # the test client's own
        "x-write-key": KEY,
        "x-real-ip": "127.0.0.1",
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-host": f"127.0.0.1:{proxy.server.port}",
        "x-forwarded-proto": "http",
        "x-batch-tag": "t1",
    }


async def test_pixel_forwards_the_same_headers_and_only_jitsus_cookies(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(server={"trusted_proxies": []})
    headers = browser_headers()
    del headers["Authorization"]
    resp = await proxy.get("/api/px/track", params={"writekey": KEY, "event": "o"}, headers=headers)
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    sent = received(got)
    assert sent.pop("cookie") == "__eventn_id=v1"
    assert "content-type" not in sent and "content-length" not in sent
    assert {k: v for k, v in sent.items() if k in PASSED} == PASSED
    assert sent["x-forwarded-host"] == "shop.example:8443"


async def test_preserve_host_sends_the_clients_host_and_keeps_it_in_the_row(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """The Host is part of the stored request: a row sent after a restart carries it too, even
    when the proxy now runs without preserve_host."""
    await upstream.stop()
    proxy = await make_proxy(upstream={"preserve_host": True})
    for mid, extra in (
        ("direct", {"Host": "shop.example:8443"}),
        ("via-cdn", {"Host": "origin.internal", "X-Forwarded-Host": "custom.shop.example"}),
    ):
        resp = await proxy.post(
            "/api/s/track",
            headers={"X-Write-Key": KEY, **extra},
            json={"event": "e", "messageId": mid},
        )
        assert resp.status == 200
    assert proxy.server.app[APP_STATE].buffer.rows == 2  # type: ignore[union-attr]
    await proxy.close()
    await upstream.start()
    await make_proxy()
    await upstream.wait_for(lambda f: {"direct", "via-cdn"} <= f.delivered_set)
    by_id = {r.message_ids[0]: received(r) for r in upstream.delivered}
    assert by_id["direct"]["host"] == "shop.example:8443"
    assert by_id["direct"]["x-forwarded-host"] == "shop.example:8443"
    # From a trusted proxy (loopback, by default): the Host the client asked that proxy for.
    assert by_id["via-cdn"]["host"] == "custom.shop.example"


async def test_preserve_host_off_sends_upstreams_host(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.post(
        "/api/s/track",
        headers={"X-Write-Key": KEY, "Host": "shop.example"},
        json={"event": "e"},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert received(got)["host"] == f"127.0.0.1:{upstream.port}"
    assert received(got)["x-forwarded-host"] == "shop.example"


async def test_drop_headers_removes_more(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(
        upstream={"drop_headers": ["x-jitsu-custom", "Referer", "X-Forwarded-Host", "COOKIE"]}
    )
    headers = {
        "X-Write-Key": KEY,
        "X-Jitsu-Custom": "x",
        "Referer": "https://shop.example/",
        "Cookie": "__eventn_id=v1",
        "X-Kept": "k",
    }
    single = await proxy.post("/api/s/track", headers=headers, json={"event": "e"})
    pixel = await proxy.get("/api/px/track", params={"event": "o"}, headers=headers)
    assert (single.status, pixel.status) == (200, 200)
    await upstream.wait_delivered(2)
    for got in upstream.delivered:
        sent = received(got)
        assert sent["x-kept"] == "k"
        assert sent["x-forwarded-proto"] == "http"
        for name in ("x-jitsu-custom", "referer", "x-forwarded-host", "cookie"):
            assert name not in sent, (got.method, name)


async def raw_request(port: int, head: bytes, body: bytes) -> int:
    """One request as raw bytes (invalid UTF-8 that aiohttp's client would not send)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        length = b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        writer.write(head + length + body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("preserve_host", [False, True])
async def test_invalid_utf8_becomes_replacement_and_a_malformed_host_is_refused(
    make_proxy: Any, upstream: FakeJitsu, preserve_host: bool
) -> None:
    proxy = await make_proxy(upstream={"preserve_host": preserve_host})
    head = (
        b"POST /api/s/s2s/track HTTP/1.1\r\nHost: sh\xffop.example\r\nX-Write-Key: "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nX-Note: caf\xc3\xa9 \xff\xfe\r\n"
    )
    status = await raw_request(proxy.server.port, head, b'{"event":"x","messageId":"u"}')
    if preserve_host:
        # Jitsu's server refuses such a Host (400); sent upstream, the row could never go.
        assert status == 400
        assert proxy.server.app[APP_STATE].buffer.rows == 0
        return
    assert status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.headers["X-Note"] == "café \ufffd\ufffd"
    assert got.headers["X-Forwarded-Host"] == "sh\ufffdop.example"


async def test_headers_jitsus_server_would_refuse_as_too_large_get_its_431(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Go reads at most 1 MiB of header lines; past the proxy's default limits (100 lines of
    8190 bytes) no request gets there, past raised ones it is refused as Jitsu refuses it."""
    proxy = await make_proxy(
        server={"max_headers": 200, "max_header_bytes": 16_000},
        upstream={"max_header_bytes": 4 << 20},  # an ingress that takes anything
    )
    headers = {f"X-Pad-{i}": "p" * 15_000 for i in range(75)}
    resp = await proxy.post(
        "/api/s/s2s/track", headers={"X-Write-Key": KEY, **headers}, json={"event": "e"}
    )
    assert resp.status == 431
    assert (await resp.json())["error"].startswith("request header fields too large")
    assert proxy.server.app[APP_STATE].buffer.rows == 0
    fits = {f"X-Pad-{i}": "p" * 8000 for i in range(100)}
    ok = await proxy.post(
        "/api/s/s2s/track", headers={"X-Write-Key": KEY, **fits}, json={"event": "e"}
    )
    assert ok.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.headers["X-Pad-99"] == "p" * 8000


async def test_large_headers_are_not_stored_once_per_batch_piece(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """A batch is split into pieces of upstream.max_batch_bytes, and every piece is stored with
    the request's headers: with headers that large, the batch goes whole instead."""
    await upstream.stop()
    proxy = await make_proxy(upstream={"max_batch_bytes": 4096})
    batch = {"batch": [{"type": "track", "event": "e", "messageId": f"m{i}"} for i in range(200)]}
    small = await proxy.post("/v1/batch", headers={"X-Write-Key": KEY}, json=batch)
    assert (await small.json())["okEvents"] == 200
    buf = proxy.server.app[APP_STATE].buffer  # type: ignore[union-attr]
    pieces = buf.rows
    assert pieces > 1
    padded = {"X-Write-Key": KEY, **{f"X-Pad-{i}": "p" * 1000 for i in range(8)}}
    large = await proxy.post("/v1/batch", headers=padded, json=batch)
    assert (await large.json())["okEvents"] == 200
    assert buf.rows == pieces + 1


# ---- forward_headers, without a server ---------------------------------------------------


def test_readable_codings_only() -> None:
    assert readable_codings("gzip, deflate, br, zstd") == "gzip, deflate"
    assert readable_codings("br;q=1.0, gzip;q=0.8, *;q=0.1") == "gzip;q=0.8"
    assert readable_codings("zstd") == ""
    assert "Accept-Encoding" not in forward_headers({"Accept-Encoding": "br"}, None, "")


def test_exact_set_from_an_untrusted_client() -> None:
    origin = ClientOrigin("shop.example:8443", "http")
    headers = forward_headers(browser_headers(), WRITE_KEY, "203.0.113.7", "keep", origin)
    assert headers == {
        "Content-Type": "application/json",
        "X-Write-Key": KEY,
        "X-Real-IP": "203.0.113.7",
        "X-Forwarded-For": "203.0.113.7",
        "Accept-Encoding": "gzip, deflate",  # sent: gzip, deflate, br, zstd
        "Accept": "application/json,text/plain",
        "X-Multi": "a,b",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) test",
        "Accept-Language": "de-DE,de;q=0.9",
        "Origin": "https://shop.example",
        "Referer": "https://shop.example/cart",
        "X-Jitsu-Custom": '{"plan":"pro"}',
        "X-Vercel-Id": "fra1::abc",
        "Cache-Control": "no-cache",
        "X-Empty": "",
        "X-Forwarded-Host": "shop.example:8443",
        "X-Forwarded-Proto": "http",
    }


def test_the_key_goes_in_x_write_key_only() -> None:
    headers = forward_headers(browser_headers(), WRITE_KEY, "203.0.113.7")
    assert [name for name, value in headers.items() if "hdrSecretValue42" in value] == [
        "X-Write-Key"
    ]
    assert forward_headers(CIMultiDict({"X-Write-Key": "a:b"}), None, "") == {
        "Content-Type": "application/json"
    }


@pytest.mark.parametrize(
    "name",
    ["Content-Length", "Content-Encoding", "Transfer-Encoding", "Expect", "Upgrade", "Trailer"],
)
def test_headers_about_the_clients_body_and_connection_stay_behind(name: str) -> None:
    headers = forward_headers(CIMultiDict({name: "x", "X-Kept": "k"}), None, "")
    assert headers == {"Content-Type": "application/json", "X-Kept": "k"}


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ("application/json", "application/json"),
        ("text/plain;charset=UTF-8", "text/plain;charset=UTF-8"),
        ("application/json; charset=utf-8", "application/json; charset=utf-8"),
        # Jitsu's check is case-sensitive where the proxy's is not: Jitsu would refuse it.
        ("TEXT/PLAIN", "application/json"),
        # The body sent is UTF-8, whatever the client's was.
        ("application/json; charset=utf-16", "application/json"),
        (None, "application/json"),
    ],
)
def test_content_type_is_the_clients_while_it_describes_the_body(
    sent: str | None, forwarded: str
) -> None:
    request = CIMultiDict({"Content-Type": sent} if sent is not None else {})
    assert forward_headers(request, None, "")["Content-Type"] == forwarded


def test_repeats_join_whatever_their_case() -> None:
    request = CIMultiDict([("X-Multi", "a"), ("x-multi", "b"), ("X-MULTI", "c")])
    assert forward_headers(request, None, "") == {
        "Content-Type": "application/json",
        "X-Multi": "a,b,c",
    }


def test_ip_policy_remove_overrides_the_clients_x_ip_policy() -> None:
    headers = forward_headers(CIMultiDict({"x-ip-policy": "keep"}), None, "", "remove")
    assert headers == {"Content-Type": "application/json", "X-IP-Policy": "remove"}


def test_preserve_host_needs_a_host_jitsus_server_takes() -> None:
    origin = ClientOrigin("shop.example:8443", "https")
    headers = forward_headers(CIMultiDict(), None, "", origin=origin, preserve_host=True)
    assert headers["Host"] == "shop.example:8443"
    assert headers["X-Forwarded-Proto"] == "https"
    with pytest.raises(IngestError) as refused:
        forward_headers(
            CIMultiDict(), None, "", origin=ClientOrigin("a/b", "http"), preserve_host=True
        )
    assert refused.value.status == 400
    bare = forward_headers(CIMultiDict(), None, "", origin=ClientOrigin("", "http"))
    assert "X-Forwarded-Host" not in bare and "Host" not in bare


@pytest.mark.parametrize(
    "name",
    [
        "X-Client-IP",
        "Client-IP",
        "X-Cluster-Client-IP",
        "Fastly-Client-IP",
        "X-Original-Forwarded-For",
        "X-Envoy-External-Address",
        "X-Azure-ClientIP",
        "CloudFront-Viewer-Address",
        "X-Vercel-Forwarded-For",
        "X-Appengine-User-IP",
        "X-ProxyUser-Ip",
        "X-Remote-Addr",
    ],
)
def test_no_header_naming_the_raw_client_address_goes_upstream(name: str) -> None:
    """Only the resolved, anonymised IP goes upstream (privacy.ip_policy); load balancers and
    CDNs put the raw one in many more headers than X-Real-IP (attack pass, F4)."""
    headers = forward_headers(
        {name: "203.0.113.77", "X-Clientele": "kept"}, WRITE_KEY, "", "remove"
    )
    assert name not in headers
    assert "203.0.113.77" not in json.dumps(headers)
    assert headers["X-Clientele"] == "kept"


@pytest.mark.parametrize(
    ("headers", "query", "status"),
    [
        ({f"X-Pad-{i}": "p" * 4000 for i in range(10)}, "", 431),
        # Raw ^ | < > go upstream percent-encoded: 2.8 KB grow to 8.4 KB.
        ({}, "q=" + "^|<>" * 700, 414),
    ],
)
async def test_what_no_ingress_would_pass_on_is_refused_at_the_edge(
    proxy: Any, upstream: FakeJitsu, headers: dict[str, str], query: str, status: int
) -> None:
    """An nginx in front of Jitsu answers 400 / 414 with an HTML page to a request over 32 KB
    of headers or 8 KB of request line; kept, such rows failed for ever and, all at once,
    stalled everyone's delivery (second attack pass). upstream.max_header_bytes and
    max_url_bytes refuse them before anything is stored."""
    url = URL(str(proxy.make_url("/api/s/s2s/track")) + "?" + query, encoded=True)
    resp = await proxy.session.post(
        url, json={"event": "e"}, headers={"X-Write-Key": KEY, **headers}
    )
    assert resp.status == status
    assert proxy.server.app[APP_STATE].buffer.rows == 0 and upstream.received == []
