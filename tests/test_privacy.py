"""Client IP through CDNs and edge anonymisation, checked on what upstream and the disk get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.buffer import DB_NAME
from proxy.clientip import anonymize, parse_networks, resolve_client_ip
from tests.fakejitsu import FakeJitsu

KEY = "kid:sec"
LOOPBACK = parse_networks(["127.0.0.0/8"])


@pytest.mark.parametrize(
    ("ip", "policy", "expected"),
    [
        ("198.51.100.77", "keep", "198.51.100.77"),
        ("198.51.100.77", "stripLastOctet", "198.51.100.0"),
        ("2001:db8:abcd:12:1:2:3:4", "stripLastOctet", "2001:db8:abcd::"),
        ("198.51.100.77", "remove", ""),
        ("not-an-ip", "stripLastOctet", ""),
    ],
)
def test_anonymize(ip: str, policy: str, expected: str) -> None:
    assert anonymize(ip, policy) == expected


@pytest.mark.parametrize(
    ("headers", "believe", "expected"),
    [
        ({"CF-Connecting-IP": "203.0.113.5"}, ["CF-Connecting-IP"], "203.0.113.5"),
        # Not named in `believe`: a CDN header from a trusted nginx could be the client's own.
        ({"CF-Connecting-IP": "203.0.113.5"}, ["X-Forwarded-For"], "127.0.0.1"),
        ({"True-Client-IP": "203.0.113.6"}, ["True-Client-IP", "X-Real-IP"], "203.0.113.6"),
        (
            {"Forwarded": 'for=198.51.100.1, for="[2001:db8::7]:4711";proto=https'},
            ["Forwarded"],
            "2001:db8::7",
        ),
        ({"Forwarded": "for=unknown"}, ["Forwarded", "X-Real-IP"], "127.0.0.1"),
        (
            {"CF-Connecting-IP": "garbage", "X-Forwarded-For": "203.0.113.9"},
            ["CF-Connecting-IP", "X-Forwarded-For"],
            "203.0.113.9",
        ),
    ],
)
def test_cdn_headers_are_opt_in(headers: dict[str, str], believe: list[str], expected: str) -> None:
    assert resolve_client_ip("127.0.0.1", headers, LOOPBACK, believe) == expected


def test_cdn_header_from_an_untrusted_peer_is_ignored() -> None:
    got = resolve_client_ip(
        "192.0.2.50", {"CF-Connecting-IP": "6.6.6.6"}, LOOPBACK, ["CF-Connecting-IP"]
    )
    assert got == "192.0.2.50"


async def test_cloudflare_client_ip_reaches_upstream(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(
        server={"trusted_proxies": ["127.0.0.0/8"], "client_ip_headers": ["CF-Connecting-IP"]}
    )
    resp = await proxy.post(
        "/api/s/page",
        headers={
            "X-Write-Key": KEY,
            "CF-Connecting-IP": "203.0.113.44",
            "X-Forwarded-For": "6.6.6.6",
        },
        json={"type": "page"},
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.headers["X-Real-IP"] == "203.0.113.44"
    assert got.headers.getall("X-Forwarded-For") == ["203.0.113.44"]


async def test_strip_last_octet_happens_before_the_disk(
    make_proxy: Any, upstream: FakeJitsu, tmp_path: Path
) -> None:
    await upstream.stop()
    proxy = await make_proxy(
        server={"trusted_proxies": ["127.0.0.0/8"]}, privacy={"ip_policy": "stripLastOctet"}
    )
    resp = await proxy.post(
        "/api/s/track",
        headers={"X-Write-Key": KEY, "X-Forwarded-For": "198.51.100.77"},
        json={"event": "e"},
    )
    assert resp.status == 200
    stored = (tmp_path / "buffer" / DB_NAME).read_bytes()
    wal = tmp_path / "buffer" / (DB_NAME + "-wal")
    if wal.exists():
        stored += wal.read_bytes()
    assert b"198.51.100.77" not in stored
    assert b"198.51.100.0" in stored
    await upstream.start()
    (got,) = await upstream.wait_delivered(1)
    assert got.headers["X-Real-IP"] == "198.51.100.0"


async def test_remove_policy_sends_no_ip_and_tells_jitsu(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(privacy={"ip_policy": "remove"})
    resp = await proxy.post(
        "/api/s/track", headers={"X-Write-Key": KEY, "X-IP-Policy": "keep"}, json={"event": "e"}
    )
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert "X-Real-IP" not in got.headers and "X-Forwarded-For" not in got.headers
    assert got.headers["X-IP-Policy"] == "remove"


async def test_first_party_host_carries_a_fallback_key(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(routes={"host_keys": {"Data.Shop.Example": "hostKeyId:hostSecret"}})
    r1 = await proxy.post(
        "/api/s/page",
        headers={"Host": "data.shop.example:8443"},
        json={"type": "page", "messageId": "h1"},
    )
    r2 = await proxy.post(
        "/api/s/page",
        headers={"Host": "data.shop.example", "X-Write-Key": KEY},
        json={"type": "page", "messageId": "h2"},
    )
    r3 = await proxy.post(
        "/api/s/s2s/track", headers={"Host": "other.example"}, json={"event": "x"}
    )
    assert (r1.status, r2.status, r3.status) == (200, 200, 401)
    got = {r.message_ids[0]: r for r in await upstream.wait_delivered(2)}
    assert got["h1"].headers["X-Write-Key"] == "hostKeyId:hostSecret"
    assert got["h2"].headers["X-Write-Key"] == KEY, "a key in the request wins"


def test_host_keys_from_the_environment() -> None:
    from proxy.config import build_config

    config = build_config({}, {"PROXY_ROUTES_HOST_KEYS": "a.example=k1:s1, B.example=k2:s2"})
    assert config.routes.host_keys == {"a.example": "k1:s1", "b.example": "k2:s2"}
