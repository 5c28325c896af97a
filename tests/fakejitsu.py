"""A real fake Jitsu ingest on loopback: records every request and fails on command."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclasses.dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes
    at: float
    status: int = 0

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message_ids(self) -> list[str]:
        payload = self.json()
        if isinstance(payload, dict) and isinstance(payload.get("batch"), list):
            return [e.get("messageId") for e in payload["batch"]]
        return [payload.get("messageId")]


@dataclasses.dataclass
class Answer:
    status: int = 200
    body: Any = dataclasses.field(default_factory=lambda: {"ok": True})
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0


class FakeJitsu:
    """`script` answers the next requests in order; `reject` answers 400 for chosen messageIds;
    `hang` never answers. Everything else gets 200 {"ok": true}."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script: collections.deque[Answer] = collections.deque()
        self.reject: set[str] = set()
        self.hang = False
        self.port = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Go down: the port refuses connections until start() again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.read()
            rec = Received(
                request.method,
                request.path,
                dict(request.query),
                CIMultiDict(request.headers),
                body,
                time.monotonic(),
            )
            answer = self._choose(rec)
            if self.hang:
                await asyncio.sleep(3600)
            if answer.delay_s:
                await asyncio.sleep(answer.delay_s)
            rec.status = answer.status
            async with self._changed:
                self.received.append(rec)
                self._changed.notify_all()
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        finally:
            self.in_flight -= 1

    def _choose(self, rec: Received) -> Answer:
        if self.script:
            return self.script.popleft()
        if self.reject:
            try:
                ids = set(rec.message_ids)
            except (ValueError, AttributeError):
                ids = set()
            if ids & self.reject:
                return Answer(400, {"error": "event error: rejected by test"})
        return Answer()

    @property
    def delivered(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]

    def delivered_ids(self) -> list[str]:
        return [mid for r in self.delivered for mid in r.message_ids]

    async def wait_for(self, predicate: Callable[[FakeJitsu], bool], timeout: float = 10) -> None:
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        await asyncio.wait_for(_wait(), timeout)

    async def wait_delivered(self, count: int, timeout: float = 10) -> list[Received]:
        await self.wait_for(lambda f: len(f.delivered) >= count, timeout)
        return self.delivered
