"""Runs the CPU-heavy part of large requests (inflating, parsing, validating a big batch) in a
worker process, so that one request never holds the event loop: a few tens of milliseconds of
JSON parsing already delay every other client, health checks and SIGTERM (issue 7, finding 5).
Small bodies are handled inline, where a process hop would cost more than it saves."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import structlog

from proxy.errors import OverloadedError

log = structlog.get_logger("proxy.offload")

T = TypeVar("T")


# A gzip body is inflated inline only when this much smaller than inline_bytes: deflate
# expands at most about 1 000 times, so what it can become stays small too.
GZIP_INLINE_FACTOR = 64


class Offload:
    def __init__(self, inline_bytes: int, max_pending: int = 8, workers: int = 1) -> None:
        self.inline_bytes = inline_bytes
        self.max_pending = max_pending
        self.workers = workers
        self.pending = 0
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def run(self, size: int, fn: Callable[..., T], *args: Any, gzipped: bool = False) -> T:
        """`fn(*args)` inline when the body (`size` bytes) is small, else in the worker. At most
        `max_pending` requests wait for the worker; more are answered 503 at once, so that a
        flood of large bodies neither piles up in memory nor delays the small ones for long."""
        limit = self.inline_bytes // GZIP_INLINE_FACTOR if gzipped else self.inline_bytes
        if size <= limit:
            return fn(*args)
        if self.pending >= self.max_pending:
            raise OverloadedError("too many large requests being parsed; try again shortly")
        self.pending += 1
        try:
            return await self._in_worker(size, fn, *args)
        finally:
            self.pending -= 1

    async def _in_worker(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            # spawn, not fork: this process has threads (the buffer's), and a forked child
            # would inherit their locks in whatever state they were.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_follow_parent,
                initargs=(os.getpid(),),
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


def _follow_parent(parent: int) -> None:
    """In the worker: exit when the proxy is gone. After a kill -9 of the proxy nothing else
    ends the worker (it holds its own queue's write end, so it never sees EOF) and it would
    live on as an orphan, with the resource tracker it keeps open."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()
