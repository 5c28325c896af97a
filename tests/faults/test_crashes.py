"""kill -9 at random moments, while clients send and while the forwarder is mid-request: every
2xx'd event reaches upstream after the restarts, and every resend carries the same bytes."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import aiohttp
import pytest

from tests.fakejitsu import Answer, FakeJitsu, Received, lost_ack
from tests.faults.invariants import Ledger, Load, drain_and_check
from tests.procs import ProxyProcess, Spawn

pytestmark = pytest.mark.slow

KILLS = 10


async def kill_and_restart(proxy: ProxyProcess) -> None:
    proxy.kill()
    assert proxy.proc is not None and proxy.proc.returncode == -9
    proxy.start()
    await proxy.wait_ready()


@pytest.mark.timeout(150)
async def test_kill_9_during_ingest(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    """Four clients send without pause; the proxy dies at a random moment every 0.1-1 s. A
    request cut off by the kill is not counted as accepted (it may still be delivered: it was
    committed, only the answer was lost)."""
    proxy = spawn()
    proxy.start()
    await proxy.wait_ready()
    ledger = Ledger()
    clients = Load(
        session, proxy.url, ledger, rng, "k9i", clients=4, max_events=200_000, pause_s=0.005
    )
    task = clients.start()
    for _ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.1, 1.0))  # the moment of the crash is the variable
        await kill_and_restart(proxy)
    await upstream.wait_for(lambda f: len(f.delivered) >= 20)
    clients.stop.set()
    await task
    assert ledger.failed > 0, "no request was cut off: the kills missed the ingest"
    await drain_and_check("kill -9 during ingest", proxy, upstream, session, ledger, seed=seed)


@pytest.mark.timeout(150)
async def test_kill_9_during_forwarding(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    """A backlog drains to a slow upstream that sometimes loses its 200; the proxy dies while a
    forward is in flight, ten times, and a client keeps sending throughout."""
    await upstream.stop()
    proxy = spawn(upstream={"concurrency": 4})
    proxy.start()
    await proxy.wait_ready()
    ledger = Ledger()
    await Load(session, proxy.url, ledger, rng, "k9f", max_events=4000, max_batch=10).run()
    assert len(ledger.accepted) == 4000

    def slow(rec: Received) -> Answer:
        return lost_ack() if rng.random() < 0.1 else Answer(delay_s=rng.uniform(0.05, 0.3))

    upstream.fault = slow
    await upstream.start()
    trickle = Load(
        session, proxy.url, ledger, rng, "k9t", clients=1, max_events=100_000, pause_s=0.05
    )
    task = trickle.start()
    for _ in range(KILLS):
        await upstream.wait_for(lambda f: f.in_flight >= 1, timeout=10)
        await asyncio.sleep(rng.uniform(0, 0.25))
        await kill_and_restart(proxy)
    trickle.stop.set()
    await task
    summary = await drain_and_check(
        "kill -9 during forwarding", proxy, upstream, session, ledger, seed=seed
    )
    assert summary.duplicates > 0, "resends expected: the kills hit forwards in flight"
    # The backlog's single events went coalesced (upstream.coalesce), kills and all.
    assert any(r.path == "/api/s/s2s/batch" for r in upstream.received)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_browser_events_whose_sends_wait_on_jitsu_survive_the_process(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, how: str
) -> None:
    """A browser route sends its row itself, at once (upstream.sync_browser). The process dies
    (or drains) while those sends wait on Jitsu: every event answered 2xx is delivered after
    the restart."""
    release = asyncio.Event()
    upstream.fault = lambda _rec: Answer(hold=release)
    proxy = spawn(upstream={"sync_timeout_s": 0.3}, server={"shutdown_timeout_s": 0.5})
    proxy.start()
    await proxy.wait_ready()
    ids = [f"bw{i}" for i in range(20)]

    async def browser(mid: str) -> tuple[int, object]:
        async with session.post(
            proxy.url + "/api/s/page",
            json={"type": "page", "messageId": mid},
            headers={"X-Write-Key": "kid:BrowserSecret1"},
        ) as resp:
            return resp.status, await resp.json()

    answers = await asyncio.gather(*(browser(mid) for mid in ids))
    assert answers == [(200, {"ok": True})] * len(ids)  # Jitsu late: the proxy's own answer
    await upstream.wait_for(lambda f: {m for r in f.arrived for m in r.message_ids} >= set(ids))
    if how == "kill -9":
        proxy.kill()
    else:
        assert await proxy.terminate_async() == 0
    upstream.fault = None
    release.set()
    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: set(ids) <= f.delivered_set, timeout=30)


@pytest.mark.timeout(180)
async def test_kill_9_of_workers_and_of_the_whole_group(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    """Two workers (server.workers) under four clients that never pause: one worker dies at a
    random moment, and the supervisor replaces it; now and then the whole group dies and is
    started again. Every event acknowledged by either worker, in either shard, is delivered."""
    proxy = spawn(server={"workers": 2})
    proxy.start()
    await proxy.wait_ready()
    ledger = Ledger()
    clients = Load(
        session, proxy.url, ledger, rng, "k9w", clients=4, max_events=200_000, pause_s=0.005
    )
    task = clients.start()
    for round_ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        if round_ % 3 == 2:
            proxy.kill_group()
            proxy.start()
        else:
            state = await proxy.wait_state(
                session, lambda s: s["status"] == "pass", what="every worker ready"
            )
            os.kill(rng.choice(state["workers"])["pid"], signal.SIGKILL)
        await proxy.wait_ready()
    await upstream.wait_for(lambda f: len(f.delivered) >= 20)
    clients.stop.set()
    await task
    assert ledger.failed > 0, "no request was cut off: the kills missed the ingest"
    restarts = [line for line in proxy.log_lines() if line["event"] == "worker_exited"]
    assert restarts, "no worker was restarted"
    await drain_and_check("kill -9 of workers", proxy, upstream, session, ledger, seed=seed)


@pytest.mark.timeout(120)
async def test_a_worker_that_stops_answering_is_replaced(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    """A worker whose event loop no longer runs (here: SIGSTOP) holds its share of the port's
    connections: the supervisor, no longer hearing from it, kills and replaces it."""
    proxy = spawn(server={"workers": 2})
    proxy.start()
    await proxy.wait_ready()
    state = await proxy.wait_state(session, lambda s: s["status"] == "pass", what="ready")
    stuck = state["workers"][1]["pid"]
    os.kill(stuck, signal.SIGSTOP)
    for _ in range(600):
        if any(line["event"] == "worker_hung" for line in proxy.log_lines()):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the stopped worker was never replaced")
    state = await proxy.wait_state(
        session,
        lambda s: s["status"] == "pass" and s["workers"][1]["pid"] not in (0, stuck),
        what="worker 1 replaced",
    )
    hung = next(line for line in proxy.log_lines() if line["event"] == "worker_hung")
    assert hung["worker"] == 1 and hung["pid"] == stuck
    assert await proxy.terminate_async() == 0
