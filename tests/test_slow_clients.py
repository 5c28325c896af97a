"""Slow and oversized clients against the server as production starts it (issue 3), over raw
sockets: a slowloris is cut off by the idle timeout, a trickled body gets 408, header floods get
a 4xx, nothing of theirs reaches upstream, and the next client is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.app import create_app, server_options
from proxy.state import APP_STATE
from tests.conftest import test_config
from tests.fakejitsu import FakeJitsu

KEY = "slowKeyId:slowSecret"
EVENT = json.dumps({"type": "track", "event": "slow", "messageId": "slow-1"}).encode()
Start = Callable[..., Awaitable[TestServer]]
Response = tuple[int, dict[str, str], bytes]


@pytest.fixture
async def start(tmp_path: Path, upstream: FakeJitsu) -> AsyncIterator[Start]:
    """Start the proxy exactly as production does, with `server.*` overrides."""
    servers: list[TestServer] = []

    async def factory(**server: Any) -> TestServer:
        config = test_config(tmp_path, upstream.url, server=server)
        srv = TestServer(create_app(config))
        await srv.start_server(**server_options(config))
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        await srv.close()


def request_head(
    path: str = "/api/s/s2s/track", length: int = len(EVENT), extra: bytes = b""
) -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            f"X-Write-Key: {KEY}\r\nContent-Length: {length}\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


async def read_response(reader: asyncio.StreamReader) -> Response | None:
    """One HTTP response, or None when the server hung up without answering."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        assert exc.partial == b"", f"connection closed mid-response: {exc.partial!r}"
        return None
    except ConnectionResetError:
        return None
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server still sends, up to its end of the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> int:
    """A slow client: one byte every `every_s`. Returns the bytes sent before the hang-up."""
    sent = 0
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            await asyncio.sleep(every_s)
    return sent


@contextlib.asynccontextmanager
async def connection(
    server: TestServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def background(coro: Awaitable[int]) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def still_serving(server: TestServer, upstream: FakeJitsu) -> None:
    """Nothing of the slow client was buffered or forwarded; a normal client is served."""
    assert server.app[APP_STATE].buffer.rows == 0
    assert upstream.received == []
    async with connection(server) as (reader, writer):
        writer.write(request_head(extra=b"Connection: close\r\n") + EVENT)
        answer = await asyncio.wait_for(read_response(reader), 5)
    assert answer is not None
    status, _, body = answer
    assert (status, json.loads(body)) == (200, {"ok": True})
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["slow-1"]


async def test_slowloris_headers_are_cut_off_by_the_idle_timeout(
    start: Start, upstream: FakeJitsu
) -> None:
    server = await start(idle_timeout_s=1)
    loop = asyncio.get_running_loop()
    async with connection(server) as (reader, writer):
        began = loop.time()
        writer.write(b"POST /api/s/s2s/track HTTP/1.1\r\nHost: proxy\r\n")
        headers = b"X-Write-Key: kid:secret\r\nX-Padding: aaaaaaaaaaaaaaaa\r\n" * 50
        async with background(trickle(writer, headers, 0.2)) as sender:
            leftover = await asyncio.wait_for(until_closed(reader), 5)
            elapsed = loop.time() - began
            sent = await asyncio.wait_for(sender, 2)  # its next write meets the hang-up
    assert leftover == b""  # hung up, no answer to a request that never finished
    assert 0.5 < elapsed < 5, elapsed
    assert 3 <= sent < len(headers)  # it was let in for a while, then cut off
    await still_serving(server, upstream)


async def test_a_silent_connection_is_closed_by_the_idle_timeout(
    start: Start, upstream: FakeJitsu
) -> None:
    server = await start(idle_timeout_s=1)
    loop = asyncio.get_running_loop()
    async with connection(server) as (reader, _writer):
        began = loop.time()
        assert await asyncio.wait_for(until_closed(reader), 5) == b""
        assert loop.time() - began < 5
    await still_serving(server, upstream)


async def test_a_slow_but_steady_client_within_the_timeout_is_served(
    start: Start, upstream: FakeJitsu
) -> None:
    """The control: trickling is not refused as such, only taking too long is."""
    server = await start(idle_timeout_s=3, body_timeout_s=3)
    request = request_head(extra=b"Connection: close\r\n") + EVENT
    async with connection(server) as (reader, writer):
        writer.write(request[:20])
        async with background(trickle(writer, request[20:], 0.002)):
            answer = await asyncio.wait_for(read_response(reader), 5)
    assert answer is not None
    assert (answer[0], json.loads(answer[2])) == (200, {"ok": True})
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["slow-1"]


@pytest.mark.parametrize("path", ["/api/s/track", "/api/s/s2s/track", "/v1/batch"])
async def test_a_trickled_body_gets_408(start: Start, upstream: FakeJitsu, path: str) -> None:
    # A long idle timeout, so that only the body timeout can end this.
    server = await start(body_timeout_s=1, idle_timeout_s=30)
    loop = asyncio.get_running_loop()
    async with connection(server) as (reader, writer):
        writer.write(request_head(path, length=1000) + b'{"type":"track","event":"slow"')
        began = loop.time()
        async with background(trickle(writer, b" " * 1000, 0.2)):
            answer = await asyncio.wait_for(read_response(reader), 5)
            elapsed = loop.time() - began
    assert 0.5 < elapsed < 5, elapsed
    if answer is not None:  # a server may also just hang up; this one answers
        status, headers, body = answer
        # 408 even on the browser route: Jitsu's 200-with-error is for what it has read.
        assert status == 408
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body) == {"error": "request body not received within 1 s"}
    await still_serving(server, upstream)


async def test_the_connection_is_dropped_soon_after_the_408(
    start: Start, upstream: FakeJitsu
) -> None:
    server = await start(body_timeout_s=1, idle_timeout_s=30)
    loop = asyncio.get_running_loop()
    async with connection(server) as (reader, writer):
        writer.write(request_head(length=1000) + b"{")
        began = loop.time()
        async with background(trickle(writer, b" " * 1000, 0.2)):
            answer = await asyncio.wait_for(read_response(reader), 5)
            assert answer is not None and answer[0] == 408
            # body timeout + 2 s: a slow client must not keep its connection for long.
            await asyncio.wait_for(until_closed(reader), 3 - (loop.time() - began))


@pytest.mark.parametrize(
    ("extra", "target"),
    [
        pytest.param(
            b"".join(b"X-Many-%d: v\r\n" % i for i in range(40)), "", id="too-many-headers"
        ),
        pytest.param(b"X-Big: " + b"a" * 4096 + b"\r\n", "", id="oversized-header"),
        pytest.param(b"X-" + b"n" * 4096 + b": v\r\n", "", id="oversized-header-name"),
        pytest.param(b"", "?pad=" + "p" * 4096, id="oversized-request-line"),
    ],
)
async def test_header_floods_are_refused(
    start: Start, upstream: FakeJitsu, extra: bytes, target: str
) -> None:
    server = await start(max_headers=20, max_header_bytes=1024)
    async with connection(server) as (reader, writer):
        # A valid event with a key: had the limit not applied, it would be accepted.
        writer.write(request_head("/api/s/s2s/track" + target, extra=extra) + EVENT)
        answer = await asyncio.wait_for(read_response(reader), 5)
        assert answer is not None
        status, _, body = answer
        assert 400 <= status < 500, (status, body)
        assert await asyncio.wait_for(until_closed(reader), 5) == b""
    await still_serving(server, upstream)


async def test_headers_just_under_the_limits_are_served(start: Start, upstream: FakeJitsu) -> None:
    """The limits are the configured ones, not aiohttp's defaults."""
    server = await start(max_headers=20, max_header_bytes=1024)
    extra = b"".join(b"X-Few-%d: v\r\n" % i for i in range(10)) + b"X-Big: " + b"a" * 1000 + b"\r\n"
    async with connection(server) as (reader, writer):
        writer.write(request_head(extra=extra + b"Connection: close\r\n") + EVENT)
        answer = await asyncio.wait_for(read_response(reader), 5)
    assert answer is not None
    assert answer[0] == 200
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["slow-1"]
