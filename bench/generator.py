"""The bench's own load generator, for what wrk cannot do: a fixed rate (p99 latency at half the
maximum), an exact number of requests (filling the backlog), and the maximum-rate runs when wrk
is missing. Plain HTTP/1.1 keep-alive connections on asyncio protocols: a few microseconds of
Python per request, so that the generator is not what it measures."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import typing
from collections.abc import Callable

from aiohttp import hdrs

from bench.events import WRITE_KEY

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked")


@dataclasses.dataclass
class Outcome:
    ok: int = 0  # 2xx answers
    failed: int = 0  # other answers and transport errors
    seconds: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)  # seconds, 2xx only
    late: int = 0  # paced runs: requests that waited for a free connection
    behind: int = 0  # paced runs: the most requests waiting for one at once
    reported_ms: dict[int, float] = dataclasses.field(default_factory=dict)  # wrk's percentiles

    def percentile(self, p: int) -> float | None:
        """Nearest-rank percentile, in milliseconds (wrk's own where wrk ran)."""
        if not self.latencies:
            return self.reported_ms.get(p)
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))
        return ordered[rank] * 1000


def parse_response(buffer: bytes | bytearray) -> tuple[int, int] | None:
    """(status, bytes it takes) of the first whole response in `buffer`, None if incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    status = int(head[9:12])
    if _CHUNKED.search(head):
        last = buffer.find(b"\r\n0\r\n\r\n", end)
        return None if last < 0 else (status, last + 7)
    length = _LENGTH.search(head)
    total = end + 4 + (int(length[1]) if length else 0)
    return None if len(buffer) < total else (status, total)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        parsed = parse_response(self.buffer)
        if parsed is not None:
            status, size = parsed
            del self.buffer[:size]
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    async def exchange(self, request: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


class Generator:
    """`connections` keep-alive connections to one URL path, each with one request at a time."""

    def __init__(
        self, port: int, path: str, bodies: Callable[[], bytes], connections: int = 64
    ) -> None:
        self.port = port
        self.bodies = bodies
        self.connections = connections
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"{hdrs.CONTENT_TYPE}: application/json\r\nX-Write-Key: {WRITE_KEY}\r\n"
        ).encode()
        self.outcome = Outcome()

    def _request(self) -> bytes:
        body = self.bodies()
        return b"%sContent-Length: %d\r\n\r\n%s" % (self.head, len(body), body)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, "127.0.0.1", self.port)
        return conn

    async def _one(self, conn: _Connection | None, scheduled: float) -> _Connection | None:
        """One exchange; latency from `scheduled` (its slot, for paced runs). Returns the
        connection to use next, None after a transport error (the next call reconnects)."""
        try:
            if conn is None or conn.transport is None:
                conn = await self._connect()
            status = await conn.exchange(self._request())
        except OSError:
            self.outcome.failed += 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            return None
        if 200 <= status < 300:
            self.outcome.ok += 1
            self.outcome.latencies.append(time.perf_counter() - scheduled)
        else:
            self.outcome.failed += 1
        return conn

    async def closed_loop(self, seconds: float | None, requests: int | None = None) -> Outcome:
        """As fast as the server answers, for `seconds` or until `requests` were sent."""
        started = time.perf_counter()
        deadline = None if seconds is None else started + seconds
        issued = 0

        async def worker() -> None:
            nonlocal issued
            conn = None
            while (requests is None or issued < requests) and (
                deadline is None or time.perf_counter() < deadline
            ):
                issued += 1
                conn = await self._one(conn, time.perf_counter())
            if conn is not None and conn.transport is not None:
                conn.transport.close()

        async with asyncio.TaskGroup() as group:
            for _ in range(self.connections):
                group.create_task(worker())
        self.outcome.seconds = time.perf_counter() - started
        return self.outcome

    async def paced(self, rate: float, seconds: float) -> Outcome:
        """`rate` requests a second for `seconds`, whatever the answers do (open loop): a request
        that finds every connection busy waits, and its latency counts from its own slot, so a
        slow server cannot slow the clock that measures it."""
        slots: asyncio.Queue[float | None] = asyncio.Queue()
        total = max(1, round(rate * seconds))

        async def worker(conn: _Connection | None) -> None:
            while (scheduled := await slots.get()) is not None:
                if time.perf_counter() - scheduled > 0.001:
                    self.outcome.late += 1
                conn = await self._one(conn, scheduled)
            if conn is not None and conn.transport is not None:
                conn.transport.close()

        # Connected before the clock starts: a connect is not the server's latency.
        conns = [await self._connect() for _ in range(self.connections)]
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for conn in conns:
                group.create_task(worker(conn))
            for i in range(total):
                due = started + i / rate
                wait = due - time.perf_counter()
                if wait > 0.001:  # a timer per millisecond, not per request
                    await asyncio.sleep(wait)
                slots.put_nowait(due)
                self.outcome.behind = max(self.outcome.behind, slots.qsize())
            for _ in range(self.connections):
                slots.put_nowait(None)
        self.outcome.seconds = time.perf_counter() - started
        return self.outcome
