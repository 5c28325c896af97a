"""A real fake Jitsu ingest on loopback: records every request and fails on command."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import re
import ssl
import time
import uuid
from collections.abc import Callable, Hashable
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
    # Every query pair as sent, repeats included (`query` keeps the first of each name).
    query_pairs: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # messageIds of a batch's events that its per-event answer named as not taken.
    not_taken: set[Any] = dataclasses.field(default_factory=set)

    def json(self) -> Any:
        return json.loads(self.body)

    @functools.cached_property
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
    # Read the whole body, then drop the connection without an answer. The request is recorded
    # with `status`: 0 when upstream did not take it, 200 when it did and only the ack was lost.
    reset: bool = False
    # Answer only once the test sets this event.
    hold: asyncio.Event | None = None
    # A plain-text or HTML body instead of JSON (an ingress, a load balancer, a portal).
    text: str | None = None
    content_type: str = "text/plain"


def reset() -> Answer:
    """Ambiguous for the sender, and upstream did not keep the request."""
    return Answer(0, reset=True)


def lost_ack() -> Answer:
    """Upstream kept the request (it counts as delivered), but its 200 never arrived."""
    return Answer(200, reset=True)


# Given the request, an Answer to fail it with, or None to answer normally.
Fault = Callable[[Received], Answer | None]
# Given a batch event's messageId, Jitsu's public error for that event, or None to take it.
EventError = Callable[[Any], str | None]

# Jitsu's messageId clean-up for its batch answer (ingest/router.go messageIdUnsupportedChars,
# ShortenString 64), written here apart from the proxy's own so that a test compares the two.
_UNSUPPORTED = re.compile(r"[^a-zA-Z0-9._-]")
NO_DESTINATIONS = "no destinations found for stream"
NGINX_413 = "<html><head><title>413 Request Entity Too Large</title></head></html>"


# Stands in for jitsu-js's p.js: what matters is the hard-coded event path.
SCRIPT = (
    b"(function(){var host=new URL(document.currentScript.src).origin;"
    b"function url(m,s2s){return s2s?host+'/api/s/s2s/'+m:host+'/api/s/'+m}"
    b"window.__jitsuTest={url:url};})();\n"
)


# Stands in for Jitsu's classic lib.js (ingest/router_classic_handler.go, sLibJs): it posts to
# the classic routes of the host it came from.
CLASSIC_SCRIPT = (
    b"!function(){var h=document.currentScript.src.replace('/s/lib.js','');"
    b"window.__jitsuClassic={url:h+'/api/v1/event?token='};}();\n"
)


class FakeJitsu:
    """`script` answers the next requests in order; `fault` may then fail any request;
    `reject` answers 400 for chosen messageIds; `hang` never answers. Everything else gets
    200 {"ok": true}. A request whose sender went away before the answer (hang, timeout, kill)
    is recorded with status 0: it was not delivered.

    `event_error` answers a batch event by event as Jitsu's batch handler does (200 with
    `errors` for the events it names); `max_batch_events` / `max_body_bytes` make an ingress in
    front of it answer 413 to larger requests."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        # With a context: an https upstream (its certificate, and mTLS if the context asks).
        self.ssl_context = ssl_context
        self.received: list[Received] = []
        self.script: collections.deque[Answer] = collections.deque()
        self.fault: Fault | None = None
        self.reject: set[str] = set()
        self.event_error: EventError | None = None
        self.event_delay_s = 0.0  # how long a per-event answer takes
        self.max_batch_events: int | None = None
        self.max_body_bytes: int | None = None
        self.hang = False
        # messageIds of every 2xx-recorded request, kept as they arrive (cheap to wait on).
        self.delivered_set: set[str] = set()
        # Every request as soon as its body is read, answered or not yet.
        self.arrived: list[Received] = []
        # GET /p.js: what it serves, how often it was asked, and whether it fails.
        self.script_body = SCRIPT
        self.script_version = 1
        self.script_fetches = 0
        self.script_status = 200
        # GET /s/lib.js, the classic tracker: served apart, and counted, like /p.js.
        self.classic_script_body = CLASSIC_SCRIPT
        self.classic_script_fetches = 0
        self.classic_script_status = 200
        self.port = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        # The tracking script lives apart from the events: fetching it is not an event.
        app.router.add_get("/p.js", self._serve_script)
        app.router.add_get("/s/lib.js", self._serve_classic_script)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Go down: the port refuses connections until start() again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve_script(self, request: web.Request) -> web.StreamResponse:
        self.script_fetches += 1
        if self.script_status != 200:
            return web.Response(status=self.script_status, text="script unavailable")
        etag = f'"v{self.script_version}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            body=self.script_body,
            headers={"ETag": etag, "Cache-Control": "public, max-age=120"},
            content_type="application/javascript",
        )

    async def _serve_classic_script(self, request: web.Request) -> web.StreamResponse:
        self.classic_script_fetches += 1
        if self.classic_script_status != 200:
            return web.Response(status=self.classic_script_status, text="script unavailable")
        return web.Response(
            body=self.classic_script_body,
            headers={"ETag": '"11a64df551425fcc55e4d42a148795d9f25f89d4"'},
            content_type="application/javascript",
        )

    def set_script(self, body: bytes) -> None:
        self.script_body = body
        self.script_version += 1

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
                query_pairs=list(request.query.items()),
            )
            if request.content_length is not None and len(body) < request.content_length:
                # Cut off mid-body (say, by our own stop()): nothing upstream could take.
                await self._record(rec, 0)
                return web.Response(status=499)
            answer = self._choose(rec)
            async with self._changed:
                self.arrived.append(rec)
                self._changed.notify_all()
            try:
                while self.hang and _connected(request):
                    await asyncio.sleep(0.02)
                if answer.delay_s:
                    await asyncio.sleep(answer.delay_s)
                if answer.hold is not None:
                    await answer.hold.wait()
            except asyncio.CancelledError:
                await self._record(rec, 0)
                raise
            if not _connected(request):
                # The sender gave up (timeout, kill -9) before hearing anything.
                await self._record(rec, 0)
                return web.Response(status=499)
            await self._record(rec, answer.status)
            if answer.reset:
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=499)
            if answer.text is not None:
                return web.Response(
                    text=answer.text,
                    status=answer.status,
                    headers=answer.headers,
                    content_type=answer.content_type,
                )
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        finally:
            self.in_flight -= 1

    async def _record(self, rec: Received, status: int) -> None:
        rec.status = status
        if 200 <= status < 300:
            try:
                self.delivered_set.update(set(rec.message_ids) - rec.not_taken)
            except (ValueError, AttributeError, TypeError):  # not JSON, or odd messageIds
                pass
        async with self._changed:
            self.received.append(rec)
            self._changed.notify_all()

    def _choose(self, rec: Received) -> Answer:
        if self.script:
            return self.script.popleft()
        too_many = self.max_batch_events is not None and len(_batch(rec)) > self.max_batch_events
        if too_many or (self.max_body_bytes is not None and len(rec.body) > self.max_body_bytes):
            return Answer(413, text=NGINX_413, content_type="text/html")
        if self.fault is not None:
            answer = self.fault(rec)
            if answer is not None:
                return answer
        if self.reject:
            try:
                ids = set(rec.message_ids)
            except (ValueError, AttributeError, TypeError):
                ids = set()
            if ids & self.reject:
                return Answer(400, {"error": "event error: rejected by test"})
        if self.event_error is not None and _batch(rec):
            return self._per_event(rec, self.event_error)
        return Answer()

    def _per_event(self, rec: Received, event_error: EventError) -> Answer:
        """Jitsu's batch answer (router_batch_handler.go): every event is tried; an error is
        listed under the id Jitsu gives the event; "no destinations" is listed but not a
        failure for the sender."""
        batch = _batch(rec)
        errors = []
        ok = 0
        for event in batch:
            mid = event.get("messageId") if isinstance(event, dict) else None
            if isinstance(mid, str) and mid:
                jid = _UNSUPPORTED.sub("_", mid)[:64]
            else:
                jid = str(uuid.uuid4())
            error = event_error(mid)
            if error is None:
                ok += 1
                continue
            errors.append(f"Message ID: {jid}: {error}")
            if not error.startswith(NO_DESTINATIONS) and isinstance(mid, Hashable):
                rec.not_taken.add(mid)
        body: dict[str, Any] = {"ok": not errors, "receivedEvents": len(batch), "okEvents": ok}
        if errors:
            body["errors"] = errors
        return Answer(200, body, delay_s=self.event_delay_s)

    def taken_ids(self) -> list[str]:
        """messageIds of every event upstream took, in order, repeats included: as
        delivered_ids(), without the events a per-event answer named as not taken."""
        return [mid for r in self.delivered for mid in r.message_ids if mid not in r.not_taken]

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


def _batch(rec: Received) -> list[Any]:
    """The events of a batch request, [] for anything else."""
    try:
        payload = rec.json()
    except ValueError:
        return []
    batch = payload.get("batch") if isinstance(payload, dict) else None
    return batch if isinstance(batch, list) else []


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()
