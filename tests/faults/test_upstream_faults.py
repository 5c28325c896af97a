"""A failing upstream, one fault at a time and then all mixed, while clients keep sending:
nothing accepted is lost, every resend carries the same bytes, and only what upstream refused
for good is dead-lettered, with its reason."""

from __future__ import annotations

import collections
import email.utils
import random
import time
from typing import Any

import aiohttp
import pytest

from tests.fakejitsu import Answer, FakeJitsu, Received, lost_ack, reset
from tests.faults.invariants import (
    Ledger,
    Load,
    drain_and_check,
    make_event,
    read_buffer,
    send,
)
from tests.procs import ProxyProcess, Spawn

pytestmark = pytest.mark.slow


async def started(spawn: Spawn, **overrides: Any) -> ProxyProcess:
    proxy = spawn(**overrides)
    proxy.start()
    await proxy.wait_ready()
    return proxy


def load(
    session: aiohttp.ClientSession,
    proxy: ProxyProcess,
    rng: random.Random,
    prefix: str,
    **options: Any,
) -> tuple[Ledger, Load]:
    """Four clients, paced, singles and batches of up to 10, into a fresh ledger."""
    ledger = Ledger()
    options = {"max_events": 2500, "max_batch": 10, "pause_s": 0.02, **options}
    return ledger, Load(session, proxy.url, ledger, rng, prefix, **options)


def answered(upstream: FakeJitsu, status: int) -> list[Received]:
    return [r for r in upstream.received if r.status == status]


def server_errors(upstream: FakeJitsu) -> int:
    return sum(1 for r in upstream.received if 500 <= r.status < 600)


@pytest.mark.timeout(90)
async def test_upstream_down_then_up(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    proxy = await started(spawn)
    ledger, clients = load(session, proxy, rng, "down")
    task = clients.start()
    await upstream.wait_for(lambda f: len(f.delivered) >= 20)
    await upstream.stop()  # connection refused from here on
    await proxy.wait_upstream_failing(session, failures=5)
    accepted_while_down = len(ledger.accepted)
    await upstream.start()
    await task
    assert len(ledger.accepted) > accepted_while_down, "the load should outlast the outage"
    await drain_and_check("upstream down, then up", proxy, upstream, session, ledger, seed=seed)


@pytest.mark.timeout(90)
async def test_5xx_storm_then_ok(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    proxy = await started(spawn)
    ledger, clients = load(session, proxy, rng, "5xx")
    task = clients.start()
    await upstream.wait_for(lambda f: len(f.delivered) >= 20)
    upstream.fault = lambda rec: Answer(rng.choice([500, 502, 503, 504]), {"error": "storm"})
    await upstream.wait_for(lambda f: server_errors(f) >= 30, timeout=30)
    upstream.fault = None
    await task
    await drain_and_check("5xx storm, then ok", proxy, upstream, session, ledger, seed=seed)


@pytest.mark.parametrize("form", ["seconds", "http-date"])
@pytest.mark.timeout(90)
async def test_429_with_retry_after(
    form: str,
    spawn: Spawn,
    upstream: FakeJitsu,
    session: aiohttp.ClientSession,
    rng: random.Random,
    seed: str,
) -> None:
    """Retry-After (1 s, or an HTTP-date 1-2 s ahead) is far above our 0.3 s backoff cap: once
    the burst of requests already in flight is answered, probes come no faster than it says."""

    def retry_after() -> str:
        if form == "seconds":
            return "1"
        return email.utils.formatdate(int(time.time()) + 2, usegmt=True)

    proxy = await started(spawn)
    ledger, clients = load(session, proxy, rng, f"429{form[0]}", max_events=1500)
    task = clients.start()
    await upstream.wait_for(lambda f: len(f.delivered) >= 20)
    upstream.fault = lambda rec: Answer(
        429, {"error": "rate limited"}, {"Retry-After": retry_after()}
    )
    await upstream.wait_for(lambda f: bool(answered(f, 429)))
    first = answered(upstream, 429)[0].at

    def probes(f: FakeJitsu) -> list[float]:
        return sorted(r.at for r in answered(f, 429) if r.at > first + 0.5)

    await upstream.wait_for(lambda f: len(probes(f)) >= 3, timeout=20)
    upstream.fault = None
    times = probes(upstream)
    burst_end = max(r.at for r in answered(upstream, 429) if r.at <= first + 0.5)
    gaps = [b - a for a, b in zip([burst_end, *times], times, strict=False)]
    assert min(gaps) >= 0.9, f"Retry-After not honoured: gaps {gaps}"
    await task
    await drain_and_check(
        f"429, Retry-After as {form}", proxy, upstream, session, ledger, seed=seed
    )


@pytest.mark.timeout(90)
async def test_slow_upstream(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    """Answers that take 50-500 ms, inside the 2 s timeout: no resend at all, and the forwarder
    keeps several requests in flight instead of waiting on each."""
    proxy = await started(spawn, upstream={"timeout_s": 2})
    upstream.fault = lambda rec: Answer(delay_s=rng.uniform(0.05, 0.5))
    ledger, clients = load(session, proxy, rng, "slow", max_events=2000)
    await clients.run()
    await upstream.wait_for(lambda f: len(f.delivered) >= 50, timeout=30)
    assert upstream.max_in_flight > 1
    await drain_and_check(
        "slow answers", proxy, upstream, session, ledger, seed=seed, max_duplicates=0
    )


@pytest.mark.timeout(90)
async def test_upstream_hangs_past_the_timeout(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    """A third of the requests hang for 2.5 s against a 1 s timeout: the proxy gives up on them
    (the fake sees the connection go and records them undelivered) and sends them again."""
    proxy = await started(spawn)
    hung: list[int] = []

    def hang(rec: Received) -> Answer | None:
        if rng.random() < 1 / 3:
            hung.append(1)
            return Answer(delay_s=2.5)
        return None

    ledger, clients = load(session, proxy, rng, "hang")
    task = clients.start()
    await upstream.wait_for(lambda f: len(f.delivered) >= 20)
    upstream.fault = hang
    await upstream.wait_for(lambda f: len(hung) >= 10, timeout=30)
    upstream.fault = None
    await task
    summary = await drain_and_check(
        "hangs past the timeout", proxy, upstream, session, ledger, seed=seed, max_duplicates=0
    )
    assert summary.duplicates == 0
    assert len(answered(upstream, 0)) >= 10, "the hung requests count as not delivered"


@pytest.mark.timeout(90)
async def test_reset_after_body(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    """The connection drops after upstream read the body: half the time upstream kept the
    request (only the 200 was lost), half the time not. Either way the proxy must send its
    events again, each byte for byte (alone or in another batch: upstream.coalesce)."""
    proxy = await started(spawn)
    kept: list[Received] = []

    def drop(rec: Received) -> Answer | None:
        roll = rng.random()
        if roll < 0.15:
            return reset()
        if roll < 0.3:
            kept.append(rec)
            return lost_ack()
        return None

    ledger, clients = load(session, proxy, rng, "reset")
    task = clients.start()
    await upstream.wait_for(lambda f: len(f.delivered) >= 20)
    upstream.fault = drop
    await upstream.wait_for(lambda f: len(kept) >= 10 and len(answered(f, 0)) >= 10, timeout=30)
    upstream.fault = None
    await task
    await drain_and_check("reset after body", proxy, upstream, session, ledger, seed=seed)
    # Each event of a request whose 200 was lost reached upstream again.
    copies = collections.Counter(mid for r in upstream.delivered for mid in r.message_ids)
    assert all(copies[mid] >= 2 for rec in kept for mid in rec.message_ids)


@pytest.mark.timeout(60)
async def test_one_event_rejected_among_good_ones(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, seed: str
) -> None:
    """A 400 for one single event and for one event of a batch: those two rows go to the
    dead-letter table with the status and upstream's reason, after one attempt; every other
    event is delivered."""
    proxy = await started(spawn)
    ledger = Ledger()
    requests: list[list[str]] = []
    n = 0
    for i in range(60):
        size = 1 if i % 2 == 0 else 5
        requests.append([f"rej-{n + j:06d}" for j in range(size)])
        n += size
    bad_single, bad_batch = requests[20], requests[31]
    upstream.reject.update({bad_single[0], bad_batch[2]})
    for ids in requests:
        assert await send(session, proxy.url, ledger, [make_event(i) for i in ids])
    await drain_and_check(
        "one event rejected (400)",
        proxy,
        upstream,
        session,
        ledger,
        seed=seed,
        expect_dead={*bad_single, *bad_batch},
        max_duplicates=0,
    )
    dead = read_buffer(proxy.buffer_db).dead
    assert sorted(row.message_ids for row in dead) == sorted([bad_single, bad_batch])
    for row in dead:
        assert row.status == 400
        assert row.reason is not None and "rejected by test" in row.reason
        assert row.attempts == 1
    assert len(answered(upstream, 400)) == 2, "a permanent rejection is not retried"


@pytest.mark.timeout(120)
async def test_mixed_faults(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, rng: random.Random, seed: str
) -> None:
    """Every fault at once, drawn per request, plus an outage and one rejected event."""
    proxy = await started(spawn)
    rejected = "mixed-000100"
    upstream.reject.add(rejected)
    chosen: collections.Counter[str] = collections.Counter()

    def chaos(rec: Received) -> Answer | None:
        if rejected in rec.message_ids:
            return None
        roll = rng.random()
        for limit, name, answer in (
            (0.50, "ok", None),
            (0.60, "5xx", Answer(rng.choice([500, 502, 503, 504]), {"error": "storm"})),
            (0.65, "429", Answer(429, {}, {"Retry-After": rng.choice(["0", "1"])})),
            (0.75, "slow", Answer(delay_s=rng.uniform(0.1, 0.6))),
            (0.80, "hang", Answer(delay_s=2.0)),
            (0.90, "reset", reset()),
            (1.00, "lost_ack", lost_ack()),
        ):
            if roll < limit:
                chosen[name] += 1
                return answer
        return None

    ledger, clients = load(session, proxy, rng, "mixed", max_events=3000)
    upstream.fault = chaos
    task = clients.start()
    await upstream.wait_for(lambda f: len(f.received) >= 100, timeout=30)
    await upstream.stop()
    await proxy.wait_upstream_failing(session, failures=3)
    await upstream.start()
    await task
    await drain_and_check(
        "mixed faults + outage",
        proxy,
        upstream,
        session,
        ledger,
        seed=seed,
        expect_dead=ledger.row_of(rejected),
    )
    assert all(chosen[name] for name in ("5xx", "429", "slow", "hang", "reset", "lost_ack"))
