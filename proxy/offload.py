"""Runs the CPU-heavy part of large requests (inflating, parsing, validating a big batch) in a
worker process, so that one request never holds the event loop: a few tens of milliseconds of
JSON parsing already delay every other client, health checks and SIGTERM (issue 7, finding 5).
Small bodies are handled inline, where a process hop would cost more than it saves."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import structlog

from proxy.errors import OverloadedError

log = structlog.get_logger("proxy.offload")

T = TypeVar("T")


class Offload:
    def __init__(self, inline_bytes: int, workers: int = 1) -> None:
        self.inline_bytes = inline_bytes
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def run(self, size: int, fn: Callable[..., T], *args: Any, inline: bool = True) -> T:
        """`fn(*args)` inline when `size` is small and `inline` allows, else in the worker."""
        if inline and size <= self.inline_bytes:
            return fn(*args)
        if self._pool is None:
            # spawn, not fork: this process has threads (the buffer's), and a forked child
            # would inherit their locks in whatever state they were.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(
                pool, functools.partial(fn, *args)
            )
        except BrokenProcessPool:
            # The worker died (out of memory, killed): the next request gets a new one.
            log.error("parser_worker_died", size=size)
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise OverloadedError("cannot parse this request right now") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
