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
from tests.conftest import until
from tests.fakejitsu import Answer, FakeJitsu, Received

pytestmark = pytest.mark.slow

KEY = "kid:sUperSecretValue123"


class RowStalledError(AssertionError):
    """A buffered row was never sent again while upstream was healthy."""


@pytest.mark.timeout(30)
async def test_row_that_fails_during_a_buffer_read_is_sent_again(
    make_proxy: Callable[..., Any], upstream: FakeJitsu, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One attempt per request, so that r3's failure is settled at once; one slot kept free, so
    # that a new row (r4) starts the read that is held open.
    proxy: TestClient[Any, Any] = await make_proxy(
        upstream={"concurrency": 4, "retry": {"request_attempts": 1}}
    )
    state = proxy.server.app[APP_STATE]  # type: ignore[union-attr]
    buffer, fwd = state.buffer, state.forwarder
    assert fwd is not None

    holds = {name: asyncio.Event() for name in ("r1", "r2", "r3")}
    arrivals: collections.Counter[str] = collections.Counter()

    def choreography(rec: Received) -> Answer | None:
        mid = rec.message_ids[0]
        arrivals[mid] += 1
        if mid in ("r1", "r2"):
            return Answer(hold=holds[mid])
        if mid == "r3" and arrivals[mid] == 1:
            return Answer(0, reset=True, hold=holds["r3"])
        return None

    upstream.fault = choreography

    gate = asyncio.Event()
    gate.set()
    reading = asyncio.Event()
    real_fetch = buffer.fetch

    async def slow_fetch(
        after: int, limit: int, skip: frozenset[int] = frozenset(), **kw: Any
    ) -> list[Row]:
        rows = await real_fetch(after, limit, skip, **kw)
        if not gate.is_set():
            reading.set()
            await gate.wait()
        return rows

    monkeypatch.setattr(buffer, "fetch", slow_fetch)

    async def post(mid: str) -> None:
        # s2s: the forwarder's loop reads these rows (a browser route sends its rows at once).
        resp = await proxy.post(
            "/api/s/s2s/track", headers={"X-Write-Key": KEY}, json={"event": "e", "messageId": mid}
        )
        assert resp.status == 200

    for mid in ("r1", "r2", "r3"):
        await post(mid)
    await upstream.wait_for(lambda f: len(f.arrived) == 3)
    assert len(fwd.inflight) == 3 and buffer.rows == 3

    gate.clear()
    for mid in ("r4", "r5", "r6"):
        await post(mid)  # new rows: the forwarder reads them...
    await asyncio.wait_for(reading.wait(), 5)  # ...slowly
    # r3's connection drops while the read is pending, before anything was delivered: an
    # outage as far as anyone can tell; the cursor goes back for r3.
    holds["r3"].set()
    await until(lambda: 3 not in fwd.inflight and fwd.failing)
    holds["r1"].set()  # r1 and r2 are taken: upstream is healthy again
    holds["r2"].set()
    await until(lambda: len(fwd.inflight) == 0 and not fwd.failing)
    gate.set()  # the slow read returns
    await upstream.wait_for(lambda f: {"r4", "r5", "r6"} <= f.delivered_set)
    try:
        await upstream.wait_for(lambda f: "r3" in f.delivered_set, timeout=5)
    except TimeoutError:
        raise RowStalledError(
            f"r3 still buffered ({buffer.rows} row), never resent; forwarder cursor at "
            f"{fwd.cursor}, failing={fwd.failing}"
        ) from None
