"""The secret half of a write key never appears in logs, metrics, error bodies or dead-letter
reasons: one scenario run with every auth form and failure, then a grep of every output."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from proxy.buffer import DB_NAME
from tests.fakejitsu import Answer, FakeJitsu
from tests.procs import ProxyProcess

KEY_ID = "qV7mLx2RkP9sTa4WbY6cZe8Df1Gh3Jk5"
SECRET = "Nn0Pp2Qq4Rr6Ss8Tt1Uu3Vv5Ww7Xx9Yy"
KEY = f"{KEY_ID}:{SECRET}"


@pytest.mark.timeout(60)
async def test_secret_never_leaves_in_any_output(tmp_path: Path, upstream: FakeJitsu) -> None:
    # Upstream fails, echoes the key the way Jitsu's "stream not found" does, and rejects.
    upstream.script.extend(
        [
            Answer(503, {"error": f"producer error for {KEY}"}),
            Answer(200, {"error": f"stream not found: for: [writeKey: {KEY}]"}),
            Answer(400, {"error": f"event error: bad event from {KEY}"}),
        ]
    )
    proxy = ProxyProcess(tmp_path, upstream.url, upstream={"retry": {"request_attempts": 1}})
    proxy.start()
    bodies: list[str] = []
    try:
        await proxy.wait_ready()
        basic = base64.b64encode(f"{KEY}:".encode()).decode()
        requests = [
            ("/api/s/page", {"X-Write-Key": KEY}, {"type": "page", "writeKey": KEY}),
            ("/api/s/track", {"Authorization": f"Basic {basic}"}, {"event": "a"}),
            (f"/api/s/s2s/identify?writekey={KEY}", {}, {"userId": "u"}),
            ("/v1/batch", {}, {"writeKey": KEY, "batch": [{"type": "track", "event": "b"}]}),
            ("/v1/batch", {}, {"writeKey": KEY, "batch": [{"type": "nope", "writeKey": KEY}]}),
            ("/api/s/s2s/track", {"X-Write-Key": KEY}, {"type": "track"}),  # invalid event
            ("/api/s/s2s/track", {"Authorization": f"Bearer {KEY}"}, {"event": "c"}),
            ("/api/s/s2s/track", {"X-Write-Key": KEY, "Content-Type": "text/html"}, None),
        ]
        async with aiohttp.ClientSession() as s:
            for path, headers, payload in requests:
                kwargs = {"json": payload} if payload is not None else {"data": b"x"}
                async with s.post(proxy.url + path, headers=headers, **kwargs) as r:
                    bodies.append(await r.text())
            await upstream.wait_for(lambda f: len(f.delivered) >= 3, timeout=20)
            async with s.get(proxy.url + "/metrics") as r:
                bodies.append(await r.text())
            async with s.get(proxy.url + "/readyz") as r:
                bodies.append(await r.text())
        assert proxy.terminate() == 0
    finally:
        proxy.stop()

    with sqlite3.connect(tmp_path / "buffer" / DB_NAME) as conn:
        reasons = [r for (r,) in conn.execute("SELECT reason FROM dead_letter")]
        dead_bodies = [bytes(b).decode() for (b,) in conn.execute("SELECT body FROM dead_letter")]
    assert len(reasons) == 2, reasons  # the 200-with-error and the 400
    outputs = {
        "proxy log": proxy.log_text(),
        "responses": "\n".join(bodies),
        "dead-letter reasons": "\n".join(reasons),
        "dead-letter bodies": "\n".join(dead_bodies),
    }
    assert KEY_ID in outputs["proxy log"], "the key id is logged, so the grep below means something"
    for name, text in outputs.items():
        assert SECRET not in text, f"write key secret found in {name}"
    # Upstream gets the key once, in X-Write-Key, and nowhere else.
    for rec in upstream.received:
        assert rec.headers.get("X-Write-Key") == KEY
        assert "Authorization" not in rec.headers
        assert SECRET not in rec.body.decode() and SECRET not in str(rec.query)
