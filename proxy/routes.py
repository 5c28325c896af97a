"""HTTP handlers: Jitsu's ingest routes, CORS preflights, and the proxy's own endpoints.

A handler validates, normalises auth, builds the envelope and waits for the buffer's commit
before it answers 2xx. Errors are raised as IngestError / buffer errors and turned into JSON
answers by the error middleware in `app`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from typing import Any

from aiohttp import hdrs, web

from proxy import cookies
from proxy import envelope as env
from proxy.auth import KeySource, WriteKey, find_write_key
from proxy.buffer import Row
from proxy.clientip import anonymize, is_trusted, resolve_client_ip
from proxy.config import Config
from proxy.errors import (
    BufferError_,
    IngestError,
    OverloadedError,
    RateLimitedError,
    refusal_reason,
)
from proxy.headers import MAX_UPSTREAM_HEADER_BYTES, ClientOrigin, forward_headers, header_bytes
from proxy.refusals import CLIENT_DOMAIN, fingerprint
from proxy.script import ScriptCache, etag_matches
from proxy.state import (
    APP_STATE,
    BROWSER_ROUTE,
    EVENT_COUNT,
    EVENTS_AT_STAKE,
    KEY_ID,
    AppState,
)

# Jitsu's batch route and its aliases for Segment libraries (research notes §1).
BATCH_PATHS = ("/v1/batch", "/v1/b", "/v1/batch/b", "/batch", "/b", "/batch/b", "/api/s/s2s/batch")

# Jitsu's answer to an accepted event; jitsu-js wants JSON, never an empty 2xx.
OK_BODY = b'{"ok":true}'

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
    if request.content.is_eof():
        # All of it is here already (a small body comes with its headers): nothing to wait
        # for, so no timer to arm and cancel (issue 9: some 8 µs per request).
        return await _read_capped(request, limit)
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


def count_refusal(state: AppState, request: web.Request, exc: BaseException) -> None:
    """An event request refused at the edge, counted by why (proxy_events_refused_total):
    the one place every refusal of an event route is counted, the error middleware's
    answers and the pixel's GIF alike. Each of its events once they are read (a batch
    refused as a whole refuses them all), else the request counts as one."""
    reason = refusal_reason(exc)
    if reason is not None:
        state.metrics.events_refused.labels(reason).inc(request.get(EVENTS_AT_STAKE, 1))


def _client_ip(request: web.Request, state: AppState) -> str:
    """The client's IP, anonymised by privacy.ip_policy before anything stores it."""
    ip = resolve_client_ip(
        request.remote,
        request.headers,
        state.trusted_proxies,
        state.config.server.client_ip_headers,
    )
    return anonymize(ip, state.config.privacy.ip_policy)


async def _commit(
    request: web.Request, state: AppState, envelopes: list[env.Envelope]
) -> list[int]:
    """One transaction for all of a request's envelopes: all are kept, or none. A key that
    upstream refused a moment ago is answered as Jitsu answered it, and nothing is kept."""
    events = sum(e.events for e in envelopes)
    request[EVENTS_AT_STAKE] = events
    first = envelopes[0]
    _check_upstream_size(state, first)
    refused = None
    if len(state.refusals):  # no digest per request while no key is refused (the usual case)
        key = first.headers.get("X-Write-Key")
        refused = state.refusals.refused(fingerprint(key, first.path, first.headers))
    if refused is not None:
        domain = f"[domain: {_hostname(request)}]"
        raise IngestError(
            refused.replace(CLIENT_DOMAIN, domain), status=401, reason="key_refused_upstream"
        )
    seqs = await state.buffer.append(envelopes)
    state.metrics.events_accepted.inc(events)
    request[EVENT_COUNT] = events
    return seqs


def _check_upstream_size(state: AppState, envelope: env.Envelope) -> None:
    """Refuse what no ingress in front of Jitsu would pass on: kept, such a row would fail
    for ever with an answer that is not Jitsu's (attack pass: big header sets, query strings
    that grow once encoded)."""
    upstream = state.config.upstream
    url = len(envelope.path.encode("utf-8", "surrogatepass"))
    if url > upstream.max_url_bytes:
        raise IngestError(
            f"request URI too long: {url} bytes to forward, at most {upstream.max_url_bytes}",
            status=414,
            browser_ok=False,
        )
    size = header_bytes(envelope.headers)
    limit = min(upstream.max_header_bytes, MAX_UPSTREAM_HEADER_BYTES)
    if size > limit:
        raise IngestError(
            f"request header fields too large: {size} bytes to forward, at most {limit}",
            status=431,
            browser_ok=False,
        )


async def _answer_browser(state: AppState, envelope: env.Envelope, seq: int) -> web.Response:
    """Jitsu's own answer to a browser event when it comes in time (device destinations ride
    in it), else ours; the event is in the buffer either way (upstream.sync_browser)."""
    upstream = state.config.upstream
    if upstream.sync_browser and state.forwarder is not None:
        answer = await state.forwarder.answer_now(
            Row.committed(envelope, seq), upstream.sync_timeout_s
        )
        if answer is not None:
            state.metrics.browser_answers.labels("upstream").inc()
            return web.Response(
                body=answer.body, status=answer.status, content_type="application/json"
            )
    state.metrics.browser_answers.labels("edge").inc()
    return web.Response(body=OK_BODY, content_type="application/json")


async def ingest_single(request: web.Request, *, s2s: bool) -> web.Response:
    """POST /api/s/{type}, /api/s/s2s/{type} and their aliases under routes.event_prefix: one
    event, forwarded to Jitsu's own path for it."""
    state = request.app[APP_STATE]
    request[BROWSER_ROUTE] = not s2s
    event_type = request.match_info["type"]
    limits = state.config.limits
    env.check_content_type(request.headers.get(hdrs.CONTENT_TYPE, ""))
    client_ip = _client_ip(request, state)
    _limit_ip(state, client_ip)
    key = find_write_key(request.headers, request.query) or _host_key(request, state)
    _admit(request, state, key, strict=s2s)
    body = await _read_body(request, limits.max_request_bytes)
    # Jitsu does not inflate single-event bodies; a gzip one fails to parse there and here.
    raw, _message_id = await state.offload.run(
        len(body), env.parse_single, body, event_type, limits.max_event_bytes, env.accepted_at()
    )
    upstream_path = f"/api/s/{'s2s/' if s2s else ''}{event_type}"
    envelope = env.build_envelope(
        env.forward_path(upstream_path, request.query),
        _upstream_headers(request, state, key, client_ip),
        raw,
        1,
        key,
    )
    (seq,) = await _commit(request, state, [envelope])
    if not s2s:
        return await _answer_browser(state, envelope, seq)
    return web.Response(body=OK_BODY, content_type="application/json")


async def ingest_batch(request: web.Request) -> web.Response:
    """POST /v1/batch and aliases: a Segment-style batch, forwarded as a batch (in pieces of at
    most upstream.max_batch_bytes)."""
    state = request.app[APP_STATE]
    request[BROWSER_ROUTE] = False
    limits = state.config.limits
    env.check_content_type(request.headers.get(hdrs.CONTENT_TYPE, ""))
    client_ip = _client_ip(request, state)
    _limit_ip(state, client_ip)
    # Authorization / X-Write-Key / ?writekey= come first, and a bad Authorization fails
    # before the body is read, as in Jitsu.
    key = find_write_key(request.headers, request.query)
    if key is not None:
        # Known before the body: refused keys and keys over their rate cost no parsing.
        _admit(request, state, key, strict=True)
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
    # The limit is on the body as received: a label saying gzip buys no larger allowance.
    body = await _read_body(request, limits.max_request_bytes)
    headers = _upstream_headers(request, state, key, client_ip)
    prepared = await state.offload.run(
        len(body),
        env.prepare_batch,
        body,
        encoding,
        limits,
        state.config.upstream.max_batch_bytes,
        env.accepted_at(),
        len(json.dumps(headers)),
        gzipped="gzip" in encoding.lower(),
    )
    # A refusal of the whole batch from here on refuses the events that were fine: the others
    # are counted as invalid_event below.
    request[EVENTS_AT_STAKE] = prepared.ok_events
    if key is None:
        key = find_write_key({}, {}, prepared.body_key)
        _admit(request, state, key, strict=True)
        headers = _upstream_headers(request, state, key, client_ip)
    answer: dict[str, Any] = {
        "ok": not prepared.errors,
        "okEvents": prepared.ok_events,
        "receivedEvents": prepared.received,
    }
    if prepared.errors:
        answer["errors"] = prepared.errors
        state.metrics.events_refused.labels("invalid_event").inc(
            prepared.received - prepared.ok_events
        )
    if prepared.pieces:
        # Jitsu knows its own batch aliases; ours go to its canonical path.
        upstream_path = request.path if request.path in BATCH_PATHS else "/v1/batch"
        path = env.forward_path(upstream_path, request.query)
        await _commit(
            request,
            state,
            [env.build_envelope(path, headers, raw, n, key) for raw, n in prepared.pieces],
        )
    return json_response(answer)


def _hostname(request: web.Request) -> str:
    """The request's Host without port or IPv6 brackets, lower case: the one place the Host
    header is taken apart."""
    host = (request.host or "").strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _host_key(request: web.Request, state: AppState) -> WriteKey | None:
    """The configured key of a first-party Host, for event requests that carry none."""
    host_keys = state.config.routes.host_keys
    value = host_keys.get(_hostname(request)) if host_keys else None
    return WriteKey(value, KeySource.HOST) if value else None


def _limit_ip(state: AppState, client_ip: str) -> None:
    wait = state.ip_limits.take(client_ip)
    if wait:
        raise RateLimitedError("client IP", wait)


def _admit(request: web.Request, state: AppState, key: WriteKey | None, *, strict: bool) -> None:
    """Whose events go on, as Jitsu decides and then as this proxy's security settings do.

    No key at all: s2s and batch routes (`strict`) answer 401 as Jitsu does; a browser route
    goes on, since Jitsu may still find the stream (sole stream) and will say so if it cannot.
    With an allowlist, an unknown key is answered as Jitsu answers one (200 with the error on
    browser routes, 401 elsewhere) and goes no further. Then the per-key rate limit."""
    if key is not None:
        request[KEY_ID] = key.key_id
    elif strict:
        raise IngestError(
            "stream not found: for: [writeKey: ][ingestType: writeKey]: write key is required",
            status=401,
            reason="no_key",
        )
    allowed = state.config.security.allowed_key_ids
    if allowed and (key is None or key.public_id not in allowed):
        shown = key.key_id + ":***" if key is not None else ""
        raise IngestError(
            f"stream not found: for: [writeKey: {shown}][ingestType: writeKey]", status=401
        )
    if key is not None:
        wait = state.key_limits.take(key.public_id)
        if wait:
            raise RateLimitedError("write key", wait)


def _upstream_headers(
    request: web.Request, state: AppState, key: WriteKey | None, client_ip: str
) -> dict[str, str]:
    return forward_headers(
        request.headers,
        key,
        client_ip,
        state.config.privacy.ip_policy,
        _client_origin(request, state),
        preserve_host=state.config.upstream.preserve_host,
        drop=state.drop_headers,
    )


def _client_origin(request: web.Request, state: AppState) -> ClientOrigin:
    """The Host and scheme the client used. X-Forwarded-Host and X-Forwarded-Proto are
    believed from trusted proxies only (the first value: the one the first proxy saw), as the
    client IP is; anyone else's are the client's own word."""
    host = request.headers.get(hdrs.HOST, "")
    proto = request.scheme
    if is_trusted(request.remote or "", state.trusted_proxies):
        forwarded_host = request.headers.get(hdrs.X_FORWARDED_HOST, "").split(",")[0].strip()
        forwarded_proto = (
            request.headers.get(hdrs.X_FORWARDED_PROTO, "").split(",")[0].strip().lower()
        )
        host = forwarded_host or host
        if forwarded_proto in ("http", "https"):
            proto = forwarded_proto
    return ClientOrigin(host, proto)


async def pixel(request: web.Request) -> web.Response:
    """GET /api/px/{type}: the tracking pixel, answered at the edge with the GIF (errors ride in
    X-Jitsu-Error, as in Jitsu); the event is buffered and forwarded like the others, to
    Jitsu's own pixel route, with only Jitsu's cookies.

    A pixel sits in an e-mail or behind a link: whatever happens, the answer is the GIF, or
    the redirect to `destination_url` (from the query, else from the event, as Jitsu reads
    it). Only Jitsu's own refusal of the event drops the redirect, as in Jitsu; an event the
    proxy cannot store right now (full buffer, rate limit) still sends the visitor on."""
    state = request.app[APP_STATE]
    request[BROWSER_ROUTE] = True
    headers = dict(cookies.NO_CACHE)
    set_cookies: list[str] = []
    # From here on only this copy of the query is read (and forwarded).
    query = env.pixel_query(request.query.items())
    first = {name: values[0] for name, values in query.items()}
    event: dict[str, Any] = {}
    refused = False
    try:
        client_ip = _client_ip(request, state)
        _limit_ip(state, client_ip)
        key = find_write_key(request.headers, first) or _host_key(request, state)
        _admit(request, state, key, strict=False)
        event_type = request.match_info["type"]
        event = env.pixel_event(query, event_type)
        env.mask_pixel_key(query, event)
        if not event.get("messageId"):
            query["messageId"] = [str(uuid.uuid4())]
        if "timestamp" not in event:
            # When the proxy took it, not when Jitsu gets it (hours later after an outage).
            query["timestamp"] = [env.accepted_at()]
        jar = cookies.read_cookies(request.headers.get(hdrs.COOKIE, ""))
        forward = _upstream_headers(request, state, key, client_ip)
        del forward[hdrs.CONTENT_TYPE]
        cookie_header = cookies.forwarded_cookies(request.headers.get(hdrs.COOKIE, ""))
        if cookies.truthy(first.get("process_headers")) and not event.get("anonymousId"):
            if "__eventn_id" not in jar:
                # Set on the site's domain here; Jitsu's own would be for its host.
                visitor = str(uuid.uuid4())
                set_cookies.append(
                    cookies.set_cookie(
                        "__eventn_id",
                        visitor,
                        _cookie_domain(
                            request, state, {"cookie_domain": event.get("cookie_domain")}
                        ),
                        secure=_is_https(request, state),
                    )
                )
                cookie_header = "; ".join(filter(None, [cookie_header, f"__eventn_id={visitor}"]))
        if cookie_header and "cookie" not in state.drop_headers:
            forward[hdrs.COOKIE] = cookie_header
        envelope = env.build_envelope(
            env.forward_path(f"/api/px/{event_type}", query), forward, b"", 1, key, "GET"
        )
        await _commit(request, state, [envelope])
    except IngestError as exc:
        refused = True
        count_refusal(state, request, exc)
        headers["X-Jitsu-Error"] = cookies.header_safe(exc.message)
    except (RateLimitedError, BufferError_, OverloadedError) as exc:
        count_refusal(state, request, exc)
        headers["X-Jitsu-Error"] = cookies.header_safe(f"event not stored: {exc}")
    # The query's, when it has one at all (empty too: gin's DefaultQuery), else the event's.
    destination = first.get("destination_url", event.get("destination_url"))
    if (
        not refused
        and isinstance(destination, str)
        and cookies.valid_destination(destination, _hostname(request))
    ):
        response = web.Response(status=302, headers={**headers, hdrs.LOCATION: destination})
    else:
        response = web.Response(body=cookies.GIF, headers=headers, content_type="image/gif")
    for line in set_cookies:
        response.headers.add(hdrs.SET_COOKIE, line)
    return response


async def visitor_id(request: web.Request) -> web.Response:
    """The ITP id endpoint (jitsu-js `idEndpoint`): set __eventn_id and an HttpOnly
    __eventn_id_srvr from the site's own server, so Safari keeps the visitor id past 7 days
    (research notes §4.4)."""
    state = request.app[APP_STATE]
    jar = cookies.read_cookies(request.headers.get(hdrs.COOKIE, ""))
    domain = _cookie_domain(request, state, request.query)
    secure = _is_https(request, state)
    response = web.Response(
        text="OK", headers={hdrs.CACHE_CONTROL: "must-revalidate,no-cache,no-store"}
    )
    visitor = jar.get("__eventn_id_srvr") or jar.get("__eventn_id") or str(uuid.uuid4())
    pairs = [("__eventn_id", visitor)]
    user = jar.get("__eventn_uid_srvr") or jar.get("__eventn_uid")
    if user:
        pairs.append(("__eventn_uid", user))
    for name, value in pairs:
        response.headers.add(
            hdrs.SET_COOKIE, cookies.set_cookie(name, value, domain, secure=secure)
        )
        response.headers.add(
            hdrs.SET_COOKIE,
            cookies.set_cookie(f"{name}_srvr", value, domain, secure=secure, http_only=True),
        )
    return response


def _cookie_domain(request: web.Request, state: AppState, asking: Any) -> str:
    """privacy.cookie_domain, else a requested domain the host lies within, else the host's
    registrable domain. The pixel asks through its event's `cookie_domain` (Jitsu reads it
    there, not from the query); the id endpoint through its query."""
    host = _hostname(request)
    if state.config.privacy.cookie_domain:
        return state.config.privacy.cookie_domain
    asked = asking.get("cookie_domain") or asking.get("domain") or ""
    asked = asked.strip().lstrip(".") if isinstance(asked, str) else ""
    if asked and cookies.host_within(host, asked):
        return asked
    return cookies.registrable_domain(host)


def _is_https(request: web.Request, state: AppState) -> bool:
    return request.secure or _client_origin(request, state).proto == "https"


# Segment libraries (analytics.js, analytics-react-native) boot from a "CDN settings" document;
# Jitsu answers these paths itself with a fixed one (ingest/router_segment_settings_handler.go).
SEGMENT_SETTINGS_PATHS = (
    "/v1/projects/{writeKey}/settings",
    "/v1/projects/projects/{writeKey}/settings",
    "/projects/{writeKey}/settings",
    "/projects/projects/{writeKey}/settings",
    "/v1/projects",
    "/projects",
)


# Jitsu's document today (ingest/router_segment_settings_handler.go, "reduce payload of
# settings response"), byte for byte around the key.
SEGMENT_SETTINGS_HEAD = b'{"integrations":{"Segment.io":{"apiKey":'
SEGMENT_SETTINGS_TAIL = (
    b',"versionSettings":{"version":"4.4.7","componentTypes":["browser"]}}},'
    b'"plan":{"track":{"__default":{"enabled":true}},"identify":{"__default":{"enabled":true}},'
    b'"group":{"__default":{"enabled":true}}},"analyticsNextEnabled":true}'
)


def segment_settings(write_key: str) -> bytes:
    # Jitsu pastes the key in raw; quoted here, so that no key can break the JSON.
    return SEGMENT_SETTINGS_HEAD + json.dumps(write_key).encode() + SEGMENT_SETTINGS_TAIL


async def serve_segment_settings(request: web.Request) -> web.Response:
    """The settings document a Segment library asks for before it sends anything."""
    return web.Response(
        body=segment_settings(request.match_info.get("writeKey", "")),
        content_type="application/json",
        headers={hdrs.CACHE_CONTROL: "public, max-age=86400"},
    )


async def serve_script(request: web.Request) -> web.Response:
    """GET/HEAD /p.js (and routes.script_paths): the cached, rewritten tracking script."""
    script = request.app[APP_STATE].script
    assert script is not None
    return await script_response(request, script)


async def script_response(request: web.Request, script: ScriptCache) -> web.Response:
    """A cached script as Jitsu serves its scripts: ETag, 304, gzip when accepted."""
    variant = await script.get()
    headers = {
        hdrs.CACHE_CONTROL: request.app[APP_STATE].config.script.cache_control,
        hdrs.ETAG: variant.etag,
        hdrs.VARY: "Accept-Encoding",
    }
    if etag_matches(request.headers.get(hdrs.IF_NONE_MATCH, ""), variant.etag):
        return web.Response(status=304, headers=headers)
    body = variant.body
    if "gzip" in request.headers.get(hdrs.ACCEPT_ENCODING, "").lower():
        body = variant.gzipped
        headers[hdrs.CONTENT_ENCODING] = "gzip"
    return web.Response(
        body=body, headers=headers, content_type="application/javascript", charset="utf-8"
    )


def public_routes(
    config: Config,
) -> tuple[list[str], list[str], list[tuple[str, bool]], list[str]]:
    """(script paths, batch paths, (event path, s2s), pixel paths) this proxy serves, aliases
    included."""
    routes = config.routes
    scripts = (["/p.js"] if routes.jitsu_paths else []) + list(routes.script_paths)
    batches = (list(BATCH_PATHS) if routes.jitsu_paths else []) + list(routes.batch_paths)
    events: list[tuple[str, bool]] = []
    prefixes = (["/api/s"] if routes.jitsu_paths else []) + (
        [routes.event_prefix] if routes.event_prefix else []
    )
    for prefix in prefixes:
        events += [(f"{prefix}/s2s/{{type}}", True), (f"{prefix}/{{type}}", False)]
    pixels = (["/api/px/{type}"] if routes.jitsu_paths else []) + (
        [f"{routes.event_prefix}/px/{{type}}"] if routes.event_prefix else []
    )
    return scripts, batches, events, pixels


def add_routes(app: web.Application, config: Config) -> frozenset[str]:
    """Register every route; returns the canonical names of the public (CORS) routes."""
    scripts, batches, events, pixels = public_routes(config)
    # Batch first: /api/s/s2s/{type} would otherwise swallow /api/s/s2s/batch.
    for path in batches:
        app.router.add_route("POST", path, ingest_batch)
        app.router.add_route("OPTIONS", path, preflight)
    for path, s2s in events:
        app.router.add_route("POST", path, functools.partial(ingest_single, s2s=s2s))
        app.router.add_route("OPTIONS", path, preflight)
    for path in scripts:
        app.router.add_get(path, serve_script)
        app.router.add_route("OPTIONS", path, preflight)
    for path in pixels:
        # GET only: Jitsu has no HEAD route there, and a HEAD must not record an event.
        app.router.add_get(path, pixel, allow_head=False)
        app.router.add_route("OPTIONS", path, preflight)
    settings = list(SEGMENT_SETTINGS_PATHS) if config.routes.jitsu_paths else []
    for path in settings:
        app.router.add_get(path, serve_segment_settings)
        app.router.add_post(path, serve_segment_settings)
        app.router.add_route("OPTIONS", path, preflight)
    id_paths = [config.routes.id_path] if config.routes.id_path else []
    for path in id_paths:
        app.router.add_get(path, visitor_id)
        app.router.add_route("OPTIONS", path, preflight)
    return frozenset(
        [*scripts, *batches, *(path for path, _ in events), *pixels, *id_paths, *settings]
    )
