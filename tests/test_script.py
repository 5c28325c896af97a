"""/p.js from the proxy: cached, ETag/304, gzip, stale-on-error, rewritten for event aliases."""

from __future__ import annotations

import gzip
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.state import APP_STATE
from tests.fakejitsu import CLASSIC_SCRIPT, SCRIPT, FakeJitsu

KEY = "kid:sec"


async def test_script_is_served_with_jitsu_headers(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.get("/p.js")
    assert resp.status == 200
    assert await resp.read() == SCRIPT
    assert resp.headers["Content-Type"].startswith("application/javascript")
    assert resp.headers["Cache-Control"] == "public, max-age=120"
    assert resp.headers["Vary"] == "Accept-Encoding, Origin"
    etag = resp.headers["ETag"]
    again = await proxy.get("/p.js", headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""
    assert again.headers["ETag"] == etag
    head = await proxy.head("/p.js")
    assert head.status == 200 and head.headers["ETag"] == etag
    assert upstream.script_fetches == 1, "served from the cache, not fetched per request"
    assert upstream.received == []


async def test_script_gzip_when_accepted(proxy: TestClient[Any, Any]) -> None:
    resp = await proxy.get("/p.js", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await resp.read()) == SCRIPT
    plain = await proxy.get("/p.js", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    assert await plain.read() == SCRIPT


async def test_stale_copy_is_served_when_the_origin_fails(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    first = await proxy.get("/p.js")
    assert first.status == 200
    upstream.script_status = 502
    script = proxy.server.app[APP_STATE].script  # type: ignore[union-attr]
    await script.refresh()
    assert script.last_error is not None
    resp = await proxy.get("/p.js")
    assert resp.status == 200
    assert await resp.read() == SCRIPT
    # A new version upstream replaces it, with a new ETag.
    upstream.script_status = 200
    upstream.set_script(SCRIPT + b"//v2\n")
    await script.refresh()
    newer = await proxy.get("/p.js", headers={"If-None-Match": first.headers["ETag"]})
    assert newer.status == 200
    assert (await newer.read()).endswith(b"//v2\n")


@pytest.mark.parametrize(
    ("path", "failing", "other"),
    [("/p.js", "script_status", "/s/lib.js"), ("/s/lib.js", "classic_script_status", "/p.js")],
)
async def test_cold_start_without_origin_is_a_clear_503(
    make_proxy: Any, upstream: FakeJitsu, path: str, failing: str, other: str
) -> None:
    setattr(upstream, failing, 500)
    proxy = await make_proxy()
    resp = await proxy.get(path)
    assert resp.status == 503
    assert "Retry-After" in resp.headers
    error = (await resp.json())["error"]
    assert "tracking script not available" in error and "answered 500" in error
    assert (await proxy.get(other)).status == 200, "each script is cached on its own"


async def test_disk_copy_survives_a_restart(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy()
    assert (await proxy.get("/p.js")).status == 200
    await proxy.close()
    upstream.script_status = 500
    again = await make_proxy()
    resp = await again.get("/p.js")
    assert resp.status == 200
    assert await resp.read() == SCRIPT


async def test_aliases_move_script_and_events_and_rewrite_the_script(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(
        routes={
            "script_paths": ["/assets/app.js"],
            "event_prefix": "/collect",
            "batch_paths": ["/collect/b"],
        }
    )
    aliased = await proxy.get("/assets/app.js")
    body = await aliased.read()
    assert b"/api/s/" not in body
    assert b"'/collect/s2s/'" in body and b"'/collect/'" in body
    original = await proxy.get("/p.js")
    assert await original.read() == body, "the Jitsu path serves the same rewritten script"
    assert aliased.headers["ETag"] != '"v1"'

    r1 = await proxy.post(
        "/collect/track", headers={"X-Write-Key": KEY}, json={"event": "a", "messageId": "a1"}
    )
    r2 = await proxy.post(
        "/collect/s2s/identify", headers={"X-Write-Key": KEY}, json={"messageId": "a2"}
    )
    r3 = await proxy.post(
        "/collect/b",
        headers={"X-Write-Key": KEY},
        json={"batch": [{"type": "track", "event": "b", "messageId": "a3"}]},
    )
    bad = await proxy.post("/collect/s2s/track", headers={"X-Write-Key": KEY}, json={})
    assert [r.status for r in (r1, r2, r3, bad)] == [200, 200, 200, 400]
    got = await upstream.wait_delivered(3)
    assert sorted(r.path for r in got) == ["/api/s/s2s/identify", "/api/s/track", "/v1/batch"]
    preflight = await proxy.options("/collect/track", headers={"Origin": "https://shop.example"})
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://shop.example"


async def test_jitsu_paths_can_be_switched_off(make_proxy: Any, upstream: FakeJitsu) -> None:
    proxy = await make_proxy(
        routes={"jitsu_paths": False, "event_prefix": "/e", "script_paths": ["/s.js"]}
    )
    for method, path in [("POST", "/api/s/track"), ("GET", "/p.js"), ("POST", "/v1/batch")]:
        resp = await proxy.request(method, path, json={"event": "x"})
        assert resp.status == 404, path
    assert (await proxy.get("/s.js")).status == 200
    ok = await proxy.post("/e/track", headers={"X-Write-Key": KEY}, json={"event": "x"})
    assert ok.status == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.path == "/api/s/track"


async def test_an_oversized_script_is_refused_and_the_good_copy_stays(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """An origin serving a huge script once held it whole in memory and gzipped it on the
    event loop (the attack pass served 1 GB)."""
    proxy = await make_proxy(script={"max_bytes": 64 * 1024})
    assert await (await proxy.get("/p.js")).read() == SCRIPT
    upstream.set_script(b"//" + b"x" * 100_000 + b"\n")
    script = proxy.server.app[APP_STATE].script  # type: ignore[union-attr]
    await script.refresh()
    assert "larger than script.max_bytes (65536)" in (script.last_error or "")
    assert await (await proxy.get("/p.js")).read() == SCRIPT


async def test_classic_lib_js_is_jitsus_own_file_served_like_p_js(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """Jitsu serves the classic tracker at /s/lib.js (ClassicScriptHandler), a file of its own,
    not p.js: it is fetched from there and cached apart, with ETag, 304, HEAD and gzip."""
    resp = await proxy.get("/s/lib.js")
    assert resp.status == 200
    assert await resp.read() == CLASSIC_SCRIPT
    assert resp.headers["Content-Type"].startswith("application/javascript")
    assert resp.headers["Cache-Control"] == "public, max-age=120"
    etag = resp.headers["ETag"]
    assert etag != (await proxy.get("/p.js")).headers["ETag"]
    assert (await proxy.get("/s/lib.js", headers={"If-None-Match": etag})).status == 304
    head = await proxy.head("/s/lib.js")
    assert head.status == 200 and head.headers["ETag"] == etag
    zipped = await proxy.get(
        "/s/lib.js", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert gzip.decompress(await zipped.read()) == CLASSIC_SCRIPT
    assert upstream.classic_script_fetches == 1 and upstream.script_fetches == 1
    assert upstream.received == [], "fetching a script is no event"


async def test_classic_lib_js_has_its_own_disk_copy_and_no_rewrite(
    make_proxy: Any, upstream: FakeJitsu
) -> None:
    """Its events go to the classic routes, served here as they are: the event_prefix rewrite
    of p.js does not touch it."""
    upstream.classic_script_body = CLASSIC_SCRIPT + b"//'/api/s/' stays\n"
    proxy = await make_proxy(routes={"event_prefix": "/collect"})
    assert await (await proxy.get("/s/lib.js")).read() == upstream.classic_script_body
    assert b"/collect/" in await (await proxy.get("/p.js")).read()
    await proxy.close()
    upstream.script_status = upstream.classic_script_status = 500
    again = await make_proxy(routes={"event_prefix": "/collect"})
    assert await (await again.get("/s/lib.js")).read() == upstream.classic_script_body
    assert b"/collect/" in await (await again.get("/p.js")).read()
