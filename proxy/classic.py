"""Jitsu's Classic API (ingest/router_classic_handler.go): the event routes of the classic
tracker and of s2s clients written for it, and the classic tracker itself at /s/lib.js.

The key may sit in getDataLocator's places or in the classic ones (auth.find_classic_key); it
goes upstream in X-Write-Key only. Jitsu's classic handler reads X-Write-Key before its own
places, with the same meaning: the ingest type comes from the path (s2s or browser), never from
where the key was, and the event's `api_key` is set to the key found either way.
"""

from __future__ import annotations

import functools
from urllib.parse import quote

from aiohttp import hdrs, web
from multidict import MultiDict

from proxy import envelope as env
from proxy import routes
from proxy.auth import find_classic_key, is_classic_key_param
from proxy.config import Config
from proxy.errors import IngestError
from proxy.state import APP_STATE, BROWSER_ROUTE

# Jitsu's classic routes and whether each is an s2s one (ingest/router.go, "classic compat";
# ClassicHandler: s2s when the route starts with /api/v1/s2s/).
CLASSIC_PATHS = (
    ("/api/v1/event", False),
    ("/api/v1/events", False),
    # The classic tracker's randomize_url: /api.<random>?p_<random>=<key> (gin's /api.:ignored).
    ("/api.{ignored}", False),
    ("/api/v1/s2s/event", True),
    ("/api/v1/s2s/event/", True),
    ("/api/v1/s2s/events", True),
)
CLASSIC_SCRIPT_PATH = "/s/lib.js"


async def ingest_classic(request: web.Request, *, s2s: bool) -> web.Response:
    """POST on a classic route: one event or an array of them, each buffered and forwarded on
    its own to the same path, so that Jitsu's answer settles exactly that event."""
    state = request.app[APP_STATE]
    request[BROWSER_ROUTE] = not s2s
    limits = state.config.limits
    upstream_path = _upstream_path(request)
    env.check_content_type(request.headers.get(hdrs.CONTENT_TYPE, ""))
    client_ip = routes._client_ip(request, state)
    routes._limit_ip(state, client_ip)
    key = find_classic_key(request.headers, request.query.items())
    if key is None:
        # Jitsu finds a classic stream by its key only (getStream strict): none, no stream.
        raise IngestError(_stream_not_found(request, s2s), status=401, reason="no_key")
    routes._admit(request, state, key, strict=True)
    body = await routes._read_body(request, limits.max_request_bytes)
    parsed = await state.offload.run(
        len(body),
        env.parse_classic,
        body,
        limits.max_batch_events,
        limits.max_event_bytes,
        env.accepted_at(),
    )
    if parsed.events:
        path = env.forward_path(upstream_path, _forwarded_query(request))
        # The key goes in X-Write-Key only: X-Auth-Token and api_key are credentials to
        # headers.forward_headers, never forwarded (Jitsu would keep them, unmasked).
        headers = routes._upstream_headers(request, state, key, client_ip)
        envelopes = [env.build_envelope(path, headers, raw, 1, key) for raw in parsed.events]
        stored = sum(e.stored_size for e in envelopes)
        if stored > limits.max_decompressed_bytes:
            # Each event of an array is a row of its own with the request's headers: 80 tiny
            # events under 720 KB of headers once stored 58 MB (attack pass, F3). A request
            # may cost the buffer what a batch may expand to, no more.
            raise IngestError(
                f"request too large once stored: {len(envelopes)} events with their headers"
                f" come to {stored} bytes, more than {limits.max_decompressed_bytes}",
                status=413,
                browser_ok=False,
            )
        await routes._commit(request, state, envelopes)
    if parsed.error is not None:
        # Jitsu goes on with the other events and answers its first refusal.
        raise IngestError(parsed.error)
    return web.Response(body=routes.OK_BODY, content_type="application/json")


def _upstream_path(request: web.Request) -> str:
    """The path Jitsu routes as the client's: the route's own, and for /api.{ignored} the
    segment as Jitsu's router will read it once decoded. The raw path went upstream before,
    and `/api.x%2Fy` (a 2xx here) decodes to `/api.x/y`, which Jitsu has no route for: a row
    upstream never takes that passed for an outage and stalled every other (attack pass)."""
    ignored = request.match_info.get("ignored")
    if ignored is None:
        return request.match_info.route.resource.canonical  # type: ignore[union-attr]
    if "/" in ignored:
        raise web.HTTPNotFound()  # what Jitsu answers for /api.x/y: no such route
    return "/api." + quote(ignored, safe="!$&'()*+,;=:@-._~")


def _stream_not_found(request: web.Request, s2s: bool) -> str:
    """Jitsu's words for it: "stream not found" with the StreamCredentials it looked with."""
    domain = (request.host or "").split(":")[0]
    ingest_type = "s2s" if s2s else "browser"
    return (
        f"stream not found: for: [slug: ][domain: {domain}][writeKey: ][ingestType: {ingest_type}]"
    )


def _forwarded_query(request: web.Request) -> MultiDict[str]:
    """The query without the places a key may hide in (?writekey= goes in forward_path):
    the key travels in X-Write-Key alone, which Jitsu reads before all of them."""
    return MultiDict((k, v) for k, v in request.query.items() if not is_classic_key_param(k))


async def serve_classic_script(request: web.Request) -> web.Response:
    """GET/HEAD /s/lib.js: the classic tracker, cached from upstream like /p.js. It sends its
    events to the classic routes of the host it was loaded from: these, as they are."""
    script = request.app[APP_STATE].classic_script
    assert script is not None
    return await routes.script_response(request, script)


def add_routes(app: web.Application, config: Config) -> frozenset[str]:
    """The classic routes, with routes.jitsu_paths; returns them as public (CORS) routes."""
    if not config.routes.jitsu_paths:
        return frozenset()
    for path, s2s in CLASSIC_PATHS:
        app.router.add_route("POST", path, functools.partial(ingest_classic, s2s=s2s))
        app.router.add_route("OPTIONS", path, routes.preflight)
    app.router.add_get(CLASSIC_SCRIPT_PATH, serve_classic_script)
    app.router.add_route("OPTIONS", CLASSIC_SCRIPT_PATH, routes.preflight)
    return frozenset([*(path for path, _ in CLASSIC_PATHS), CLASSIC_SCRIPT_PATH])
