"""Not an open door: the write-key allowlist and the per-IP / per-key rate limits."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.ratelimit import TokenBuckets
from tests.fakejitsu import FakeJitsu

ALLOWED = "goodKeyId:goodSecretValue"
UNKNOWN = "strangerId:strangerSecretValue"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_waits_for_refill() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0, "buckets are per key"
    clock.now += 0.5
    assert buckets.take("a") == 0
    assert buckets.take("a") == pytest.approx(0.5)


def test_token_bucket_off_and_bounded() -> None:
    assert TokenBuckets(rate=0, burst=0).take("x") == 0
    buckets = TokenBuckets(rate=1, burst=1, max_buckets=10, clock=Clock())
    for i in range(50):
        buckets.take(f"ip{i}")
    assert len(buckets) == 10


@pytest.mark.parametrize(("path", "status"), [("/api/s/track", 200), ("/api/s/s2s/track", 401)])
async def test_unknown_key_is_answered_like_jitsu_and_never_forwarded(
    make_proxy: Any, upstream: FakeJitsu, path: str, status: int
) -> None:
    proxy = await make_proxy(security={"allowed_key_ids": ["goodKeyId"]})
    resp = await proxy.post(path, headers={"X-Write-Key": UNKNOWN}, json={"event": "x"})
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error.startswith("stream not found")
    assert "strangerSecretValue" not in error
    no_key = await proxy.post(path, json={"event": "x"})
    assert no_key.status == status
    good = await proxy.post(
        path, headers={"X-Write-Key": ALLOWED}, json={"event": "x", "messageId": "ok"}
    )
    assert good.status == 200 and await good.json() == {"ok": True}
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["ok"]


async def test_unknown_key_in_batch_body_is_401(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(security={"allowed_key_ids": ["goodKeyId"]})
    resp = await proxy.post(
        "/v1/batch", json={"writeKey": UNKNOWN, "batch": [{"type": "track", "event": "x"}]}
    )
    assert resp.status == 401
    text = await (await proxy.get("/metrics")).text()
    assert 'proxy_events_refused_total{reason="unknown_key"} 1.0' in text
    assert upstream.received == []


async def test_per_ip_rate_limit(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(
        server={"trusted_proxies": ["127.0.0.0/8"]},
        security={"rate_limit": {"per_ip_rps": 0.01, "per_ip_burst": 3}},
    )

    async def post(ip: str) -> Any:
        return await proxy.post(
            "/api/s/track",
            headers={"X-Write-Key": ALLOWED, "X-Forwarded-For": ip},
            json={"event": "x"},
        )

    statuses = [(await post("203.0.113.1")).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    limited = await post("203.0.113.1")
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert "rate limit" in (await limited.json())["error"]
    assert (await post("203.0.113.2")).status == 200, "another client has its own bucket"
    await upstream.wait_delivered(4)
    assert len(upstream.received) == 4


async def test_per_key_rate_limit(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(security={"rate_limit": {"per_key_rps": 0.01, "per_key_burst": 2}})
    for expected in (200, 200, 429):
        resp = await proxy.post(
            "/v1/batch",
            headers={"X-Write-Key": ALLOWED},
            json={"batch": [{"type": "track", "event": "x"}]},
        )
        assert resp.status == expected
    other = await proxy.post(
        "/api/s/s2s/track", headers={"X-Write-Key": UNKNOWN}, json={"event": "x"}
    )
    assert other.status == 200
    await upstream.wait_delivered(3)
