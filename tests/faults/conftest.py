"""Fixtures of the fault suite: the proxy as a child process with fast retries, a seeded RNG
whose seed is printed when a test fails, and the scenario table at the end of the session."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakejitsu import FakeJitsu
from tests.faults.invariants import RESULTS, Summary
from tests.procs import ProxyProcess, Spawn, merge

# One seed for the whole suite; each test draws from its own stream derived from it.
SEED = os.environ.get("FAULTS_SEED", "20260822")
SEED_KEY = pytest.StashKey[str]()
PROCS_KEY = pytest.StashKey[list[ProxyProcess]]()

# Retries compressed so that outages and storms last seconds, not minutes (research §2.2).
FAST: dict[str, Any] = {
    "upstream": {"timeout_s": 1, "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.3}},
    "log": {"format": "json", "level": "info"},
}


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> str:
    value = f"{SEED}/{request.node.name}"
    request.node.stash[SEED_KEY] = value
    return value


@pytest.fixture
def rng(seed: str) -> random.Random:
    return random.Random(seed)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A request to a proxy that stopped answering fails instead of holding a client forever.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


@pytest.fixture
def spawn(request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeJitsu) -> Iterator[Spawn]:
    """A ProxyProcess on this test's buffer directory, fast retries merged under `overrides`."""
    procs: list[ProxyProcess] = []
    request.node.stash[PROCS_KEY] = procs

    def factory(**overrides: Any) -> ProxyProcess:
        proxy = ProxyProcess(tmp_path, upstream.url, **merge(FAST, overrides))
        procs.append(proxy)
        return proxy

    yield factory
    upstream.fault = None
    for proxy in procs:
        proxy.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        seed = item.stash.get(SEED_KEY, None)
        if seed is not None:
            report.sections.append(
                ("fault seed", f"FAULTS_SEED={SEED} (this test's stream: {seed!r})")
            )
        for proxy in item.stash.get(PROCS_KEY, []):
            lines = [x for x in proxy.log_text().splitlines() if '"/readyz"' not in x]
            tail = "\n".join(lines[-40:])
            report.sections.append((f"proxy log tail ({proxy.log_path})", tail))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section(f"fault scenarios (FAULTS_SEED={SEED})")
    terminalreporter.write_line(Summary.header())
    for summary in RESULTS:
        terminalreporter.write_line(summary.row())
