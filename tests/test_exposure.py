"""What a shared cache or a stranger gets from the proxy (issue 7, finding 11): `Vary: Origin`
on every answer whose headers depend on the Origin, the admin endpoints kept off the public
port, and no filesystem paths in any answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy import routes
from proxy.buffer import DB_NAME
from tests.conftest import ProxyFactory
from tests.fakejitsu import FakeJitsu

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
    assert routes.relative_to_buffer(text, buffer_dir) == (
        "[Errno 28] No space left on device: 'buffer.db-wal' in ."
    )
    sibling = f"{buffer_dir}2/x"
    assert routes.relative_to_buffer(sibling, buffer_dir) == sibling
