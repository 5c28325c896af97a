"""A long upstream outage under a steady sequential client: the backlog grows on disk only (the
proxy's memory stays flat), nothing expires, and on recovery everything drains, oldest first."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from proxy.forwarder import READ_AHEAD_ROWS
from tests.fakejitsu import FakeJitsu
from tests.faults.invariants import (
    Ledger,
    drain_and_check,
    first_delivery_order,
    make_event,
    max_displacement,
    send,
)
from tests.procs import ProxyProcess, Spawn

pytestmark = pytest.mark.slow

EVENTS = 40_000
PAD = 3000  # bytes of padding per event: ~125 MB of backlog in all
CONCURRENCY = 16  # upstream.concurrency (the default)
MAX_BACKOFF_S = 0.3  # upstream.retry.max_backoff_s in the suite's config
# Measured peak VmRSS of the proxy in this test: 48 MiB (~42 MiB right after start). The
# bound leaves generous headroom, yet sits below start + backlog: a proxy that held the backlog
# in memory instead of on disk could not pass.
RSS_BOUND = 150 * 1024 * 1024


async def sample_rss(proxy: ProxyProcess, samples: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss = proxy.rss_bytes()
        if rss is not None:
            samples.append(rss)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


@pytest.mark.timeout(180)
@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "row by row"])
async def test_long_outage_memory_stays_flat_and_the_backlog_drains_in_order(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, seed: str, coalesce: bool
) -> None:
    await upstream.stop()
    proxy = spawn(upstream={"coalesce": coalesce})
    proxy.start()
    await proxy.wait_ready()
    samples: list[int] = []
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(proxy, samples, stop_sampling))

    # One client, one request at a time: a batch of 100, then ten single events, and again.
    ledger = Ledger()
    n = 0
    while n < EVENTS:
        for size in (100, *[1] * 10):
            ids = [f"out-{n + i:06d}" for i in range(min(size, EVENTS - n))]
            if not ids:
                break
            assert await send(session, proxy.url, ledger, [make_event(i, PAD) for i in ids])
            n += len(ids)
    outage = await proxy.readyz(session)
    assert outage is not None
    assert outage["buffer"]["events"] == EVENTS
    assert outage["buffer"]["dead_letter_rows"] == 0, "nothing may expire during an outage"
    assert outage["upstream"]["failing"]
    assert upstream.received == []

    back = time.monotonic()
    await upstream.start()
    await upstream.wait_for(lambda f: bool(f.delivered), timeout=10)
    first = min(r.at for r in upstream.delivered) - back
    assert first <= MAX_BACKOFF_S + 1.5, f"first delivery {first:.2f} s after upstream returned"
    summary = await drain_and_check(
        "long outage (40k events, 125 MB)",
        proxy,
        upstream,
        session,
        ledger,
        seed=seed,
        drain_timeout=120,
        max_duplicates=0,
    )
    stop_sampling.set()
    await sampler

    order = first_delivery_order(upstream.received, ledger.accepted_rows)
    # Probes take turns over the backlog (one row that always fails must not pass for an
    # outage): the probe that met the recovery goes first, then the backlog, oldest first.
    probe = order[0]
    assert probe in {ids[0] for ids in ledger.accepted_rows}
    rest = [ids for ids in ledger.accepted_rows if ids[0] != probe]
    displacement = max_displacement(rest, order[1:])
    peak = max(samples)
    print(
        f"\nlong outage: {len(ledger.accepted_rows)} rows, RSS peak {peak / 2**20:.1f} MiB "
        f"over {len(samples)} samples (bound {RSS_BOUND / 2**20:.0f} MiB), first delivery "
        f"{first:.2f} s after recovery, order displacement {displacement} rows"
    )
    # Rows leave in acceptance order, CONCURRENCY requests at a time; a row can only overtake,
    # or be overtaken by, rows in flight together with it. Coalesced, a request that starts
    # at the oldest row left takes the later single events of the read-ahead along.
    window = CONCURRENCY - 1 + (READ_AHEAD_ROWS if coalesce else 0)
    assert displacement <= window, "drain order strays beyond the in-flight window"
    if coalesce:
        assert any(r.path == "/api/s/s2s/batch" for r in upstream.received)
    assert peak < RSS_BOUND
    assert summary.lost == 0
