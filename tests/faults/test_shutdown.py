"""SIGTERM under load, with forwards in flight to a slow upstream: the proxy exits 0 in time,
and every 2xx'd event is delivered, once, after the restart."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from tests.fakejitsu import Answer, FakeJitsu, Received
from tests.faults.invariants import Ledger, Load, drain_and_check
from tests.procs import Spawn

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT_S = 5
ROUNDS = 3


@pytest.mark.timeout(120)
async def test_sigterm_under_load(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    def slow(rec: Received) -> Answer:
        return Answer(delay_s=rng.uniform(0.2, 0.6))

    upstream.fault = slow
    proxy = spawn(upstream={"concurrency": 4}, server={"shutdown_timeout_s": SHUTDOWN_TIMEOUT_S})
    proxy.start()
    await proxy.wait_ready()
    ledger = Ledger()
    for round_ in range(ROUNDS):
        clients = Load(
            session,
            proxy.url,
            ledger,
            rng,
            f"term{round_}",
            clients=3,
            max_events=100_000,
            pause_s=0.01,
        )
        task = clients.start()
        await upstream.wait_for(lambda f: f.in_flight >= 2, timeout=10)
        await asyncio.sleep(rng.uniform(0, 0.3))
        started = time.monotonic()
        # Clients keep sending while the proxy shuts down; what they are refused is not accepted.
        code = await proxy.terminate_async(timeout=3 * SHUTDOWN_TIMEOUT_S)
        took = time.monotonic() - started
        clients.stop.set()
        await task
        assert code == 0, proxy.log_text()[-3000:]
        assert took < 3 * SHUTDOWN_TIMEOUT_S
        lines = [x for x in proxy.log_lines() if x.get("event") != "request"]
        assert lines[-1]["event"] == "proxy_stopped"
        stopped = [x for x in lines if x.get("event") == "forwarder_stopped"]
        assert all(x["abandoned"] == 0 for x in stopped), stopped
        proxy.start()
        await proxy.wait_ready()
    await drain_and_check(
        "SIGTERM under load (3 rounds)",
        proxy,
        upstream,
        session,
        ledger,
        seed=seed,
        max_duplicates=0,
    )


@pytest.mark.timeout(60)
async def test_sigterm_abandons_forwards_that_hang_past_the_grace(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    """Upstream holds every forward (its timeout is 30 s, the grace 1 s): SIGTERM gives them the
    grace, abandons them without deleting their rows, exits 0, and the restart sends them."""
    grace_s = 1
    upstream.hang = True
    proxy = spawn(
        upstream={"concurrency": 4, "timeout_s": 30}, server={"shutdown_timeout_s": grace_s}
    )
    proxy.start()
    await proxy.wait_ready()
    ledger = Ledger()
    await Load(session, proxy.url, ledger, rng, "abandon", max_events=500).run()
    await upstream.wait_for(lambda f: f.in_flight >= 4, timeout=10)
    started = time.monotonic()
    code = await proxy.terminate_async(timeout=10)
    took = time.monotonic() - started
    assert code == 0, proxy.log_text()[-3000:]
    # README: allow about 3 x server.shutdown_timeout_s between SIGTERM and SIGKILL.
    assert took < 3 * grace_s, f"exit took {took:.1f} s"
    (stopped,) = [x for x in proxy.log_lines() if x.get("event") == "forwarder_stopped"]
    assert stopped["abandoned"] == 4
    assert upstream.delivered == []
    upstream.hang = False
    proxy.start()
    await proxy.wait_ready()
    await drain_and_check(
        "SIGTERM, forwards hanging past the grace",
        proxy,
        upstream,
        session,
        ledger,
        seed=seed,
        max_duplicates=0,
    )
