"""Shared fixtures: a real fake Jitsu on loopback and the proxy app built by the real factory."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app, server_options
from proxy.config import Config, build_config
from proxy.logs import configure_logging
from proxy.state import APP_STATE, AppState
from tests.fakejitsu import FakeJitsu
from tests.procs import ProxyProcess, Spawn, merge

configure_logging("debug", "json", cache=False)  # the `logs` fixture reconfigures per test

ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def test_config(tmp_path: Path, upstream_url: str, **overrides: Any) -> Config:
    """Fast retries so scenarios run in a moment; everything else at its default."""
    raw = {
        "upstream": {
            "url": upstream_url,
            "timeout_s": 5,
            "retry": {"initial_backoff_s": 0.02, "max_backoff_s": 0.2},
        },
        "buffer": {"path": str(tmp_path / "buffer"), "min_free_bytes": 0},
    }
    return build_config(merge(raw, overrides), environ={})


test_config.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """The proxy's structlog lines, rendered as in production, into a buffer for this test."""
    previous = structlog.get_config()
    sink = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))
    try:
        yield sink
    finally:
        structlog.configure(**previous)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeJitsu]:
    fake = FakeJitsu()
    await fake.start()
    yield fake
    fake.hang = False
    await fake.stop()


@pytest.fixture
def make_proxy(aiohttp_client: Any, tmp_path: Path, upstream: FakeJitsu) -> ProxyFactory:
    async def factory(**overrides: Any) -> TestClient[Any, Any]:
        config = test_config(tmp_path, upstream.url, **overrides)
        server = TestServer(create_app(config))
        await server.start_server(**server_options(config))
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return factory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> TestClient[Any, Any]:
    return await make_proxy()


async def until(predicate: Callable[[], bool], timeout: float = 15) -> None:
    """Wait until `predicate()` holds, checking every few ms; fail after `timeout` s. The one
    poller for conditions no event signals (the fake upstream's own waits come first)."""

    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(loop(), timeout)


def state(proxy: TestClient[Any, Any]) -> AppState:
    """The app state of a proxy built by `make_proxy`."""
    return proxy.server.app[APP_STATE]  # type: ignore[union-attr]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def spawn(tmp_path: Path, upstream: FakeJitsu) -> Iterator[Spawn]:
    """The proxy as a child process on this test's directory; it and its workers are killed
    at the end."""
    procs: list[ProxyProcess] = []

    def factory(**overrides: Any) -> ProxyProcess:
        p = ProxyProcess(tmp_path, upstream.url, **overrides)
        procs.append(p)
        return p

    yield factory
    for p in procs:
        p.stop()
