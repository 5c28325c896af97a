"""HTTP handlers: Jitsu's ingest routes, CORS preflights, and the proxy's own endpoints.

A handler validates, normalises auth, builds the envelope and waits for the buffer's commit
before it answers 2xx. Errors are raised as IngestError / buffer errors and turned into JSON
answers by the error middleware in `app`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import hdrs, web

from proxy import envelope as env
from proxy.auth import WriteKey, find_write_key
from proxy.clientip import resolve_client_ip
from proxy.errors import IngestError, RateLimitedError
from proxy.metrics import CONTENT_TYPE
from proxy.state import APP_STATE, BROWSER_ROUTE, EVENT_COUNT, KEY_ID, AppState

# Jitsu's batch route and its aliases for Segment libraries (research notes §1).
BATCH_PATHS = ("/v1/batch", "/v1/b", "/v1/batch/b", "/batch", "/b", "/batch/b", "/api/s/s2s/batch")
SINGLE_PATHS = ("/api/s/{type}", "/api/s/s2s/{type}")

CORS_ALLOW_HEADERS = (
    "x-enable-debug, x-write-key, authorization, content-type, x-ip-policy, cache-control, "
    "x-jitsu-custom"
)


def cors_headers(origin: str | None) -> dict[str, str]:
    """Jitsu's CORS answer: echo the Origin, allow credentials, a fixed header list."""
    return {
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin or "*",
        hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET,POST,HEAD,OPTIONS",
        hdrs.ACCESS_CONTROL_ALLOW_HEADERS: CORS_ALLOW_HEADERS,
        hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS: "true",
        hdrs.ACCESS_CONTROL_MAX_AGE: "86400",
    }


def json_response(payload: dict[str, Any], status: int = 200, **kw: Any) -> web.Response:
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        **kw,
    )


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=200, headers=cors_headers(request.headers.get(hdrs.ORIGIN)))


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing (413) before reading more than `limit` bytes, and (408) a
    client that takes longer than `server.body_timeout_s` to send it."""
    timeout = request.app[APP_STATE].config.server.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await _read_capped(request, limit)
    except TimeoutError:
        raise IngestError(
            f"request body not received within {timeout:g} s", status=408, browser_ok=False
        ) from None


async def _read_capped(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise IngestError(
            f"request body too large: {length} > {limit} bytes", status=413, browser_ok=False
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise IngestError(
                f"request body too large: more than {limit} bytes", status=413, browser_ok=False
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _client_ip(request: web.Request, state: AppState) -> str:
    return resolve_client_ip(request.remote, request.headers, state.trusted_proxies)


async def _commit(request: web.Request, state: AppState, envelope: env.Envelope) -> None:
    await state.buffer.append([envelope])
    state.metrics.events_accepted.inc(envelope.events)
    request[EVENT_COUNT] = envelope.events


async def ingest_single(request: web.Request) -> web.Response:
    """POST /api/s/{type} and /api/s/s2s/{type}: one event, forwarded to the same path."""
    state = request.app[APP_STATE]
    s2s = request.path.startswith("/api/s/s2s/")
    request[BROWSER_ROUTE] = not s2s
    limits = state.config.limits
    env.check_content_type(request.headers.get(hdrs.CONTENT_TYPE, ""))
    client_ip = _client_ip(request, state)
    _limit_ip(state, client_ip)
    key = find_write_key(request.headers, request.query)
    _require_key(request, key, s2s)
    _admit_key(state, key)
    body = await _read_body(request, limits.max_request_bytes)
    # Jitsu does not inflate single-event bodies; a gzip one fails to parse there and here.
    raw, _message_id = env.parse_single(body, request.match_info["type"], limits.max_event_bytes)
    envelope = env.build_envelope(
        env.forward_path(request.path, request.query),
        env.forward_headers(request.headers, key, client_ip),
        raw,
        1,
        key,
    )
    await _commit(request, state, envelope)
    return json_response({"ok": True})


async def ingest_batch(request: web.Request) -> web.Response:
    """POST /v1/batch and aliases: a Segment-style batch, forwarded as one batch."""
    state = request.app[APP_STATE]
    request[BROWSER_ROUTE] = False
    limits = state.config.limits
    env.check_content_type(request.headers.get(hdrs.CONTENT_TYPE, ""))
    client_ip = _client_ip(request, state)
    _limit_ip(state, client_ip)
    # Authorization / X-Write-Key / ?writekey= come first, and a bad Authorization fails
    # before the body is read, as in Jitsu.
    key = find_write_key(request.headers, request.query)
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
    gzipped = "gzip" in encoding.lower()
    limit = (
        max(limits.max_request_bytes, limits.max_decompressed_bytes)
        if gzipped
        else limits.max_request_bytes
    )
    body = await _read_body(request, limit)
    if gzipped and body[:2] == b"\x1f\x8b":
        body = env.decompress(body, encoding, limits.max_decompressed_bytes)
    payload = env.parse_batch_payload(body)
    if key is None:
        key = find_write_key({}, {}, payload.get("writeKey"))
    _require_key(request, key, True)
    _admit_key(state, key)
    result = env.filter_batch(payload, limits.max_event_bytes)
    answer: dict[str, Any] = {
        "ok": not result.errors,
        "okEvents": result.ok_events,
        "receivedEvents": result.received,
    }
    if result.errors:
        answer["errors"] = result.errors
        state.metrics.events_refused.labels("invalid_event").inc(len(result.errors))
    if result.ok_events:
        raw = env.encode_batch(result.payload)
        envelope = env.build_envelope(
            env.forward_path(request.path, request.query),
            env.forward_headers(request.headers, key, client_ip),
            raw,
            result.ok_events,
            key,
        )
        await _commit(request, state, envelope)
    return json_response(answer)


def _require_key(request: web.Request, key: WriteKey | None, strict: bool) -> None:
    """No key at all: s2s and batch routes answer 401 as Jitsu does. A browser route goes on:
    Jitsu may still find the stream (sole stream), and will say so if it cannot."""
    if key is not None:
        request[KEY_ID] = key.key_id
        return
    if strict:
        raise IngestError(
            "stream not found: for: [writeKey: ][ingestType: writeKey]: write key is required",
            status=401,
        )


def _limit_ip(state: AppState, client_ip: str) -> None:
    wait = state.ip_limits.take(client_ip)
    if wait:
        state.metrics.events_refused.labels("rate_limited").inc()
        raise RateLimitedError("client IP", wait)


def _admit_key(state: AppState, key: WriteKey | None) -> None:
    """The optional allowlist and per-key rate limit. An unknown key is answered as Jitsu
    answers one (200 with the error on browser routes, 401 elsewhere) and goes no further."""
    allowed = state.config.security.allowed_key_ids
    if allowed and (key is None or key.public_id not in allowed):
        state.metrics.events_refused.labels("unknown_key").inc()
        shown = key.key_id + ":***" if key is not None else ""
        raise IngestError(
            f"stream not found: for: [writeKey: {shown}][ingestType: writeKey]", status=401
        )
    if key is not None:
        wait = state.key_limits.take(key.public_id)
        if wait:
            state.metrics.events_refused.labels("rate_limited").inc()
            raise RateLimitedError("write key", wait)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "pass"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    buf = state.buffer
    ready = buf.writable and not state.draining
    # "warn": serving, but something needs a person (a corrupt buffer was moved aside).
    status = "fail" if not ready else "warn" if buf.quarantined else "pass"
    body: dict[str, Any] = {
        "status": status,
        "buffer": {
            "writable": buf.writable,
            "rows": buf.rows,
            "events": buf.events,
            "bytes": buf.bytes,
            "max_bytes": buf.max_bytes,
            "dead_letter_rows": buf.dead_rows,
            "fsync": buf.fsync,
            "sqlite": buf.sqlite_settings,
            "last_error": buf.last_error,
            "quarantined": buf.quarantined,
        },
        "draining": state.draining,
    }
    if state.forwarder is not None:
        body["upstream"] = state.forwarder.state()
    return json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[APP_STATE].metrics.render(), headers={hdrs.CONTENT_TYPE: CONTENT_TYPE}
    )


def add_routes(app: web.Application) -> None:
    # Batch first: /api/s/s2s/{type} would otherwise swallow /api/s/s2s/batch.
    for path in BATCH_PATHS:
        app.router.add_route("POST", path, ingest_batch)
        app.router.add_route("OPTIONS", path, preflight)
    for path in SINGLE_PATHS:
        app.router.add_route("POST", path, ingest_single)
        app.router.add_route("OPTIONS", path, preflight)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
