"""Bad input gets a clear JSON error, loses nothing else, and never reaches upstream."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.fakejitsu import FakeJitsu

KEY = "kid:sec"
GOOD = {"type": "track", "event": "after", "messageId": "good-after-bad"}


async def assert_still_serving(proxy: TestClient[Any, Any], upstream: FakeJitsu) -> None:
    """Nothing of the bad request was forwarded, and the next good event goes through."""
    assert upstream.received == []
    resp = await proxy.post("/api/s/track", headers={"X-Write-Key": KEY}, json=GOOD)
    assert resp.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["good-after-bad"]


@pytest.mark.parametrize(
    ("path", "status"),
    [("/api/s/track", 200), ("/api/s/s2s/track", 400), ("/v1/batch", 400)],
)
async def test_malformed_json(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str, status: int
) -> None:
    resp = await proxy.post(
        path,
        data=b'{"type": "track", "event": ',
        headers={"X-Write-Key": KEY, "Content-Type": "application/json"},
    )
    # Jitsu's browser routes answer 200 with the error; s2s and batch answer 400.
    assert resp.status == status
    body = await resp.json()
    assert body["error"].startswith("error parsing message:")
    await assert_still_serving(proxy, upstream)


@pytest.mark.parametrize("path", ["/api/s/track", "/api/s/s2s/track", "/v1/batch"])
@pytest.mark.parametrize("content_type", ["text/html", "application/x-www-form-urlencoded", ""])
async def test_wrong_content_type(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str, content_type: str
) -> None:
    resp = await proxy.post(
        path,
        data=json.dumps({"type": "track", "event": "x"}).encode(),
        headers={"X-Write-Key": KEY, "Content-Type": content_type},
        skip_auto_headers=["Content-Type"] if not content_type else [],
    )
    assert resp.status == 400
    assert (await resp.json())["error"].startswith("invalid content type:")
    await assert_still_serving(proxy, upstream)


@pytest.mark.parametrize("path", ["/api/s/track", "/v1/batch"])
async def test_oversized_body_is_413(make_proxy: Any, upstream: FakeJitsu, path: str) -> None:
    proxy = await make_proxy(limits={"max_request_bytes": 10_000})
    big = {"type": "track", "event": "x", "properties": {"blob": "x" * 20_000}}
    payload = {"batch": [big]} if path == "/v1/batch" else big
    resp = await proxy.post(path, json=payload, headers={"X-Write-Key": KEY})
    assert resp.status == 413
    assert "too large" in (await resp.json())["error"]
    await assert_still_serving(proxy, upstream)


async def test_oversized_body_without_content_length_is_413(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(limits={"max_request_bytes": 10_000})

    async def chunks() -> Any:
        for _ in range(30):
            yield b"x" * 1000

    resp = await proxy.post(
        "/api/s/s2s/track",
        data=chunks(),
        headers={"X-Write-Key": KEY, "Content-Type": "application/json"},
    )
    assert resp.status == 413
    await assert_still_serving(proxy, upstream)


async def test_oversized_single_event_is_refused(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(limits={"max_event_bytes": 1000})
    resp = await proxy.post(
        "/api/s/s2s/track",
        json={"type": "track", "event": "x", "properties": {"blob": "x" * 2000}},
        headers={"X-Write-Key": KEY},
    )
    assert resp.status == 400
    assert "message size" in (await resp.json())["error"]
    await assert_still_serving(proxy, upstream)


@pytest.mark.parametrize(
    ("path", "status"),
    [("/api/s/page", 200), ("/api/s/s2s/page", 400), ("/v1/batch", 400)],
)
@pytest.mark.parametrize("authorization", ["Basic !!!notbase64", "Bearer xyz", "Basic //8="])
async def test_invalid_basic_auth(
    proxy: TestClient[Any, Any],
    upstream: FakeJitsu,
    path: str,
    status: int,
    authorization: str,
) -> None:
    payload: Any = {"type": "page"}
    if path == "/v1/batch":
        payload = {"batch": [payload]}
    resp = await proxy.post(
        path, json=payload, headers={"Authorization": authorization, "X-Write-Key": KEY}
    )
    assert resp.status == status
    assert "failed to decode writeKey from Authorization header" in (await resp.json())["error"]
    await assert_still_serving(proxy, upstream)


@pytest.mark.parametrize(
    "payload",
    [
        {"batch": {"type": "track"}},
        {"batch": "nope"},
        {"nobatch": []},
        [{"type": "track"}],
        {"batch": [], "context": "x"},
    ],
)
async def test_non_list_batch(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, payload: Any
) -> None:
    resp = await proxy.post("/v1/batch", json=payload, headers={"X-Write-Key": KEY})
    assert resp.status == 400
    assert (await resp.json())["error"].startswith("error parsing message:")
    await assert_still_serving(proxy, upstream)


async def test_gzip_bomb_is_refused(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(limits={"max_decompressed_bytes": 1_000_000})
    # ~100 KB on the wire, 100 MB inflated.
    bomb = gzip.compress(b'{"batch":[' + b" " * 100_000_000 + b"]}", compresslevel=9)
    assert len(bomb) < 200_000
    resp = await proxy.post(
        "/v1/batch",
        data=bomb,
        headers={
            "X-Write-Key": KEY,
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    assert resp.status == 413
    assert "after decompression" in (await resp.json())["error"]
    await assert_still_serving(proxy, upstream)


async def test_corrupt_gzip_is_400(proxy: TestClient[Any, Any], upstream: FakeJitsu) -> None:
    resp = await proxy.post(
        "/v1/batch",
        data=b"\x1f\x8b\x08\x00garbage",
        headers={
            "X-Write-Key": KEY,
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    assert resp.status == 400
    assert "gzip" in (await resp.json())["error"]
    await assert_still_serving(proxy, upstream)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"type": "track"}, "'event' property is required"),
        ({"type": "track", "event": "x" * 129}, "Max length is 128 characters"),
        ([1, 2], "must be a JSON object"),
        ("just a string", "must be a JSON object"),
    ],
)
async def test_invalid_events_on_the_event_route(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, body: Any, error: str
) -> None:
    resp = await proxy.post("/api/s/s2s/event", json=body, headers={"X-Write-Key": KEY})
    assert resp.status == 400
    assert error in (await resp.json())["error"]
    await assert_still_serving(proxy, upstream)


async def test_deeply_nested_json_is_refused_not_crashed(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    nested = b'{"type":"track","event":"x","p":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = await proxy.post(
        "/api/s/s2s/track",
        data=nested,
        headers={"X-Write-Key": KEY, "Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert "error parsing message" in (await resp.json())["error"]
    await assert_still_serving(proxy, upstream)


async def test_unknown_paths_and_methods_answer_json(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    for method, path, status in [
        ("GET", "/debug/pprof/", 404),
        ("GET", "/api/s/track", 405),
        ("PUT", "/v1/batch", 405),
    ]:
        resp = await proxy.request(method, path)
        assert resp.status == status
        assert "error" in await resp.json()
    await assert_still_serving(proxy, upstream)
