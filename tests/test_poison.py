"""Nothing a client sends can stop ingest or forwarding (issue 7, finding 1).

Once, one beacon with a lone surrogate in its body key killed the buffer's writer: every later
request hung while /healthz and /readyz said pass. Here every field that reaches storage or the
upstream request gets lone surrogates, invalid UTF-8, NUL and very long values, on every route,
and after each request a good event must still be accepted and delivered.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sqlite3
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.buffer import Buffer
from proxy.envelope import Envelope
from proxy.errors import BufferError_
from tests.conftest import until
from tests.fakejitsu import FakeJitsu
from tests.test_forwarding import KEY, state


async def raw_request(
    proxy: TestClient[Any, Any], head: bytes, body: bytes = b""
) -> tuple[int, bytes]:
    """One request as raw bytes (what aiohttp's client would refuse to send), its status and
    body."""
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        length = b"Content-Length: %d\r\n" % len(body)
        writer.write(head + b"Host: x\r\nConnection: close\r\n" + length + b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def canary(proxy: TestClient[Any, Any], upstream: FakeJitsu, tag: str) -> None:
    """A good event still goes all the way through, and the loops are alive."""
    resp = await proxy.post(
        "/api/s/s2s/track", json={"event": "canary", "messageId": tag}, headers={"X-Write-Key": KEY}
    )
    assert resp.status == 200, await resp.text()
    await upstream.wait_for(lambda f: tag in f.delivered_set, timeout=10)
    assert (await proxy.get("/healthz")).status == 200


async def test_a_lone_surrogate_key_in_a_beacon_does_not_stop_ingest(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    body = '{"writeKey":"k\\ud800:s","batch":[{"type":"track","event":"x"}]}'
    resp = await proxy.post("/v1/batch", data=body, headers={"Content-Type": "text/plain"})
    assert resp.status == 401
    assert (await resp.json())["error"].startswith("stream not found")
    await canary(proxy, upstream, "after-beacon")


@pytest.mark.parametrize(
    ("path", "status"), [("/api/s/s2s/track", 401), ("/api/s/track", 200), ("/v1/batch", 401)]
)
async def test_invalid_utf8_in_the_key_header_does_not_stop_ingest(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, path: str, status: int
) -> None:
    body = b'{"batch":[{"type":"track","event":"x"}]}' if "batch" in path else b'{"event":"x"}'
    head = b"POST " + path.encode() + b" HTTP/1.1\r\nX-Write-Key: k\xff:s\r\n"
    code, answer = await raw_request(proxy, head + b"Content-Type: application/json\r\n", body)
    assert code == status
    assert json.loads(answer)["error"].startswith("stream not found")
    await canary(proxy, upstream, f"after-{path}")
    assert upstream.received[-1].headers["X-Write-Key"] == KEY


async def test_invalid_utf8_in_a_passed_header_is_forwarded_as_replacement(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    head = (
        b"POST /api/s/s2s/track HTTP/1.1\r\nX-Write-Key: " + KEY.encode() + b"\r\n"
        b"User-Agent: Mozilla\xff\xfe/5.0\r\nContent-Type: application/json\r\n"
    )
    code, _ = await raw_request(proxy, head, b'{"event":"x","messageId":"ua"}')
    assert code == 200
    await upstream.wait_for(lambda f: "ua" in f.delivered_set)
    assert upstream.delivered[-1].headers["User-Agent"] == "Mozilla\ufffd\ufffd/5.0"


async def test_the_writer_survives_an_operation_that_raises(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    buf = state(proxy).buffer
    poisoned = Envelope("/api/s/track", {}, b"{}", 1, "k\ud800")  # SQLite cannot store it
    with pytest.raises(BufferError_):
        await buf.append([poisoned])
    await canary(proxy, upstream, "after-poison")


@pytest.mark.parametrize("loop", ["buffer writer", "forwarder"])
async def test_healthz_fails_when_a_loop_has_ended(
    proxy: TestClient[Any, Any], loop: str, logs: io.StringIO
) -> None:
    assert (await proxy.get("/healthz")).status == 200
    task = state(proxy).buffer._writer if loop == "buffer writer" else state(proxy).forwarder._task
    task.cancel()
    await until(lambda: task.done())
    resp = await proxy.get("/healthz")
    assert resp.status == 503
    assert await resp.json() == {"status": "fail", "stopped": [loop]}
    # And the log says why, for whoever restarts us.
    said = {json.loads(line)["event"] for line in logs.getvalue().splitlines()}
    stopped = (
        "buffer_writer_stopped" if loop == "buffer writer" else "forwarder_stopped_unexpectedly"
    )
    assert stopped in said


# ---- the class: every stored field, every route --------------------------------------------

# Values as raw bytes (headers, query strings) and as text (JSON bodies).
RAW = st.sampled_from(
    [b"\xff", b"\xed\xa0\x80", b"\xc3", b"a\x80b", b"\xef\xbf\xbf", "é".encode(), b"%00", b"%ff"]
) | st.binary(min_size=1, max_size=20).filter(lambda b: not set(b) & set(b"\r\n\x00 \t#?&="))
TEXT = st.sampled_from(["\ud800", "\udfff", "k\udcff:s", "\x00", "a\x00b", "\ufffd", "x" * 5000])
LONG_HEADER = b"v" * 8000

HEADER_FIELDS = [
    *("X-Write-Key", "User-Agent", "Accept-Language", "Origin", "Referer", "X-IP-Policy"),
    *("X-Auth-Token", "api_key"),  # the Classic API's key places
]
ROUTES = [
    *("/api/s/track", "/api/s/s2s/page", "/api/s/event", "/v1/batch", "/api/px/track"),
    *("/api/v1/event", "/api.x7k", "/api/v1/s2s/events"),  # the Classic API
]


def event_with(field: str, value: str) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "track", "event": "e", "properties": {"p": value}}
    if field in ("writeKey", "messageId", "userId", "anonymousId", "event", "type"):
        event[field] = value
    return event


@st.composite
def shots(draw: st.DrawFn) -> tuple[bytes, bytes]:
    route = draw(st.sampled_from(ROUTES))
    headers = {b"Content-Type": draw(st.sampled_from([b"application/json", b"text/plain"]))}
    headers[b"X-Write-Key"] = KEY.encode()
    where = draw(st.sampled_from(["header", "body", "query"]))
    query = b""
    body = b""
    if where == "header":
        name = draw(st.sampled_from(HEADER_FIELDS)).encode()
        headers[name] = draw(RAW | st.just(LONG_HEADER))
    elif where == "query":
        name = draw(
            st.sampled_from([b"writekey", b"x", b"type", b"event", b"data", b"token", b"p_q1"])
        )
        value = draw(RAW)
        query = b"?" + name + b"=" + quote(value, safe="").encode()
    text = draw(TEXT)
    field = draw(st.sampled_from(["writeKey", "messageId", "userId", "event", "type", "props"]))
    event = event_with(field, text) if where == "body" else event_with("props", "ok")
    if route == "/v1/batch":
        payload: dict[str, Any] = {"batch": [event, {"type": "page"}]}
        if where == "body" and field == "writeKey":
            payload["writeKey"] = text
            headers.pop(b"X-Write-Key")
        body = json.dumps(payload).encode()
    elif route.startswith("/api/px/"):
        data = base64.b64encode(json.dumps(event).encode())
        query = (query + b"&" if query else b"?") + b"data=" + quote(data).encode()
    else:
        body = json.dumps(event).encode()
    method = b"GET" if route.startswith("/api/px/") else b"POST"
    head = method + b" " + route.encode() + query + b" HTTP/1.1\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers.items())
    return head, body


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(shot=shots())
async def test_no_stored_field_can_stop_ingest_or_forwarding(
    proxy: TestClient[Any, Any], upstream: FakeJitsu, shot: tuple[bytes, bytes]
) -> None:
    head, body = shot
    code, answer = await raw_request(proxy, head, body)
    assert code < 500, (code, answer)
    tag = f"c{len(upstream.received)}-{abs(hash(shot))}"
    await canary(proxy, upstream, tag)
    # Whatever was accepted leaves the buffer: delivered, or refused by upstream with a reason.
    buf = state(proxy).buffer
    await until(lambda: buf.rows == 0, timeout=10)
    assert buf.last_error is None


async def test_a_row_whose_headers_do_not_decode_is_dead_lettered_not_a_stall(
    make_proxy: Any, upstream: FakeJitsu, tmp_path: Any
) -> None:
    """A damaged row (here written behind the proxy's back) must not stop the forwarder."""
    path = tmp_path / "buffer"
    async with Buffer(path, 1_000_000) as buf:
        await buf.append(
            [Envelope("/api/s/track", {"X-Write-Key": KEY}, b'{"messageId":"a"}', 1, "k")]
        )
    with sqlite3.connect(path / "buffer.db") as conn:
        conn.execute("UPDATE events SET headers = '{not json'")
    async with Buffer(path, 1_000_000) as buf:
        await buf.append(
            [Envelope("/api/s/track", {"X-Write-Key": KEY}, b'{"messageId":"b"}', 1, "k")]
        )
    proxy = await make_proxy()
    await upstream.wait_for(lambda f: "b" in f.delivered_set)
    buf = state(proxy).buffer
    await until(lambda: buf.rows == 0 and buf.dead_rows == 1)
    (dead,) = await buf.dead_letters()
    assert dead["reason"].startswith("row cannot be sent: stored headers do not decode")
