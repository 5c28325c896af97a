"""What a shared cache or a stranger gets from the proxy (issue 7, finding 11): `Vary: Origin`
on every answer whose headers depend on the Origin, the admin endpoints kept off the public
port, and no filesystem paths in any answer."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy import ops
from proxy.buffer import DB_NAME
from tests.conftest import ProxyFactory
from tests.fakejitsu import FakeJitsu
from tests.procs import ProxyProcess, free_port

KEY = "expKeyId:expSecret"
ORIGIN = "https://shop.example"


def vary(resp: Any) -> list[str]:
    return [t.strip().lower() for v in resp.headers.getall("Vary", []) for t in v.split(",")]


# Every kind of public route; each echoes an Origin in Access-Control-Allow-Origin.
PUBLIC_REQUESTS = [
    ("POST", "/api/s/track", {"headers": {"X-Write-Key": KEY}, "json": {"event": "e"}}),
    ("POST", "/api/s/s2s/track", {"json": {"event": "e"}}),  # 401: errors vary too
    ("POST", "/v1/batch", {"headers": {"X-Write-Key": KEY}, "json": {"batch": []}}),
    ("GET", "/p.js", {}),
    ("HEAD", "/p.js", {}),
    ("GET", "/api/px/track", {"params": {"writekey": KEY, "event": "e"}}),
    ("GET", "/api/id", {}),
    ("GET", "/v1/projects/segKey/settings", {}),
    ("OPTIONS", "/api/s/track", {"headers": {"Access-Control-Request-Method": "POST"}}),
    ("OPTIONS", "/p.js", {}),
]


@pytest.mark.parametrize("with_origin", [True, False], ids=["origin", "no-origin"])
@pytest.mark.parametrize(
    ("method", "path", "kw"), PUBLIC_REQUESTS, ids=[f"{m} {p}" for m, p, _ in PUBLIC_REQUESTS]
)
async def test_answers_that_depend_on_origin_vary_on_it(
    proxy: TestClient[Any, Any],
    upstream: FakeJitsu,
    method: str,
    path: str,
    kw: dict[str, Any],
    with_origin: bool,
) -> None:
    """A cache that ignored Origin would hand one site's CORS answer to another, or an answer
    without CORS headers (asked without Origin) to a browser that needs them."""
    headers = {**kw.get("headers", {}), **({"Origin": ORIGIN} if with_origin else {})}
    resp = await proxy.request(method, path, **{**kw, "headers": headers})
    assert resp.status < 500
    allow_origin = resp.headers.getall("Access-Control-Allow-Origin", [])
    if with_origin:
        assert allow_origin == [ORIGIN], "the answer does depend on the Origin"
    assert vary(resp).count("origin") == 1


async def test_script_varies_on_encoding_and_origin_also_when_not_modified(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    full = await proxy.get("/p.js", headers={"Origin": ORIGIN, "Accept-Encoding": "gzip"})
    assert full.status == 200 and full.headers["Cache-Control"].startswith("public")
    assert sorted(vary(full)) == ["accept-encoding", "origin"]
    again = await proxy.get("/p.js", headers={"If-None-Match": full.headers["ETag"]})
    assert again.status == 304
    assert sorted(vary(again)) == ["accept-encoding", "origin"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_own_endpoints_do_not_vary_on_origin(proxy: TestClient[Any, Any], path: str) -> None:
    resp = await proxy.get(path, headers={"Origin": ORIGIN})
    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "origin" not in vary(resp)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
async def test_readyz_shows_paths_relative_to_the_buffer_directory(
    make_proxy: ProxyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: bool
) -> None:
    buffer_dir = tmp_path / "buffer"
    buffer_dir.mkdir()
    (buffer_dir / DB_NAME).write_bytes(b"this is not sqlite at all" * 100)
    if relative:
        monkeypatch.chdir(tmp_path)
    proxy = await make_proxy(buffer={"path": "./buffer" if relative else str(buffer_dir)})
    resp = await proxy.get("/readyz")
    text = await resp.text()
    assert str(tmp_path) not in text
    body = json.loads(text)
    assert resp.status == 200 and body["status"] == "warn"
    (moved,) = body["buffer"]["quarantined"]
    assert moved["path"].startswith("quarantine/buffer.corrupt-")
    assert (buffer_dir / moved["path"] / DB_NAME).is_file(), "the path shown is where it is"


def test_error_texts_name_buffer_files_relative_to_the_buffer_directory(tmp_path: Path) -> None:
    buffer_dir = tmp_path / "buffer"
    text = f"[Errno 28] No space left on device: '{buffer_dir}/buffer.db-wal' in {buffer_dir}"
    assert ops.relative_to_buffer(text, buffer_dir) == (
        "[Errno 28] No space left on device: 'buffer.db-wal' in ."
    )
    sibling = f"{buffer_dir}2/x"
    assert ops.relative_to_buffer(sibling, buffer_dir) == sibling


async def assert_not_found(resp: Any) -> None:
    """What an unknown path answers: a stranger cannot tell the endpoint is there."""
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert await resp.json() == {"error": "not found"}


@pytest.mark.parametrize(
    ("server", "forwarded_for", "allowed"),
    [
        ({}, None, True),
        ({"admin_allow": ["10.0.0.0/8"]}, None, False),
        ({"admin_allow": ["10.0.0.0/8", "127.0.0.0/8"]}, None, True),
        # The client as resolved through trusted_proxies: a trusted load balancer vouches...
        ({"admin_allow": ["10.0.0.0/8"]}, "10.1.2.3", True),
        # ...anyone else's X-Forwarded-For is not believed.
        ({"admin_allow": ["10.0.0.0/8"], "trusted_proxies": []}, "10.1.2.3", False),
    ],
    ids=["default-anyone", "stranger", "allowed", "via-trusted-proxy", "spoofed"],
)
async def test_admin_allow_keeps_metrics_and_readyz_from_strangers(
    make_proxy: ProxyFactory,
    upstream: FakeJitsu,
    server: dict[str, Any],
    forwarded_for: str | None,
    allowed: bool,
) -> None:
    proxy = await make_proxy(server=server)
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    metrics = await proxy.get("/metrics", headers=headers)
    ready = await proxy.get("/readyz", headers=headers)
    if allowed:
        assert metrics.status == 200 and "proxy_buffer_rows" in await metrics.text()
        assert ready.status == 200 and (await ready.json())["status"] == "pass"
    else:
        await assert_not_found(metrics)
        await assert_not_found(ready)
    assert (await proxy.get("/healthz", headers=headers)).status == 200
    sent = await proxy.post("/api/s/track", headers={"X-Write-Key": KEY}, json={"event": "e"})
    assert sent.status == 200, "ingest is not the admin endpoints' business"


async def test_admin_port_takes_metrics_and_readyz_off_the_public_port(
    make_proxy: ProxyFactory, upstream: FakeJitsu
) -> None:
    # Allowed by admin_allow, but with an admin listener the public port has none of them.
    proxy = await make_proxy(server={"admin_port": free_port(), "admin_allow": ["127.0.0.0/8"]})
    await assert_not_found(await proxy.get("/metrics"))
    await assert_not_found(await proxy.get("/readyz"))
    assert (await proxy.get("/healthz")).status == 200


@pytest.mark.timeout(60)
async def test_process_serves_admin_endpoints_on_their_own_listener_and_drains(
    tmp_path: Path, upstream: FakeJitsu
) -> None:
    proxy = ProxyProcess(tmp_path, upstream.url, server={"admin_port": free_port()})
    proxy.start()
    try:
        await proxy.wait_ready()  # /readyz on the admin listener
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proxy.admin_url}/metrics") as r:
                assert r.status == 200 and "proxy_buffer_rows" in await r.text()
            async with s.get(f"{proxy.admin_url}/healthz") as r:
                assert r.status == 200
            for path in ("/metrics", "/readyz"):
                async with s.get(f"{proxy.url}{path}") as r:
                    await assert_not_found(r)
            async with s.get(f"{proxy.url}/healthz") as r:
                assert r.status == 200 and await r.json() == {"status": "pass"}
            # The admin listener is not a second door for events.
            for base, status in ((proxy.admin_url, 404), (proxy.url, 200)):
                async with s.post(
                    f"{base}/api/s/track",
                    headers={"X-Write-Key": KEY},
                    json={"event": "e", "messageId": f"via-{status}"},
                ) as r:
                    assert r.status == status
        await upstream.wait_delivered(1)
        assert upstream.delivered_ids() == ["via-200"]
        assert await proxy.terminate_async() == 0
        events = [line.get("event") for line in proxy.log_lines()]
        assert "proxy_stopped" in events
        (starting,) = [x for x in proxy.log_lines() if x.get("event") == "proxy_starting"]
        assert starting["admin"] == f"127.0.0.1:{proxy.admin_port}"
    finally:
        proxy.stop()


@pytest.mark.timeout(30)
def test_process_with_a_taken_admin_port_exits_1_saying_so(
    tmp_path: Path, upstream: FakeJitsu
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proxy = ProxyProcess(tmp_path, upstream.url, server={"admin_port": port})
        proxy.start()
        try:
            assert proxy.proc is not None and proxy.proc.wait(15) == 1
        finally:
            proxy.stop()
    (line,) = [x for x in proxy.log_lines() if x.get("level") == "error"]
    assert line["event"] == "listen_failed" and "in use" in line["error"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/s/track"), ("PUT", "/v1/batch")])
async def test_a_405_on_a_public_path_varies_on_origin(
    proxy: TestClient[Any, Any], method: str, path: str
) -> None:
    """A 405 is cacheable by default; found without Vary by the second attack pass."""
    resp = await proxy.request(method, path, headers={"Origin": ORIGIN})
    assert resp.status == 405
    assert "origin" in vary(resp)
