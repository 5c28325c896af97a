"""A model of Jitsu's ingest service on loopback, for differential tests: what Jitsu would answer
and what it would hand on for each request, read from its code (jitsucom/bulker, ingest/).

Unlike tests/fakejitsu.py (a recorder that fails on command), this one decides like Jitsu: it
finds the stream by write key, slug, domain or as the sole stream (router.go getStream), patches
the event (patchEvent, patchClassicEvent), builds the ingest message with the request headers
Jitsu keeps for functions (buildIngestMessage) and answers with Jitsu's statuses and bodies,
device destinations included (processSyncDestination). Each accepted event is kept in `stored`
as the ingest message Jitsu would produce to Kafka. In-batch deduplication runs for a stream
with `dedup_window_ms` (fmt.Sprint of a field approximated by its JSON). Not modelled: key
hashes (secrets are compared as they are), throttling, backups, device functions (rotor), the
pixel's process_headers, message size limits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime
import gzip
import ipaddress
import json
import re
import string
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

# router.go
EVENT_TYPES_DICT = {
    "p": "page",
    "i": "identify",
    "t": "track",
    "g": "group",
    "a": "alias",
    "s": "screen",
    "e": "event",
}
EVENT_TYPES = frozenset({"page", "identify", "track", "group", "alias", "screen"})
MESSAGE_ID_UNSUPPORTED = re.compile(r"[^a-zA-Z0-9._-]")
ERR_NO_DST = "no destinations found for stream"
WRITE_KEY_DEFINED, S2S, BROWSER = "writeKey", "s2s", "browser"
# destination_types.go: destinations of these types run in the browser (synchronous).
DEVICE_OPTIONS: dict[str, dict[str, str]] = {
    name: {"type": "internal-plugin", "name": name}
    for name in ("logrocket", "tag", "ga4-tag", "gtm")
}
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET,POST,HEAD,OPTIONS",
    "Access-Control-Allow-Headers": "x-enable-debug, x-write-key, authorization, content-type, "
    "x-ip-policy, cache-control, x-jitsu-custom",
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Max-Age": "86400",
}
# jitsubase/appbase/router_base.go EmptyGif
EMPTY_GIF = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
# router_segment_settings_handler.go
SETTINGS_HEAD = '{"integrations":{"Segment.io":{"apiKey":"'
SETTINGS_TAIL = (
    '","versionSettings":{"version":"4.4.7","componentTypes":["browser"]}}},"plan":{"track":'
    '{"__default":{"enabled":true}},"identify":{"__default":{"enabled":true}},"group":'
    '{"__default":{"enabled":true}}},"analyticsNextEnabled":true}'
)
SETTINGS_PATHS = (
    "/v1/projects/{writeKey}/settings",
    "/v1/projects/projects/{writeKey}/settings",
    "/v1/projects",
    "/projects/{writeKey}/settings",
    "/projects/projects/{writeKey}/settings",
    "/projects",
)
BATCH_PATHS = ("/v1/batch/b", "/v1/batch", "/v1/b", "/batch/b", "/batch", "/b", "/api/s/s2s/batch")
CLASSIC_PATHS = (
    "/api/v1/s2s/event",
    "/api/v1/s2s/event/",
    "/api/v1/s2s/events",
    "/api/v1/event",
    "/api/v1/events",
    "/api.{ignored}",
)
P_JS = b"/* p.js of the Jitsu model */\n"
S_LIB_JS = b"/* s/lib.js of the Jitsu model */\n"
S_LIB_JS_ETAG = '"11a64df551425fcc55e4d42a148795d9f25f89d4"'
TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


def now_iso() -> str:
    """time.Now().UTC().Format(timestamp.JsonISO): UTC, milliseconds, Z."""
    moment = datetime.datetime.now(datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> float:
    """A JsonISO time as unix seconds."""
    return (
        datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


def canonical_header(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: how names appear in Jitsu's httpHeaders."""
    if not name or not set(name) <= TOKEN_CHARS:
        return name
    out, upper = [], True
    for char in name:
        out.append(char.upper() if upper else char.lower())
        upper = char == "-"
    return "".join(out)


def mask_write_key(key: str) -> str:
    """router.go maskWriteKey."""
    if not key:
        return key
    parts = key.split(":")
    return parts[0] + ":***" if len(parts) > 1 else key[:1] + "***" + key[-1:]


def _message_id(value: Any) -> str:
    """The message id of the ingest message: the event's, sanitised and cut, or a new one."""
    if not isinstance(value, str) or not value:
        return str(uuid.uuid4())
    return MESSAGE_ID_UNSUPPORTED.sub("_", value)[:64]


def _get_s(obj: dict[str, Any], key: str) -> str:
    """OrderedMap.GetS: the value if it is a string, else ""."""
    value = obj.get(key)
    return value if isinstance(value, str) else ""


@dataclasses.dataclass(frozen=True)
class Key:
    id: str
    secret: str

    @property
    def value(self) -> str:
        return f"{self.id}:{self.secret}"


@dataclasses.dataclass
class Destination:
    """ShortDestinationConfig (repository.go)."""

    id: str
    type: str
    connection_id: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    credentials: dict[str, Any] = dataclasses.field(default_factory=dict)
    mode: str = ""
    code: str = ""

    @property
    def device(self) -> bool:
        return self.type in DEVICE_OPTIONS

    def for_js_lib(self) -> dict[str, Any]:
        """CloneForJsLib as encoding/json writes it into the answer (inline, omitempty)."""
        out: dict[str, Any] = {}
        if self.mode:
            out["mode"] = self.mode
        if self.code:
            out["code"] = self.code
        out["id"] = self.id
        out["destinationType"] = self.type
        options = {k: v for k, v in self.options.items() if k != "functions"}
        if options:
            out["options"] = options
        if self.credentials:
            out["credentials"] = self.credentials
        return out


def warehouse() -> Destination:
    return Destination("dst-warehouse", "postgres", connection_id="conn-warehouse")


@dataclasses.dataclass
class Stream:
    """A stream with its keys and destinations (StreamWithDestinations)."""

    id: str
    browser_keys: list[Key] = dataclasses.field(default_factory=list)
    s2s_keys: list[Key] = dataclasses.field(default_factory=list)
    domains: list[str] = dataclasses.field(default_factory=list)
    strict: bool = False
    name: str = ""
    workspace_id: str = "ws-model"
    destinations: list[Destination] = dataclasses.field(default_factory=lambda: [warehouse()])
    # deduplicateWindowMs: > 0 turns on the batch handler's in-batch deduplication.
    dedup_window_ms: int = 0

    @property
    def sync_destinations(self) -> list[Destination]:
        return [d for d in self.destinations if d.device]

    @property
    def async_destinations(self) -> list[Destination]:
        return [d for d in self.destinations if not d.device]


@dataclasses.dataclass
class Locator:
    """StreamCredentials: what the request says about its stream."""

    ingest_type: str
    write_key: str = ""
    key_source: str = ""
    slug: str = ""
    domain: str = ""

    def __str__(self) -> str:
        return (
            f"[slug: {self.slug}][domain: {self.domain}][writeKey: {self.write_key}]"
            f"[ingestType: {self.ingest_type}]"
        )


@dataclasses.dataclass
class Stored:
    """One event as Jitsu hands it on: the ingest message, and how its stream was found."""

    message: dict[str, Any]
    stream: str
    key: str  # the write key the request carried (unmasked: for the test's eyes only)
    key_source: str  # authorization, x-write-key, query, body, token, x-auth-token, ...
    host: str  # the request's Host
    path: str
    at: float

    @property
    def payload(self) -> dict[str, Any]:
        return self.message["httpPayload"]  # type: ignore[no-any-return]

    @property
    def headers(self) -> dict[str, str]:
        return self.message["httpHeaders"]  # type: ignore[no-any-return]


@dataclasses.dataclass
class Exchange:
    """Every request the model answered, accepted or not."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    status: int
    body: bytes
    at: float


class JitsuError(Exception):
    """appbase ResponseError: `{"error": "<type>: <err>"}` (the GIF and X-Jitsu-Error on the
    pixel)."""

    def __init__(self, status: int, error_type: str, err: object = None) -> None:
        self.status = status
        self.message = error_type if err is None else f"{error_type}: {err}"
        super().__init__(self.message)


class JitsuModel:
    """Jitsu's ingest service for `streams`. `data_hosts` are Jitsu's DATA_DOMAIN (a Host
    `<slug>.<data host>` names its stream by slug). `unavailable` answers that many of the
    next requests 503 in plain text, as a load balancer in front of a Jitsu that is down."""

    def __init__(self, streams: list[Stream], data_hosts: tuple[str, ...] = ()) -> None:
        self.streams = streams
        self.data_hosts = data_hosts
        self.stored: list[Stored] = []
        self.exchanges: list[Exchange] = []
        self.unavailable = 0
        self.port = 0
        # Paths whose requests go through Jitsu's CORS middleware (its `fast` group).
        self._fast: frozenset[str] = frozenset()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        fast: dict[str, list[tuple[str, Handler]]] = {}
        for path in SETTINGS_PATHS:
            fast[path] = [("GET", self._settings), ("POST", self._settings)]
        fast.update({path: [("POST", self._batch)] for path in BATCH_PATHS})
        fast["/api/s/s2s/{tp}"] = fast["/api/s/{tp}"] = [("POST", self._ingest)]
        fast["/api/px/{tp}"] = [("GET", self._pixel)]
        fast["/s/lib.js"] = [("GET", self._classic_script), ("HEAD", self._classic_script)]
        fast.update({path: [("POST", self._classic)] for path in CLASSIC_PATHS})
        fast["/p.js"] = [("GET", self._script), ("HEAD", self._script)]
        for path, methods in fast.items():
            for method, handler in methods:
                app.router.add_route(method, path, handler)
            # Answered by the CORS middleware before any handler.
            app.router.add_route("OPTIONS", path, _no_handler)
        self._fast = frozenset(fast)
        app.router.add_get("/health", _health, allow_head=False)
        app.router.add_get("/robots.txt", _robots, allow_head=False)
        # Bodies as sent: Jitsu inflates a gzip batch itself, and nothing else.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5, auto_decompress=False
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, predicate: Callable[[JitsuModel], bool], timeout: float = 10) -> None:
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        await asyncio.wait_for(_wait(), timeout)

    def event_exchanges(self) -> list[Exchange]:
        """The exchanges about events: not the scripts (the proxy fetches /p.js on its own)."""
        return [e for e in self.exchanges if e.path.split("?")[0] not in ("/p.js", "/s/lib.js")]

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Handler,
    ) -> web.StreamResponse:
        if self.unavailable > 0 and request.path not in ("/p.js", "/s/lib.js"):
            self.unavailable -= 1
            response: web.StreamResponse = web.Response(
                status=503, text="upstream unavailable", content_type="text/plain"
            )
        else:
            response = await self._answer(request, handler)
        sent = response.body if isinstance(response, web.Response) else b""
        async with self._changed:
            self.exchanges.append(
                Exchange(
                    request.method,
                    request.path_qs,
                    request.headers,
                    response.status,
                    sent if isinstance(sent, bytes) else b"",
                    time.time(),
                )
            )
            self._changed.notify_all()
        return response

    async def _answer(
        self,
        request: web.Request,
        handler: Handler,
    ) -> web.StreamResponse:
        route = request.match_info.route.resource
        canonical = route.canonical if route is not None else ""
        if canonical not in self._fast:
            if request.match_info.http_exception is not None:
                # gin without HandleMethodNotAllowed: anything unrouted is a plain 404.
                return web.Response(status=404, text="404 page not found")
            return await handler(request)
        # router.go CorsMiddleware
        origin = request.headers.get("Origin", "")
        if request.method == "OPTIONS":
            return web.Response(
                status=200, headers={"Access-Control-Allow-Origin": origin or "*", **CORS_HEADERS}
            )
        response = await handler(request)
        if origin:
            response.headers.update({"Access-Control-Allow-Origin": origin, **CORS_HEADERS})
        return response

    async def _record(self, stored: list[Stored]) -> None:
        async with self._changed:
            self.stored.extend(stored)
            self._changed.notify_all()

    # ---- streams (router.go getDataLocator, getStream and the locators) ----------------------

    def _locator(
        self,
        request: web.Request,
        ingest_type: str,
        extract: Callable[[], tuple[str, str]] | None = None,
    ) -> Locator:
        loc = Locator(ingest_type)
        authorization = request.headers.get("Authorization", "")
        if authorization:
            try:
                decoded = base64.b64decode(authorization.removeprefix("Basic "), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise LocatorError(
                    f"failed to decode writeKey from Authorization header as base64: {exc}"
                ) from None
            loc.write_key = decoded.removesuffix(b":").decode("utf-8", "replace")
            loc.key_source = "authorization"
        elif request.headers.get("X-Write-Key"):
            loc.write_key, loc.key_source = request.headers["X-Write-Key"], "x-write-key"
        elif request.query.get("writekey"):
            loc.write_key, loc.key_source = request.query["writekey"], "query"
        elif extract is not None:
            loc.write_key, loc.key_source = extract()
        host = request.headers.get("Host", "").split(":")[0]
        for data_host in self.data_hosts:
            if data_host and host.endswith("." + data_host):
                loc.slug = host.removesuffix("." + data_host)
                return loc
        loc.domain = host
        return loc

    def _stream(self, loc: Locator, strict: bool, s2s: bool) -> Stream | None:
        if strict:
            locators = [self._by_key]
        elif loc.ingest_type == WRITE_KEY_DEFINED:
            locators = [self._by_key, self._by_slug, self._by_ambiguous_domain, self._sole]
        elif loc.ingest_type == S2S:
            locators = [self._by_key, self._by_slug, self._by_ambiguous_domain]
        else:
            locators = [self._by_slug, self._by_domain, self._by_key, self._sole]
        for locate in locators:
            stream = locate(loc, s2s)
            if stream is not None:
                return stream
        return None

    def _by_id(self, stream_id: str) -> Stream | None:
        return next((s for s in self.streams if s.id == stream_id), None)

    def _by_key(self, loc: Locator, s2s: bool) -> Stream | None:
        if not loc.write_key:
            return None
        parts = loc.write_key.split(":")
        if len(parts) == 1:
            # A plain key; only a stream's id here (no plaintext keys in the model).
            loc.ingest_type = S2S if s2s else BROWSER
            return self._by_id(loc.write_key)
        for stream in self.streams:
            for key_type, keys in ((BROWSER, stream.browser_keys), (S2S, stream.s2s_keys)):
                for key in keys:
                    if key.id != parts[0]:
                        continue
                    if loc.ingest_type != WRITE_KEY_DEFINED and key_type != loc.ingest_type:
                        return None
                    if key.secret != parts[1]:
                        return None
                    loc.ingest_type = key_type
                    return stream
        return None

    def _by_slug(self, loc: Locator, s2s: bool) -> Stream | None:
        stream = self._by_id(loc.slug) if loc.slug else None
        if stream is not None and not stream.strict:
            loc.ingest_type = S2S if s2s else BROWSER
            return stream
        return None

    def _by_domain(self, loc: Locator, s2s: bool) -> Stream | None:
        streams = [s for s in self.streams if loc.domain and loc.domain in s.domains]
        if len(streams) == 1 and not streams[0].strict:
            loc.ingest_type = S2S if s2s else BROWSER
            return streams[0]
        if not loc.write_key and len(streams) > 1:
            return self._first_open(loc, streams, s2s)
        return None

    def _by_ambiguous_domain(self, loc: Locator, s2s: bool) -> Stream | None:
        streams = [s for s in self.streams if loc.domain and loc.domain in s.domains]
        return self._first_open(loc, streams, s2s)

    def _first_open(self, loc: Locator, streams: list[Stream], s2s: bool) -> Stream | None:
        for stream in streams:
            if not stream.strict:
                loc.ingest_type = S2S if s2s else BROWSER
                return stream
        return None

    def _sole(self, loc: Locator, s2s: bool) -> Stream | None:
        if len(self.streams) == 1 and not self.streams[0].strict:
            loc.ingest_type = S2S if s2s else BROWSER
            return self.streams[0]
        return None

    # ---- events (router.go patchEvent, buildIngestMessage) ------------------------------------

    def _ingest_message(
        self,
        request: web.Request,
        message_id: str,
        event: dict[str, Any],
        tp: str,
        loc: Locator,
        stream: Stream,
        analytic_context: dict[str, Any] | None = None,
        default_event_name: str = "",
    ) -> tuple[dict[str, Any], str | None]:
        if tp == "classic":
            error = _patch_classic_event(request, message_id, event, loc)
        else:
            error = _patch_event(
                request,
                message_id,
                event,
                tp,
                loc.ingest_type,
                analytic_context,
                default_event_name,
            )
        body_type = _get_s(event, "type") if tp != "classic" else _get_s(event, "event_type")
        origin: dict[str, Any] = {
            # Go's server leaves the request URL's scheme and host empty.
            "baseUrl": "://",
            "slug": loc.slug,
            "workspaceId": stream.workspace_id,
            "sourceId": stream.id,
            "sourceName": stream.name,
            "domain": loc.domain,
            "classic": tp == "classic",
        }
        message = {
            "ingestType": loc.ingest_type,
            "messageCreated": _get_s(event, "receivedAt" if tp != "classic" else "_timestamp"),
            "writeKey": mask_write_key(loc.write_key),
            "messageId": message_id,
            "type": body_type or tp,
            "origin": {k: v for k, v in origin.items() if v},  # omitempty
            "httpHeaders": kept_headers(request.headers),
            "httpPayload": event,
        }
        if not message["writeKey"]:
            del message["writeKey"]
        return message, error

    def _stored(
        self, request: web.Request, message: dict[str, Any], stream: Stream, loc: Locator
    ) -> Stored:
        host = request.headers.get("Host", "")
        return Stored(
            message, stream.id, loc.write_key, loc.key_source, host, request.path, time.time()
        )

    # ---- handlers ------------------------------------------------------------------------------

    async def _ingest(self, request: web.Request) -> web.Response:
        """router_ingest_handler.go IngestHandler: POST /api/s/{tp} and /api/s/s2s/{tp}."""
        s2s = request.match_info.route.resource is not None and (
            request.match_info.route.resource.canonical == "/api/s/s2s/{tp}"
        )
        try:
            _check_content_type(request)
            tp = request.match_info["tp"]
            body = await request.read()
            fail = 400 if s2s else 200
            try:
                message = _loads_object(body)
            except ValueError as exc:
                raise JitsuError(fail, "error parsing message", f"{exc}: {body.decode()}") from None
            message_id = _message_id(message.get("messageId"))
            try:
                loc = self._locator(request, WRITE_KEY_DEFINED)
            except LocatorError as exc:
                raise JitsuError(
                    fail, "error processing message", f"{exc}: {body.decode()}"
                ) from None
            stream = self._stream(loc, False, s2s)
            if stream is None:
                raise JitsuError(401 if s2s else 200, "stream not found", f"for: {loc}")
            s2s = s2s or loc.ingest_type == S2S
            ingest, error = self._ingest_message(request, message_id, message, tp, loc, stream)
            if error is not None:
                raise JitsuError(400 if s2s else 200, "event error", error)
            if not stream.async_destinations and (not stream.sync_destinations or s2s):
                raise JitsuError(200, ERR_NO_DST, stream.id)
            if stream.async_destinations:
                await self._record([self._stored(request, ingest, stream, loc)])
            if not stream.sync_destinations or s2s:
                return _json({"ok": True})
            answer = _sync_destinations(ingest, stream)
            if answer is None:
                return _json({"ok": True})
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                # ShouldCompress: the answer (jsoniter's Encode: a newline at the end) gzipped.
                return web.Response(
                    body=gzip.compress(json.dumps(answer).encode() + b"\n"),
                    headers={
                        "Content-Encoding": "gzip",
                        "Content-Type": "application/json",
                        "Vary": "Accept-Encoding",
                    },
                )
            return _json(answer)
        except JitsuError as exc:
            return _json({"error": exc.message}, exc.status)

    async def _batch(self, request: web.Request) -> web.Response:
        """router_batch_handler.go BatchHandler."""
        try:
            _check_content_type(request)
            body = await request.read()
            try:
                if "gzip" in request.headers.get("Content-Encoding", ""):
                    body = gzip.decompress(body)
                payload = _batch_payload(body)
            except (ValueError, OSError, EOFError) as exc:
                ip = _first_nonempty(
                    request.headers.get("X-Real-Ip", ""),
                    request.headers.get("X-Forwarded-For", ""),
                    request.remote or "",
                )
                raise JitsuError(400, "error parsing message", f"Client Ip: {ip}: {exc}") from None
            s2s = request.path == "/api/s/s2s/batch"
            body_key = payload.get("writeKey") or ""
            try:
                loc = self._locator(request, WRITE_KEY_DEFINED, lambda: (body_key, "body"))
            except LocatorError as exc:
                raise JitsuError(400, "error processing message", exc) from None
            stream = self._stream(loc, True, s2s)
            if stream is None:
                raise JitsuError(401, "stream not found", f"for: {loc}")
            ok_events, errors, stored = 0, [], []
            batch = payload.get("batch") or []
            if stream.dedup_window_ms > 0:
                batch = deduplicate_batch(batch, stream.dedup_window_ms)
            for event in batch:
                message_id = _message_id(event.get("messageId"))
                ingest, error = self._ingest_message(
                    request,
                    message_id,
                    event,
                    "event",
                    loc,
                    stream,
                    payload.get("context"),
                    payload.get("eventsName") or "",
                )
                if error is not None:
                    errors.append(f"Message ID: {message_id}: event error: {error}")
                elif not stream.async_destinations:
                    errors.append(f"Message ID: {message_id}: {ERR_NO_DST}: {stream.id}")
                else:
                    stored.append(self._stored(request, ingest, stream, loc))
                    ok_events += 1
            await self._record(stored)
            received = len(payload.get("batch") or [])
            answer: dict[str, Any] = {
                "ok": ok_events == len(batch) and not errors,
                "receivedEvents": received,
                "okEvents": ok_events,
            }
            if len(batch) < received:
                answer["deduplicatedEvents"] = received - len(batch)
                answer["processedEvents"] = len(batch)
            if errors:
                answer["errors"] = errors
            return _json(answer)
        except JitsuError as exc:
            return _json({"error": exc.message}, exc.status)

    async def _pixel(self, request: web.Request) -> web.Response:
        """router_pixel_handler.go PixelHandler: GET /api/px/{tp}; always the GIF (or the
        redirect), errors in X-Jitsu-Error."""
        headers = {
            "Cache-Control": "no-cache, no-store, must-revalidate",
            "Pragma": "no-cache",
            "Expires": "0",
        }
        try:
            tp = request.match_info["tp"]
            event = _pixel_event(request)
            message_id = _message_id(event.get("messageId"))
            try:
                loc = self._locator(request, WRITE_KEY_DEFINED)
            except LocatorError as exc:
                raise JitsuError(200, "error processing message", exc) from None
            stream = self._stream(loc, False, False)
            if stream is None:
                raise JitsuError(200, "stream not found", f"for: {loc}")
            ingest, error = self._ingest_message(request, message_id, event, tp, loc, stream)
            if error is not None:
                raise JitsuError(200, "event error", error)
            if not stream.async_destinations:
                raise JitsuError(200, ERR_NO_DST, stream.id)
            await self._record([self._stored(request, ingest, stream, loc)])
        except JitsuError as exc:
            headers["X-Jitsu-Error"] = exc.message
            return web.Response(body=EMPTY_GIF, headers=headers, content_type="image/gif")
        redirect = _redirect_url(request, event)
        if redirect:
            return web.Response(status=302, headers={**headers, "Location": redirect})
        return web.Response(body=EMPTY_GIF, headers=headers, content_type="image/gif")

    async def _classic(self, request: web.Request) -> web.Response:
        """router_classic_handler.go ClassicHandler: Jitsu Classic's event API."""
        route = request.match_info.route.resource
        s2s = route is not None and route.canonical.startswith("/api/v1/s2s/")
        try:
            _check_content_type(request)
            fail = 400 if s2s else 200
            try:
                loc = self._locator(request, S2S if s2s else BROWSER, lambda: _classic_key(request))
            except LocatorError as exc:
                raise JitsuError(fail, "error processing message", exc) from None
            stream = self._stream(loc, True, s2s)
            if stream is None:
                raise JitsuError(401 if s2s else 200, "stream not found", f"for: {loc}")
            s2s = s2s or loc.ingest_type == S2S
            fail = 400 if s2s else 200
            body = await request.read()
            try:
                parsed = json.loads(body)
            except ValueError as exc:
                raise JitsuError(fail, "error parsing message", f"{exc}: {body.decode()}") from None
            messages = parsed if body[:1] == b"[" else [parsed]
            if not all(isinstance(m, dict) for m in messages):
                raise JitsuError(fail, "error parsing message", f"not an object: {body.decode()}")
        except JitsuError as exc:
            return _json({"error": exc.message}, exc.status)
        # Each event's error is written as an answer of its own; gin then appends {"ok":true}.
        status, written = 200, b""
        for message in messages:
            message_id = _message_id(message.get("eventn_ctx_event_id"))
            ingest, error = self._ingest_message(
                request, message_id, message, "classic", loc, stream
            )
            failure: JitsuError | None = None
            if error is not None:
                failure = JitsuError(fail, "event error", error)
            elif not stream.async_destinations:
                failure = JitsuError(200, ERR_NO_DST, stream.id)
            else:
                await self._record([self._stored(request, ingest, stream, loc)])
            if failure is not None:
                if not written:
                    status = failure.status
                written += json.dumps({"error": failure.message}).encode()
        return web.Response(
            status=status,
            body=written + b'{"ok":true}',
            content_type="application/json",
            charset="utf-8",
        )

    async def _settings(self, request: web.Request) -> web.Response:
        key = request.match_info.get("writeKey", "")
        return web.Response(
            body=(SETTINGS_HEAD + key + SETTINGS_TAIL).encode(),
            headers={"Content-Type": "application/json", "Cache-Control": "public, max-age=86400"},
        )

    async def _script(self, request: web.Request) -> web.Response:
        return _script_answer(request, P_JS, '"model-p-js"')

    async def _classic_script(self, request: web.Request) -> web.Response:
        return _script_answer(request, S_LIB_JS, S_LIB_JS_ETAG)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LocatorError(Exception):
    """getDataLocator's error: an Authorization header that is not base64."""


def _script_answer(request: web.Request, body: bytes, etag: str) -> web.Response:
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(
        body=b"" if request.method == "HEAD" else body,
        headers={"ETag": etag, "Content-Type": "application/javascript"},
    )


async def _no_handler(request: web.Request) -> web.Response:
    raise AssertionError("OPTIONS is answered by the CORS middleware")


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "pass"})


async def _robots(request: web.Request) -> web.Response:
    return web.Response(
        body=b"User-agent: *\nDisallow: /\n", headers={"Content-Type": "text/plain"}
    )


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    """gin's c.JSON."""
    return web.Response(
        status=status,
        body=json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(),
        content_type="application/json",
        charset="utf-8",
    )


def _first_nonempty(*values: str) -> str:
    return next((v for v in values if v), "").split(",")[0].strip()


def _check_content_type(request: web.Request) -> None:
    media = request.headers.get("Content-Type", "").split(";")[0].strip()
    if not media.endswith(("application/json", "text/plain")):
        raise JitsuError(400, "invalid content type", f"{media}. Expected: application/json")


def _loads_object(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError(f"cannot unmarshal {type(value).__name__} into an object")
    return value


def _batch_payload(body: bytes) -> dict[str, Any]:
    """BatchPayload as encoding/json decodes it: the first JSON value of the body."""
    value, _end = json.JSONDecoder().raw_decode(body.decode().lstrip())
    if not isinstance(value, dict):
        raise ValueError("cannot unmarshal into BatchPayload")
    batch = value.get("batch")
    if batch is not None and (
        not isinstance(batch, list) or not all(isinstance(e, dict) for e in batch)
    ):
        raise ValueError("batch must be an array of objects")
    for name in ("eventsName", "writeKey"):
        if value.get(name) is not None and not isinstance(value[name], str):
            raise ValueError(f"{name} must be a string")
    if value.get("context") is not None and not isinstance(value["context"], dict):
        raise ValueError("context must be an object")
    return value


def deduplicate_batch(batch: list[dict[str, Any]], gap_ms: int) -> list[dict[str, Any]]:
    """router_batch_handler.go deduplicateBatch: an event with the same anonymousId, userId,
    type, event, properties and traits as one kept before it, and a timestamp at most `gap_ms`
    from that one's, is dropped; an event without a timestamp Go can parse is always kept."""
    seen: dict[tuple[str, ...], datetime.datetime] = {}
    kept = []
    for event in batch:
        try:
            stamp = datetime.datetime.fromisoformat(_get_s(event, "timestamp"))
        except ValueError:
            kept.append(event)
            continue
        key = (
            _get_s(event, "anonymousId"),
            _get_s(event, "userId"),
            _get_s(event, "type"),
            _get_s(event, "event"),
            *(_sprint(event, name) for name in ("properties", "traits")),
        )
        before = seen.get(key)
        if before is not None and abs((stamp - before).total_seconds()) * 1000 <= gap_ms:
            continue
        seen[key] = stamp
        kept.append(event)
    return kept


def _sprint(event: dict[str, Any], name: str) -> str:
    """fmt.Sprint of a field, "" when absent; an object prints as its JSON (OrderedMap.String)."""
    if name not in event:
        return ""
    value = event[name]
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def kept_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> dict[str, str]:
    """The request headers Jitsu keeps for functions (buildIngestMessage): Go's header map
    (canonical names, Host taken out, repeated values joined with ","), minus x-jitsu-* and
    x-vercel* (isInternalHeader), with the write key masked."""
    grouped: dict[str, list[str]] = {}
    for name, value in headers.items():
        if name.lower() in ("host", "transfer-encoding"):
            continue  # Go's server moves Host to Request.Host and drops Transfer-Encoding
        grouped.setdefault(canonical_header(name), []).append(value)
    kept = {}
    for name, values in grouped.items():
        lowered = name.lower()
        if lowered.startswith(("x-jitsu-", "x-vercel")):
            continue
        kept[name] = mask_write_key(values[0]) if lowered == "x-write-key" else ",".join(values)
    return kept


def _client_ip(request: web.Request) -> str:
    return _first_nonempty(
        request.headers.get("X-Real-Ip", ""),
        request.headers.get("X-Forwarded-For", ""),
        request.remote or "",
    )


def _strip_last_octet(ip: str) -> str:
    parts = ip.split(".")
    return ".".join(parts[:3]) + ".0" if len(parts) == 4 else ip


def _filter_event(event: dict[str, Any]) -> None:
    """types.FilterEvent: properties only functions may set are taken out of browser events."""
    for name in (
        "JITSU_TABLE_NAME",
        "JITSU_PROFILE_ID",
        "SALESFORCE_OPERATION",
        "SALESFORCE_SOBJECT",
        "SALESFORCE_MATCHERS_OPERATOR",
        "SALESFORCE_MATCHERS",
        "SALESFORCE_PAYLOAD",
    ):
        event.pop(name, None)
    _drop_sql_types(event)


def _drop_sql_types(value: Any) -> None:
    if isinstance(value, dict):
        for name in [k for k in value if k.startswith("__sql_type")]:
            del value[name]
        for child in value.values():
            _drop_sql_types(child)
    elif isinstance(value, list):
        for child in value:
            _drop_sql_types(child)


def _from_browser(
    request: web.Request, fields: dict[str, Any], ip: str, names: tuple[str, str, str]
) -> None:
    """What Jitsu adds to a browser's event, under the names of its format: the IP it saw ("if
    ip comes from browser, don't trust it!"), and the User-Agent and first language unless the
    event has them."""
    ip_name, agent_name, language_name = names
    if ip:
        fields[ip_name] = ip
    fields.setdefault(agent_name, request.headers.get("User-Agent", ""))
    language = request.headers.get("Accept-Language", "").split(",")[0].strip()
    fields.setdefault(language_name, language)


def _patch_event(
    request: web.Request,
    message_id: str,
    event: dict[str, Any],
    tp: str,
    ingest_type: str,
    analytic_context: dict[str, Any] | None,
    default_event_name: str,
) -> str | None:
    """router.go patchEvent; returns the error text, or None."""
    type_fixed = EVENT_TYPES_DICT.get(tp, tp)
    if type_fixed == "event":
        if default_event_name:
            type_fixed = "track"
        else:
            type_fixed = _get_s(event, "type")
            if not type_fixed:
                return "type property of event is required"
    if type_fixed not in EVENT_TYPES:
        return f"Unknown event type: {type_fixed}"
    if type_fixed == "track":
        event_name = _get_s(event, "event") or default_event_name
        if not event_name:
            return "'event' property is required for 'track' event"
        if len(event_name.encode()) > 128:
            return f"Invalid track event name '{event_name}'. Max length is 128 characters."
        if default_event_name:
            event.setdefault("event", event_name)
    ip = _client_ip(request)
    policy = request.headers.get("X-IP-Policy", "")
    if policy == "stripLastOctet":
        ip = _strip_last_octet(ip)
    elif policy == "remove":
        ip = ""
    if ip:
        event["requestIp"] = ip
    context = event.get("context")
    if not isinstance(context, dict):
        context = event["context"] = {}
    if analytic_context:
        context = event["context"] = {**analytic_context, **context}
    if ingest_type == BROWSER:
        _from_browser(request, context, ip, ("ip", "userAgent", "locale"))
        _filter_event(event)
    now = now_iso()
    event["receivedAt"] = now
    event["type"] = type_fixed
    event.setdefault("timestamp", now)
    event.setdefault("messageId", message_id)
    return None


def _patch_classic_event(
    request: web.Request, message_id: str, event: dict[str, Any], loc: Locator
) -> str | None:
    """router_classic_handler.go patchClassicEvent."""
    ip = _client_ip(request)
    if request.query.get("ip_policy") in ("strict", "comply"):
        ip = _strip_last_octet(ip)
    if loc.ingest_type == BROWSER:
        _from_browser(request, event, ip, ("source_ip", "user_agent", "user_language"))
        _filter_event(event)
    now = now_iso()
    event["_timestamp"] = now
    event["api_key"] = loc.write_key
    event.setdefault("utc_time", now)
    event.setdefault("eventn_ctx_event_id", message_id)
    return None


def _classic_key(request: web.Request) -> tuple[str, str]:
    """The Classic API's own places for the key, after getDataLocator's."""
    for source, value in (
        ("token", request.query.get("token", "")),
        ("x-auth-token", request.headers.get("X-Auth-Token", "")),
        ("api_key", request.headers.get("api_key", "")),
    ):
        if value:
            return value, source
    for name, value in request.query.items():
        if name.startswith("p_"):
            return value, name
    return "", ""


def _pixel_event(request: web.Request) -> dict[str, Any]:
    """parsePixelEvent: `data` (base64 JSON), then every other parameter at its dotted path,
    an array when it is repeated. The write key's parameter too: Jitsu skips only its own."""
    params: dict[str, list[str]] = {}
    for name, value in request.query.items():
        params.setdefault(name, []).append(value)
    event: dict[str, Any] = {}
    data = params.get("data", [""])[0]
    if data:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise JitsuError(
                200,
                "error parsing message",
                f'Error decoding event from "data" field in tracking pixel: {exc}',
            ) from None
        try:
            event = _loads_object(raw)
        except ValueError as exc:
            raise JitsuError(
                200, "error parsing message", f'Error unmarshalling event from "data": {exc}'
            ) from None
    for name, values in params.items():
        if name in ("data", "cookie_domain", "process_headers", "destination_url"):
            continue
        _set_path(event, name, values[0] if len(values) == 1 else values)
    return event


def _set_path(event: dict[str, Any], path: str, value: Any) -> None:
    """OrderedMap.SetPath: a non-object on the way stops it, nothing is set."""
    node = event
    *parents, leaf = path.split(".")
    for part in parents:
        if part not in node:
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            return
        node = child
    node[leaf] = value


def _redirect_url(request: web.Request, event: dict[str, Any]) -> str:
    """extractRedirectUrl: https, default port, another host, not an IP address."""
    if "destination_url" in request.query:
        url = request.query["destination_url"]
    else:
        url = _get_s(event, "destination_url")
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    if port is not None or parts.scheme != "https":
        return ""
    if parts.netloc.rpartition("@")[2] == request.headers.get("Host", ""):
        return ""
    try:
        ipaddress.ip_address((parts.hostname or "").strip("[]"))
    except ValueError:
        return url
    return ""


def _sync_destinations(message: dict[str, Any], stream: Stream) -> dict[str, Any] | None:
    """processSyncDestination, without device functions: the destinations whose filters
    (filters.go ApplyFilters) take the event, in the shape jitsu-js reads."""
    event = message["httpPayload"]
    chosen = [d for d in stream.sync_destinations if _applies(event, d.options)]
    if not chosen:
        return None
    return {
        "destinations": [
            {**d.for_js_lib(), "deviceOptions": DEVICE_OPTIONS[d.type]} for d in chosen
        ],
        "ok": True,
    }


def _applies(event: dict[str, Any], options: dict[str, Any]) -> bool:
    def rules(value: Any) -> list[str]:
        if value is None:
            return ["*"]
        if isinstance(value, str):
            return value.split("\n")
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    context = event.get("context")
    page = context.get("page") if isinstance(context, dict) else None
    host = page.get("host") if isinstance(page, dict) else None
    host = host if isinstance(host, str) else ""

    def host_ok(rule: str) -> bool:
        if rule == "*":
            return True
        return host.endswith(rule[1:]) if rule.startswith("*.") else rule == host

    def same(rule: str, subject: str) -> bool:
        return rule == "*" or rule.strip().lower() == subject.strip().lower()

    return any(host_ok(r) for r in rules(options.get("hosts"))) and any(
        same(r, _get_s(event, "type")) or same(r, _get_s(event, "event"))
        for r in rules(options.get("events"))
    )
