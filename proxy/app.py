"""The app factory: the one place that knows every part and wires them in a safe order.

Lifetimes (cleanup_ctx): the buffer opens first and closes last; the upstream client session
sits between; the forwarder starts last and stops first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import hdrs, web
from prometheus_client import Counter

from proxy import classic, fleet, ops, routes
from proxy.backlog import BacklogWatch
from proxy.buffer import Buffer
from proxy.clientip import is_trusted, parse_networks, resolve_client_ip
from proxy.config import Config
from proxy.egress import Egress, build_egress
from proxy.egress import describe as describe_proxy
from proxy.errors import (
    BufferClosedError,
    BufferError_,
    BufferFullError,
    BufferLockedError,
    IngestError,
    OverloadedError,
    RateLimitedError,
)
from proxy.forwarder import Forwarder
from proxy.metrics import Metrics
from proxy.offload import Offload
from proxy.ratelimit import TokenBuckets
from proxy.refusals import KeyRefusals
from proxy.script import ScriptCache, ScriptUnavailableError
from proxy.shards import adopted_by, shard_dir
from proxy.state import APP_STATE, BROWSER_ROUTE, EVENT_COUNT, KEY_ID, Adoption, AppState

log = structlog.get_logger("proxy.access")
backlog_log = structlog.get_logger("proxy.backlog")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_of(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


def error_response(request: web.Request, exc: Exception) -> web.Response:
    """The only place exceptions become HTTP answers, always with a JSON body."""
    if isinstance(exc, IngestError):
        status = exc.status
        if request.get(BROWSER_ROUTE, False) and exc.browser_ok:
            status = 200  # Jitsu's browser routes answer 200 with the error (research §2.4)
        return routes.json_response({"error": exc.message}, status=status)
    if isinstance(exc, ScriptUnavailableError):
        return routes.json_response(
            {"error": str(exc)}, status=503, headers={hdrs.RETRY_AFTER: "5"}
        )
    if isinstance(exc, RateLimitedError):
        return routes.json_response(
            {"error": str(exc)},
            status=429,
            headers={hdrs.RETRY_AFTER: str(max(1, math.ceil(exc.retry_after_s)))},
        )
    if isinstance(exc, OverloadedError):
        return routes.json_response(
            {"error": str(exc)}, status=503, headers={hdrs.RETRY_AFTER: "5"}
        )
    if isinstance(exc, BufferFullError):
        return routes.json_response(
            {"error": str(exc)}, status=503, headers={hdrs.RETRY_AFTER: str(exc.retry_after_s)}
        )
    if isinstance(exc, BufferClosedError):
        return routes.json_response(
            {"error": "proxy is shutting down"}, status=503, headers={hdrs.RETRY_AFTER: "5"}
        )
    if isinstance(exc, BufferError_):
        log.error("buffer_unavailable", error=str(exc))
        return routes.json_response(
            {"error": "cannot store events right now"},
            status=503,
            headers={hdrs.RETRY_AFTER: "5"},
        )
    if isinstance(exc, web.HTTPException):
        headers = {k: v for k, v in exc.headers.items() if k == hdrs.ALLOW}
        return routes.json_response(
            {"error": (exc.reason or "error").lower()}, status=exc.status, headers=headers
        )
    log.exception("unhandled_error")
    return routes.json_response({"error": "internal error"}, status=500)


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, JSON errors, CORS on ingest routes, and one canonical log line per request."""
    started = time.perf_counter()
    # Not os.urandom: a system call per request, during which the buffer's thread takes the
    # GIL and the loop waits to get it back (issue 9 profile). An id needs no secrecy.
    structlog.contextvars.bind_contextvars(request_id=f"{random.getrandbits(64):016x}")
    state = request.app[APP_STATE]
    route = _route_of(request)
    public = route in state.public_routes
    status = 500  # what the log says if the handler never finishes (cancelled)
    try:
        try:
            _check_listener(request, state, route)
            response = await handler(request)
        except Exception as exc:
            if BROWSER_ROUTE in request:  # an event route: its refusals are counted by why
                routes.count_refusal(state, request, exc)
            response = error_response(request, exc)
        status = response.status
        origin = request.headers.get(hdrs.ORIGIN)
        if public or status == 405:
            # A public route's answer echoes the Origin, or lacks CORS headers when none was
            # sent: a shared cache must key it by Origin (issue 7, finding 11). A 405 is a
            # public path's answer to another method (cacheable by default) with no route.
            _vary(response, hdrs.ORIGIN)
            if origin and request.method != hdrs.METH_OPTIONS:
                response.headers.update(routes.cors_headers(origin))
        return response
    finally:
        if public and request.method == hdrs.METH_POST:
            _requests_counter(state.metrics.requests, route, status).inc()
        log.info(
            "request",
            method=request.method,
            route=route,
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            events=request.get(EVENT_COUNT, 0),
            key_id=request.get(KEY_ID, ""),
        )
        structlog.contextvars.unbind_contextvars("request_id")


@functools.lru_cache(maxsize=1024)
def _requests_counter(counter: Counter, route: str, status: int) -> Counter:
    """The counter of one (route, status): labels() costs a lock and some 3 µs per request."""
    return counter.labels(route, str(status))


# What may reveal the buffer, the upstream state and the traffic (issue 7, finding 11b).
ADMIN_ROUTES = frozenset({"/readyz", "/metrics"})
# The admin listener serves these and nothing else: it is not a second door for events.
ADMIN_LISTENER_ROUTES = ADMIN_ROUTES | {"/healthz"}


def _check_listener(request: web.Request, state: AppState, route: str) -> None:
    """With server.admin_port, the admin endpoints answer there only; without, only to the
    clients in server.admin_allow. Refused as an unknown path is, with 404."""
    server = state.config.server
    if server.admin_port:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        on_admin = isinstance(sockname, tuple) and sockname[1] == server.admin_port
        if on_admin and route not in ADMIN_LISTENER_ROUTES:
            raise web.HTTPNotFound()
        if not on_admin and route in ADMIN_ROUTES:
            raise web.HTTPNotFound()
    elif route in ADMIN_ROUTES and state.admin_allow:
        client = resolve_client_ip(
            request.remote, request.headers, state.trusted_proxies, server.client_ip_headers
        )
        if not is_trusted(client, state.admin_allow):
            raise web.HTTPNotFound()


def _vary(response: web.StreamResponse, name: str) -> None:
    """Add `name` to the answer's Vary, keeping what the handler put there."""
    if hdrs.VARY not in response.headers:
        response.headers[hdrs.VARY] = name
        return
    present = [t.strip() for t in response.headers.get(hdrs.VARY, "").split(",") if t.strip()]
    if name.lower() not in {t.lower() for t in present} and "*" not in present:
        response.headers[hdrs.VARY] = ", ".join([*present, name])


def server_options(config: Config) -> dict[str, Any]:
    """Keyword arguments for aiohttp's runner, the same in production and in tests."""
    return {
        # Handlers inflate gzip bodies themselves, with a cap (decompression bombs).
        "auto_decompress": False,
        # aiohttp arms this at connection start too: it bounds slow headers as well as idling.
        "keepalive_timeout": config.server.idle_timeout_s,
        # After a 408 aiohttp would go on reading the slow body for 10 s; let it go sooner.
        "lingering_time": min(2.0, config.server.body_timeout_s),
        "max_headers": config.server.max_headers,
        "max_line_size": config.server.max_header_bytes,
        "max_field_size": config.server.max_header_bytes,
    }


def create_app(config: Config, worker: fleet.Worker | None = None) -> web.Application:
    """The proxy's app; `worker`: which of several worker processes this is (None: the only
    one). Each worker sends from a shard of its own and takes a share of buffer.max_bytes."""
    # Bodies are read and capped by the handlers themselves; aiohttp's own cap must not be lower.
    client_max = config.limits.max_request_bytes + 1
    app = web.Application(middlewares=[edge_middleware], client_max_size=client_max)
    metrics = Metrics()
    base = Path(config.buffer.path).absolute()
    index, count = (worker.index, worker.count) if worker is not None else (0, 1)
    buffer = Buffer.from_config(
        config.buffer,
        shard_dir(base, index),
        max_bytes=config.buffer.max_bytes // count,
        # A restarted worker's predecessor may still be draining the shard.
        lock_wait_s=config.server.shutdown_timeout_s + 5 if worker is not None else 0.0,
    )
    state = AppState(
        config=config,
        metrics=metrics,
        trusted_proxies=parse_networks(config.server.trusted_proxies),
        admin_allow=parse_networks(config.server.admin_allow),
        drop_headers=frozenset(name.lower() for name in config.upstream.drop_headers),
        buffer=buffer,
        ip_limits=TokenBuckets(
            config.security.rate_limit.per_ip_rps, config.security.rate_limit.per_ip_burst
        ),
        key_limits=TokenBuckets(
            config.security.rate_limit.per_key_rps, config.security.rate_limit.per_key_burst
        ),
        offload=Offload(config.limits.inline_parse_bytes, config.limits.max_parse_queue),
        refusals=KeyRefusals(config.upstream.key_refusal_ttl_s),
        egress=_egress(config),
        buffer_base=base,
        fleet=fleet.Fleet(base, worker) if worker is not None and count > 1 else None,
        orphans=adopted_by(base, index, count),
    )
    app[APP_STATE] = state
    metrics.gauges(
        {
            "proxy_buffer_rows": (
                "Upstream requests waiting in the buffer",
                lambda: sum(b.rows for b in state.buffers()),
            ),
            "proxy_buffer_events": (
                "Events waiting in the buffer",
                lambda: sum(b.events for b in state.buffers()),
            ),
            "proxy_buffer_bytes": (
                "Bytes waiting in the buffer",
                lambda: sum(b.bytes for b in state.buffers()),
            ),
            "proxy_buffer_max_bytes": ("Configured buffer bound", lambda: buffer.max_bytes),
            "proxy_buffer_writable": (
                "1 while the buffer accepts writes",
                lambda: float(buffer.writable),
            ),
            "proxy_dead_letter_rows": (
                "Rows in the dead-letter store",
                lambda: sum(b.dead_rows for b in state.buffers()),
            ),
            "proxy_buffer_quarantined": (
                "Corrupt buffer files moved aside since start",
                lambda: sum(len(b.quarantined) for b in state.buffers()),
            ),
            "proxy_upstream_up": (
                "0 while upstream is failing",
                lambda: 0.0 if state.forwarder is not None and state.forwarder.failing else 1.0,
            ),
            "proxy_upstream_redirected": (
                "1 while upstream answers with redirects (not followed: upstream.url is wrong)",
                lambda: float(state.forwarder is not None and bool(state.forwarder.redirected_to)),
            ),
            "proxy_rows_retrying_alone": (
                "Rows parked after failing while others were delivered",
                lambda: len(state.forwarder.parked) if state.forwarder is not None else 0,
            ),
            "proxy_dead_letter_bytes": (
                "Bytes in the dead-letter store",
                lambda: buffer.dead_bytes,
            ),
            "proxy_dead_letter_max_bytes": (
                "Configured dead-letter bound",
                lambda: buffer.max_dead_letter_bytes,
            ),
            "proxy_key_refusals_remembered": (
                "Keys upstream refused (stream not found), answered at the edge for a while",
                lambda: len(state.refusals),
            ),
            "proxy_buffer_oldest_event_age_seconds": (
                "How long the event at the head of the send queue has waited (0: none waits)",
                lambda: max(b.oldest_age_s(time.time()) for b in state.buffers()),
            ),
            "proxy_upstream_backoff_seconds": (
                "The wait before the last retry while upstream fails; 0 while it works",
                lambda: max((f.backoff_s for f in _forwarders(state)), default=0.0),
            ),
            "proxy_upstream_next_attempt_seconds": (
                "Seconds until the next attempt while upstream fails; 0 while it works",
                lambda: max((f.next_attempt_in_s() for f in _forwarders(state)), default=0.0),
            ),
            "proxy_upstream_consecutive_failures": (
                "Failed attempts in a row of the current outage; 0 while upstream works",
                lambda: max((f.failures for f in _forwarders(state)), default=0),
            ),
            "proxy_workers": (
                "Worker processes the proxy runs (server.workers)",
                lambda: worker.count if worker is not None else 1,
            ),
            "proxy_workers_reporting": (
                "Worker processes whose figures are in these totals fresh (each publishes twice"
                " a second); below proxy_workers, the totals are partly stale",
                lambda: 1.0,
            ),
            "proxy_buffer_fill_ratio": (
                "The fullest worker's buffer: bytes over its share of buffer.max_bytes (at 1,"
                " that worker's clients get 503)",
                lambda: buffer.bytes / buffer.max_bytes if buffer.max_bytes else 0.0,
            ),
            "proxy_workers_ready": (
                "Worker processes that can take events now (added up over the workers)",
                lambda: float(buffer.writable and not state.draining),
            ),
        }
    )
    metrics.counters(
        {
            "proxy_dead_letters_dropped": (
                "Dead-letter rows dropped, oldest first, to keep the store under its bound",
                lambda: buffer.dead_dropped_rows,
            ),
            "proxy_worker_restarts": (
                "Worker processes that exited and were restarted by the supervisor",
                lambda: fleet.read_restarts(base) if state.fleet is not None else 0,
            ),
        }
    )
    state.public_routes = routes.add_routes(app, config) | classic.add_routes(app, config)
    ops.add_routes(app, config)
    if routes.public_routes(config)[0]:
        origin = config.script.origin or config.upstream.url.rstrip("/") + "/p.js"
        state.script = ScriptCache(
            origin=origin,
            cache_dir=Path(config.buffer.path).absolute() / "script",
            event_prefix=config.routes.event_prefix,
            refresh_s=config.script.refresh_s,
            max_bytes=config.script.max_bytes,
            proxy=state.egress.proxy_for(origin),
            metrics=metrics,
        )
    if config.routes.jitsu_paths:
        # Jitsu serves the classic tracker itself (ingest/router_classic_handler.go,
        # ClassicScriptHandler); its event paths are the classic ones, served here as they are.
        state.classic_script = ScriptCache(
            origin=config.upstream.url.rstrip("/") + classic.CLASSIC_SCRIPT_PATH,
            cache_dir=Path(config.buffer.path).absolute() / "script",
            event_prefix="",
            refresh_s=config.script.refresh_s,
            max_bytes=config.script.max_bytes,
            name="lib.js",
            proxy=state.egress.proxy_for(config.upstream.url),
            metrics=metrics,
        )
    app.cleanup_ctx.append(_buffer_ctx)
    app.cleanup_ctx.append(_offload_ctx)
    app.cleanup_ctx.append(_script_ctx)
    app.cleanup_ctx.append(_fleet_ctx)
    app.cleanup_ctx.append(_forwarder_ctx)
    app.cleanup_ctx.append(_adoption_ctx)
    app.cleanup_ctx.append(_backlog_ctx)
    app.on_shutdown.append(_on_shutdown)
    return app


def _egress(config: Config) -> Egress:
    egress = build_egress(config.upstream, os.environ)
    proxy = egress.proxy_for(config.upstream.url)
    if proxy is not None:
        log.info("upstream_via_proxy", proxy=describe_proxy(proxy))
    return egress


async def _buffer_ctx(app: web.Application) -> AsyncIterator[None]:
    buffer = app[APP_STATE].buffer
    await buffer.open()
    yield
    await buffer.close()


async def _offload_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    app[APP_STATE].offload.close()


async def _script_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[APP_STATE]
    scripts = [s for s in (state.script, state.classic_script) if s is not None]
    if not scripts:
        yield
        return
    # The script comes from upstream (or script.origin) the way events go there: same TLS.
    connector = aiohttp.TCPConnector(ssl=state.egress.connector_ssl)
    async with aiohttp.ClientSession(connector=connector) as session:
        for script in scripts:
            await script.start(session)
        yield
        for script in scripts:
            await script.stop()


@contextlib.asynccontextmanager
async def _forwarding(state: AppState, buffer: Buffer) -> AsyncIterator[Forwarder]:
    """A forwarder sending from `buffer`, with an upstream session of its own, running while
    the block runs and stopped gracefully after it."""
    config = state.config
    forwarder = Forwarder(buffer, config.upstream, state.metrics, state.refusals)
    # Rows sent at once for waiting browsers must not queue behind the backlog for a socket.
    sync = config.upstream.sync_max_in_flight if config.upstream.sync_browser else 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=config.upstream.concurrency * 2 + sync,
            keepalive_timeout=30,
            ssl=state.egress.connector_ssl,
        ),
        # Resolved once, not per request as aiohttp's trust_env would (a thread hop each, and
        # ~/.netrc credentials added to requests that carry the client's own Authorization).
        proxy=state.egress.proxy_for(config.upstream.url),
        trace_configs=[forwarder.trace_config()],
        # The client's User-Agent goes upstream, or none: Jitsu stores it with the event, and
        # aiohttp's own ("Python/3.11 aiohttp/...") is no visitor's (issue 8). Jitsu keeps every
        # request header for functions (router.go buildIngestMessage): aiohttp's Accept and
        # Accept-Encoding would be stored there too, as if the visitor had sent them.
        skip_auto_headers=[hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING],
    ) as session:
        forwarder.start(session)
        try:
            yield forwarder
        finally:
            await forwarder.stop(grace_s=config.server.shutdown_timeout_s)


async def _forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[APP_STATE]
    async with _forwarding(state, state.buffer) as forwarder:
        state.forwarder = forwarder
        yield


async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    """Publish this worker's status and metrics for the others, all along and at the end."""
    state = app[APP_STATE]
    view = state.fleet
    if view is None:
        yield
        return
    view.take_over()

    async def loop() -> None:
        while True:
            try:
                ops.publish_report(state)
                view.everyone()  # keeps the last report of each in mind, should the files go
            except Exception:  # a bug here must not end the reports for good, silently
                log.exception("worker_report_loop_failed")
            await asyncio.sleep(fleet.PUBLISH_EVERY_S)

    task = asyncio.create_task(loop(), name="fleet-report")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    ops.publish_report(state)


async def _adoption_ctx(app: web.Application) -> AsyncIterator[None]:
    """Drain the shards of workers that no longer exist (fewer workers than last time)."""
    state = app[APP_STATE]
    tasks = [
        asyncio.create_task(_drain_orphan(state, path), name=f"adopt-{path.name}")
        for path in state.orphans
    ]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


# How often an adopted shard is checked for being empty, or its lock tried again.
ADOPTION_POLL_S = 1.0


async def _drain_orphan(state: AppState, path: Path) -> None:
    """Send everything left in another worker's shard, then close it. Its dead letters stay
    there, where the dead-letter tool finds them."""
    config = state.config
    name = str(path.relative_to(state.buffer_base))
    buffer = Buffer.from_config(config.buffer, path)
    while True:
        try:
            await buffer.open()
            break
        except BufferLockedError:
            # Its old worker is still draining it: try again later.
            await asyncio.sleep(ADOPTION_POLL_S)
        except BufferError_ as exc:
            log.error(
                "shard_unusable",
                shard=name,
                error=ops.relative_to_buffer(str(exc), state.buffer_base),
            )
            return
    adoption = Adoption(buffer)
    try:
        if buffer.rows:
            log.info("shard_adopted", shard=name, rows=buffer.rows, events=buffer.events)
            state.adopted.append(adoption)
            async with _forwarding(state, buffer) as forwarder:
                adoption.forwarder = forwarder
                while True:
                    if not (buffer.rows or forwarder.inflight):
                        break
                    await asyncio.sleep(ADOPTION_POLL_S)
            log.info("shard_drained", shard=name, dead_letter_rows=buffer.dead_rows)
    finally:
        if adoption in state.adopted:
            state.adopted.remove(adoption)
        await buffer.close()


def _forwarders(state: AppState) -> list[Forwarder]:
    """Every forwarder of this process: its own, and those of the shards it drains."""
    adopted = [a.forwarder for a in state.adopted if a.forwarder is not None]
    return [state.forwarder, *adopted] if state.forwarder is not None else adopted


# How often the backlog is held against its warning marks (buffer.warn_fill_ratio, warn_age_s).
BACKLOG_WATCH_EVERY_S = 1.0


async def _backlog_ctx(app: web.Application) -> AsyncIterator[None]:
    """Log once when the backlog passes a warning mark, once when it is back below."""
    state = app[APP_STATE]
    settings = state.config.buffer
    watch = BacklogWatch(settings.warn_fill_ratio, settings.warn_age_s)

    async def loop() -> None:
        while True:
            buffers = state.buffers()
            now = time.time()
            for notice in watch.observe(
                sum(b.bytes for b in buffers),
                state.buffer.max_bytes,
                max(b.oldest_age_s(now) for b in buffers),
            ):
                getattr(backlog_log, notice.level)(notice.event, **notice.fields)
            await asyncio.sleep(BACKLOG_WATCH_EVERY_S)

    task = asyncio.create_task(loop(), name="backlog-watch")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _on_shutdown(app: web.Application) -> None:
    app[APP_STATE].draining = True
