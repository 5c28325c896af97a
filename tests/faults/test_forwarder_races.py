"""Races inside the forwarder, pinned down in-process: a gate holds one buffer read open, as a
slow disk would, while rows fail and succeed around it. The scenario tests meet these races by
chance; here each happens every time."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.buffer import Row
from proxy.state import APP_STATE
from tests.fakejitsu import Answer, FakeJitsu, Received

pytestmark = pytest.mark.slow

KEY = "kid:sUperSecretValue123"


class RowStalledError(AssertionError):
    """A buffered row was never sent again while upstream was healthy."""


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(loop(), timeout)


@pytest.mark.timeout(30)
async def test_row_that_fails_during_a_buffer_read_is_sent_again(
    make_proxy: Callable[..., Any], upstream: FakeJitsu, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: TestClient[Any, Any] = await make_proxy(upstream={"concurrency": 3})
    state = proxy.server.app[APP_STATE]  # type: ignore[union-attr]
    buffer, fwd = state.buffer, state.forwarder
    assert fwd is not None

    holds = {name: asyncio.Event() for name in ("r1", "r2", "r2-retry", "r3")}
    arrivals: collections.Counter[str] = collections.Counter()

    def choreography(rec: Received) -> Answer | None:
        mid = rec.message_ids[0]
        arrivals[mid] += 1
        if mid == "r1":
            return Answer(hold=holds["r1"])
        if mid == "r2":
            if arrivals[mid] == 1:
                return Answer(0, reset=True, hold=holds["r2"])
            return Answer(hold=holds["r2-retry"])
        if mid == "r3" and arrivals[mid] == 1:
            return Answer(0, reset=True, hold=holds["r3"])
        return None

    upstream.fault = choreography

    gate = asyncio.Event()
    gate.set()
    reading = asyncio.Event()
    real_fetch = buffer.fetch

    async def slow_fetch(after: int, limit: int) -> list[Row]:
        rows = await real_fetch(after, limit)
        if not gate.is_set():
            reading.set()
            await gate.wait()
        return rows

    monkeypatch.setattr(buffer, "fetch", slow_fetch)

    for mid in ("r1", "r2", "r3", "r4", "r5", "r6"):
        resp = await proxy.post(
            "/api/s/track", headers={"X-Write-Key": KEY}, json={"event": "e", "messageId": mid}
        )
        assert resp.status == 200
    await upstream.wait_for(lambda f: len(f.arrived) == 3)
    assert len(fwd.inflight) == 3 and buffer.rows == 6

    gate.clear()
    holds["r1"].set()  # r1 is taken: a slot frees and the forwarder reads the next rows...
    await asyncio.wait_for(reading.wait(), 5)  # ...slowly
    holds["r2"].set()  # r2's connection drops: it becomes the probe, retried in its request
    await upstream.wait_for(lambda f: arrivals["r2"] == 2)
    holds["r3"].set()  # r3's drops too: handed back to the buffer, the cursor rewound
    await until(lambda: len(fwd.inflight) == 1)
    holds["r2-retry"].set()  # r2's retry is taken: upstream is healthy again
    await until(lambda: not fwd.inflight and not fwd.failing)
    gate.set()  # the slow read returns
    await upstream.wait_for(lambda f: {"r4", "r5", "r6"} <= f.delivered_set)
    try:
        await upstream.wait_for(lambda f: "r3" in f.delivered_set, timeout=5)
    except TimeoutError:
        raise RowStalledError(
            f"r3 still buffered ({buffer.rows} row), never resent; forwarder cursor at "
            f"{fwd.cursor}, failing={fwd.failing}"
        ) from None
