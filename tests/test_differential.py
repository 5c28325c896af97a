"""The same requests sent once straight to a model of Jitsu (tests/jitsumodel.py) and once
through the proxy to it; what Jitsu answered and what it stored are compared field by field.

Every difference must be one of INTENDED below: the differences there on purpose, each with
its reason and with what the proxied side must then be. Anything else fails the test with the
field and both values (issue 8, "How to show it").
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import hdrs
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app import create_app, server_options
from proxy.state import APP_STATE, AppState
from tests.conftest import test_config, until
from tests.jitsumodel import (
    S_LIB_JS,
    Destination,
    JitsuModel,
    Key,
    Stored,
    Stream,
    mask_write_key,
    parse_iso,
    warehouse,
)

SITE_BROWSER = Key("siteBrowserKey", "siteBrowserSecret")
SITE_S2S = Key("siteServerKey", "siteServerSecret")
APP_BROWSER = Key("appBrowserKey", "appBrowserSecret")
WRONG = Key("siteBrowserKey", "notTheSecret")
GTM = Destination("dst-gtm", "gtm", options={"containerId": "GTM-TEST"})
GA4 = Destination(
    "dst-ga4",
    "ga4-tag",
    options={"measurementIds": "G-TEST", "events": "page\nsignup", "functions": ["f1"]},
    credentials={"apiSecret": "Jitsu hands credentials to the browser as they are"},
)
# Filtered out for page views: Jitsu leaves it out of the answer.
LOGROCKET = Destination("dst-lr", "logrocket", options={"appId": "a/b", "events": "track"})


def jitsu_streams() -> list[Stream]:
    """Several streams, so that Jitsu's sole-stream rule never hides a wrong key."""
    return [
        Stream(
            "site",
            name="Shop site",
            browser_keys=[SITE_BROWSER],
            s2s_keys=[SITE_S2S],
            domains=["shop.example"],
        ),
        Stream(
            "app",
            name="App with device destinations",
            browser_keys=[APP_BROWSER],
            destinations=[warehouse(), GTM, GA4, LOGROCKET],
        ),
        Stream("blog", name="Blog, found by its slug", browser_keys=[Key("blogKey", "blogSecret")]),
    ]


# ---- what may differ, and why ------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


MISSING: Any = _Missing()


@dataclasses.dataclass
class Facts:
    """What the proxied values are checked against: the request as the client sent it."""

    key: Key | None = None  # the write key the client sent
    server_key: bool = False  # a server (s2s) key: its type only Jitsu's key store knows
    client_ip: str = "127.0.0.1"  # the client IP the proxy resolves (server.trusted_proxies)
    client_host: str = ""  # the Host the client sent to the proxy
    upstream_host: str = ""  # upstream.url's host and port
    preserve_host: bool = False  # upstream.preserve_host
    pixel: bool = False
    dropped: frozenset[str] = frozenset()  # upstream.drop_headers, lower case


@dataclasses.dataclass
class Side:
    """One way of sending the request: Jitsu's answer and what it stored from it."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    sent: float
    answered: float
    stored: list[Stored]

    def answer(self) -> dict[str, Any]:
        media = self.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip()
        body: Any = self.body
        if media == "application/json" and self.body:
            body = json.loads(self.body)
        return {
            "status": self.status,
            "body": body,
            "headers": {n: self.headers[n] for n in ANSWER_HEADERS if n in self.headers},
        }


# The answer headers a client acts on (Date, Server, Content-Length say nothing about that).
ANSWER_HEADERS = (
    hdrs.CONTENT_TYPE,
    hdrs.ACCESS_CONTROL_ALLOW_ORIGIN,
    hdrs.ACCESS_CONTROL_ALLOW_METHODS,
    hdrs.ACCESS_CONTROL_ALLOW_HEADERS,
    hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS,
    hdrs.ACCESS_CONTROL_MAX_AGE,
    hdrs.CACHE_CONTROL,
    hdrs.PRAGMA,
    hdrs.EXPIRES,
    hdrs.LOCATION,
    hdrs.VARY,
    "X-Jitsu-Error",
)


@dataclasses.dataclass
class Pair:
    direct: Side
    proxied: Side
    facts: Facts


@dataclasses.dataclass(frozen=True)
class Intended:
    reason: str
    # Given the direct value, the proxied one and the pair: is the proxied value the intended one?
    holds: Callable[[Any, Any, Pair], bool]


def _floor_ms(t: float) -> float:
    return math.floor(t * 1000) / 1000


def _within(stamp: Any, side: Side) -> bool:
    """A Jitsu time stamped while this side's request was under way."""
    return isinstance(stamp, str) and _floor_ms(side.sent) <= parse_iso(stamp) <= side.answered


def _uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _key_gone(d: Any, p: Any, pair: Pair) -> bool:
    return p is MISSING


def _readable(accept_encoding: str) -> Any:
    codings = [t.strip() for t in accept_encoding.split(",")]
    kept = [t for t in codings if t.split(";")[0].strip() in ("gzip", "deflate")]
    return ", ".join(kept) if kept else MISSING


def _masked(d: Any, p: Any, pair: Pair) -> bool:
    key = pair.facts.key
    return key is not None and p == mask_write_key(key.value)


def _the_client_ip(d: Any, p: Any, pair: Pair) -> bool:
    return p == pair.facts.client_ip


def _delivered_later(d: Any, p: Any, pair: Pair) -> bool:
    return (
        _within(d, pair.direct)
        and isinstance(p, str)
        and (parse_iso(p) >= _floor_ms(pair.proxied.sent))
    )


def _secret_masked(d: Any, p: Any, pair: Pair) -> bool:
    key = pair.facts.key
    return key is not None and isinstance(d, str) and p == d.replace(key.value, key.id + ":***")


def _jitsu_cookies(header: str) -> str:
    kept = [p.strip() for p in header.split(";") if p.strip().startswith(("__eventn_", "__group_"))]
    return "; ".join(kept)


def _cookies(d: Any, p: Any, pair: Pair) -> bool:
    kept = _jitsu_cookies(d) if pair.facts.pixel and isinstance(d, str) else ""
    return p == (kept or MISSING)


def _upstream_host(d: Any, p: Any, pair: Pair) -> bool:
    return not pair.facts.preserve_host and p == pair.facts.upstream_host


def _upstream_domain(d: Any, p: Any, pair: Pair) -> bool:
    return not pair.facts.preserve_host and p == pair.facts.upstream_host.split(":")[0]


HOP_BY_HOP = Intended(
    "Hop-by-hop headers belong to the client's connection to the proxy, not to the request",
    _key_gone,
)
SECRET_HEADER = Intended(
    "The write key's secret is taken out of wherever it arrived; upstream gets the key in "
    "X-Write-Key only (README: one place for the write key)",
    _key_gone,
)
CLIENT_IP = Intended(
    "The client IP is resolved through server.trusted_proxies: forwarding headers from anyone "
    "else are ignored, and a chain is believed only up to the first hop the proxy cannot vouch "
    "for; Jitsu believes the first entry of any X-Real-IP or X-Forwarded-For",
    _the_client_ip,
)
RECEIVED = Intended(
    "Jitsu's time of receipt: through the proxy, the time of delivery",
    _delivered_later,
)

# The differences that are there on purpose: field (a path into the stored ingest message, or
# `answer.…`; `*` matches anything) -> why, and what the proxied value must be.
INTENDED: dict[str, Intended] = {
    "httpHeaders.Authorization": SECRET_HEADER,
    "httpHeaders.X-Auth-Token": SECRET_HEADER,
    "httpHeaders.Api_key": SECRET_HEADER,
    "httpPayload.writekey": Intended(
        "Jitsu copies every pixel query parameter into the event, ?writekey= with its secret "
        "included; the proxy takes the key out of the query and sends it in X-Write-Key",
        _key_gone,
    ),
    "httpHeaders.X-Write-Key": Intended(
        "Wherever the key arrived, upstream gets it in X-Write-Key (Jitsu stores it masked)",
        _masked,
    ),
    "keySource": Intended(
        "Upstream finds the key in X-Write-Key, wherever the client put it",
        lambda d, p, pair: p == "x-write-key",
    ),
    "httpHeaders.Content-Length": Intended(
        "The body upstream gets carries what the edge added (messageId, timestamp) and lacks "
        "what it took out (the key of a batch body), so its length differs",
        lambda d, p, pair: isinstance(p, str) and p.isdigit(),
    ),
    "httpHeaders.Accept-Encoding": Intended(
        "Only the codings the proxy can read in Jitsu's answer go upstream (Jitsu itself only "
        "ever gzips); a browser's br or zstd is left out",
        lambda d, p, pair: p == (_readable(d) if isinstance(d, str) else MISSING),
    ),
    "httpHeaders.Content-Encoding": Intended(
        "A gzip batch is inflated at the edge (its events are checked and stamped there) and "
        "goes upstream as plain JSON",
        _key_gone,
    ),
    "httpHeaders.X-Real-Ip": CLIENT_IP,
    "httpHeaders.X-Forwarded-For": CLIENT_IP,
    "httpPayload.requestIp": CLIENT_IP,
    "httpPayload.context.ip": CLIENT_IP,
    "httpPayload.source_ip": CLIENT_IP,
    "httpPayload.receivedAt": RECEIVED,
    "messageCreated": RECEIVED,
    "httpPayload._timestamp": RECEIVED,
    "httpPayload.timestamp": Intended(
        "An event without a timestamp gets the time it was accepted: by Jitsu when sent "
        "straight, by the proxy when sent through it, so that a backlog delivered after an "
        "outage keeps its real event times (issue 8)",
        lambda d, p, pair: _within(d, pair.direct) and _within(p, pair.proxied),
    ),
    "httpPayload.messageId": Intended(
        "An event without a messageId (none, null or empty) gets a new one at the edge, so that "
        "every resend carries the same one and deduplicates; Jitsu gives one only to an event "
        "that has none, and uses a new one of its own for the others",
        lambda d, p, pair: (_uuid(d) or d in (None, "")) and _uuid(p),
    ),
    "messageId": Intended(
        "(the ingest message's id is the event's messageId, given at the edge)",
        lambda d, p, pair: p in {s.payload.get("messageId") for s in pair.proxied.stored},
    ),
    "httpHeaders.Cookie": Intended(
        "Cookies are the site's: only Jitsu's own (__eventn_*, __group_*) go upstream, and only "
        "from the pixel",
        _cookies,
    ),
    "httpHeaders.X-Forwarded-Host": Intended(
        "The Host the client asked for, for Jitsu's functions (Jitsu sees upstream.url's host)",
        lambda d, p, pair: d is MISSING and p == pair.facts.client_host,
    ),
    "httpHeaders.X-Forwarded-Proto": Intended(
        "The scheme the client used", lambda d, p, pair: d is MISSING and p == "http"
    ),
    "httpHeaders.<one of upstream.drop_headers>": Intended(
        "Headers the operator chose not to send upstream", _key_gone
    ),
    "httpHeaders.Connection": HOP_BY_HOP,
    "httpHeaders.Keep-Alive": HOP_BY_HOP,
    "httpHeaders.Te": HOP_BY_HOP,
    "host": Intended(
        "Without upstream.preserve_host the upstream request carries upstream.url's Host; the "
        "client's rides in X-Forwarded-Host (streams found by key are the same)",
        _upstream_host,
    ),
    "origin.domain": Intended("(Jitsu's domain is the Host without port)", _upstream_domain),
    "answer.headers.Vary": Intended(
        "Every answer of a public route says Vary: Origin, so that a shared cache does not hand "
        "one site's CORS answer to another (issue 7)",
        lambda d, p, pair: "Origin" in str(p),
    ),
    "answer.headers.Content-Type": Intended(
        "The same media type; Jitsu's JSON answers name charset=utf-8 and the proxy's do not "
        "(JSON is UTF-8 by definition, RFC 8259)",
        lambda d, p, pair: str(d).split(";")[0] == str(p).split(";")[0],
    ),
    "answer.status": Intended(
        "A refused event on a browser route is answered 200 with the error (as Jitsu answers "
        "browser keys) before it goes upstream; Jitsu answers 400 when the key is a server key, "
        "a type that only its key store knows",
        lambda d, p, pair: (d, p) == (400, 200) and pair.facts.server_key,
    ),
    "answer.body.error": Intended(
        "Jitsu repeats the write key whole in 'stream not found'; a proxy answer never carries "
        "the secret",
        _secret_masked,
    ),
    "answer.headers.X-Jitsu-Error": Intended("(the pixel's error)", _secret_masked),
    # Not a field: the order of answers.
    "answer@first request with an unknown key": Intended(
        "On s2s, batch and pixel routes the proxy answers from its buffer before Jitsu has "
        "seen the key; it learns Jitsu's refusal from that first request and answers later "
        "ones as Jitsu does (upstream.key_refusal_ttl_s)",
        lambda d, p, pair: pair.proxied.status == 200,
    ),
}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """Leaves by their dotted path; an object is also a leaf of its own, `{}`, so that an
    empty object differs from an absent one."""
    if isinstance(value, dict):
        if prefix:
            out[prefix] = {}
        for name, child in value.items():
            _flatten(child, f"{prefix}.{name}" if prefix else str(name), out)
    else:
        out[prefix] = value
    return out


def _view(stored: Stored) -> dict[str, Any]:
    return {
        **stored.message,
        "stream": stored.stream,
        "key": stored.key,
        "keySource": stored.key_source,
        "host": stored.host,
    }


def _intended(path: str, facts: Facts) -> Intended | None:
    section, _, name = path.partition(".")
    if section == "httpHeaders" and name.lower() in facts.dropped:
        return INTENDED["httpHeaders.<one of upstream.drop_headers>"]
    return INTENDED.get(path)


def unexplained(pair: Pair) -> list[str]:
    """Every difference between the two sides that INTENDED does not explain."""
    problems = []
    d_stored, p_stored = pair.direct.stored, pair.proxied.stored
    if len(d_stored) != len(p_stored):
        problems.append(f"events stored: {len(d_stored)} sent straight, {len(p_stored)} proxied")
    sides = [("answer", pair.direct.answer(), pair.proxied.answer())]
    sides += [("", _view(d), _view(p)) for d, p in zip(d_stored, p_stored, strict=False)]
    for prefix, direct, proxied in sides:
        d_flat, p_flat = _flatten(direct, prefix, {}), _flatten(proxied, prefix, {})
        for path in sorted(d_flat.keys() | p_flat.keys()):
            d, p = d_flat.get(path, MISSING), p_flat.get(path, MISSING)
            if d == p:
                continue
            entry = _intended(path, pair.facts)
            if entry is None:
                problems.append(f"{path}: straight {d!r}, proxied {p!r} (not intended)")
            elif not entry.holds(d, p, pair):
                problems.append(f"{path}: straight {d!r}, proxied {p!r} ({entry.reason})")
    return problems


def assert_same(pair: Pair) -> None:
    problems = unexplained(pair)
    assert not problems, "Jitsu sees a difference through the proxy:\n" + "\n".join(problems)


# ---- running both sides ----------------------------------------------------------------------


@dataclasses.dataclass
class Differential:
    model: JitsuModel
    session: aiohttp.ClientSession
    proxy_url: str
    state: AppState

    async def send(self, base: str, method: str, path: str, **kw: Any) -> Side:
        sent = time.time()
        async with self.session.request(method, base + path, allow_redirects=False, **kw) as r:
            body = await r.read()
            return Side(r.status, r.headers, body, sent, time.time(), [])

    async def straight(self, method: str, path: str, **kw: Any) -> Side:
        mark = len(self.model.stored)
        side = await self.send(self.model.url, method, path, **kw)
        side.stored = self.model.stored[mark:]
        return side

    async def proxied(self, method: str, path: str, **kw: Any) -> Side:
        """Through the proxy; returns once the proxy has settled what it buffered (delivered
        it or dead-lettered it)."""
        mark = len(self.model.stored)
        side = await self.send(self.proxy_url, method, path, **kw)
        await until(lambda: self.state.buffer.rows == 0)
        side.stored = self.model.stored[mark:]
        return side

    async def both(self, method: str, path: str, facts: Facts | None = None, **kw: Any) -> Pair:
        direct = await self.straight(method, path, **kw)
        proxied = await self.proxied(method, path, **kw)
        return Pair(direct, proxied, self.facts(facts, path, kw))

    def facts(self, facts: Facts | None, path: str, kw: dict[str, Any]) -> Facts:
        facts = dataclasses.replace(facts or Facts())
        host = CIMultiDict(kw.get("headers") or {}).get("Host")
        facts.client_host = host or self.proxy_url.split("//", 1)[1]
        facts.upstream_host = self.model.netloc
        upstream = self.state.config.upstream
        facts.preserve_host = bool(getattr(upstream, "preserve_host", False))
        facts.dropped = frozenset(h.lower() for h in getattr(upstream, "drop_headers", ()))
        facts.pixel = path.startswith("/api/px/")
        return facts


Start = Callable[..., Awaitable[Differential]]


@pytest.fixture
async def model() -> AsyncIterator[JitsuModel]:
    jitsu = JitsuModel(jitsu_streams(), data_hosts=("data.example",))
    await jitsu.start()
    yield jitsu
    await jitsu.stop()


@pytest.fixture
async def start(tmp_path: Path, model: JitsuModel) -> AsyncIterator[Start]:
    """The proxy (built by the app factory, as in the other tests) in front of the model, and a
    client that sends no header of its own: each test says which headers the client sends."""
    servers: list[TestServer] = []
    session = aiohttp.ClientSession(
        skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING)
    )

    async def factory(**overrides: Any) -> Differential:
        config = test_config(tmp_path, model.url, **overrides)
        server = TestServer(create_app(config))
        await server.start_server(**server_options(config))
        servers.append(server)
        url = str(server.make_url("")).rstrip("/")
        return Differential(model, session, url, server.app[APP_STATE])

    yield factory
    await session.close()
    for server in servers:
        await server.close()


def basic(key: Key) -> str:
    return "Basic " + base64.b64encode(f"{key.value}:".encode()).decode()


def b64(event: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(event).encode()).decode()


BROWSER_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0",
    "Accept-Language": "de-DE,de;q=0.9,en;q=0.8",
    "Origin": "https://shop.example",
    "Referer": "https://shop.example/cart?step=2",
}


# ---- single events -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "event"),
    [
        ("/api/s/page", {"properties": {"title": "Cart"}, "anonymousId": "anon-1"}),
        ("/api/s/t", {"event": "signup", "userId": "u1", "messageId": "client-id-1"}),
        ("/api/s/event", {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}),
        (
            "/api/s/track",
            {"event": "paid", "timestamp": "2024-05-01T10:00:00.000Z", "context": {"x": 1}},
        ),
    ],
)
async def test_browser_event_is_stored_as_jitsu_stores_it(
    start: Start, path: str, event: dict[str, Any]
) -> None:
    diff = await start()
    headers = {"X-Write-Key": SITE_BROWSER.value, **BROWSER_HEADERS}
    pair = await diff.both("POST", path, Facts(key=SITE_BROWSER), json=event, headers=headers)
    assert pair.direct.answer()["body"] == {"ok": True} and len(pair.direct.stored) == 1
    assert_same(pair)


@pytest.mark.parametrize(
    "where", ["authorization", "x-write-key", "query", "browser key on the s2s path"]
)
async def test_s2s_event_with_the_key_anywhere(start: Start, where: str) -> None:
    diff = await start()
    key = SITE_BROWSER if where.startswith("browser") else SITE_S2S
    headers: dict[str, str] = {"User-Agent": "shop-backend/2.1"}
    params = {}
    if where == "authorization":
        headers["Authorization"] = basic(key)
    elif where == "query":
        params["writekey"] = key.value
    else:
        headers["X-Write-Key"] = key.value
    pair = await diff.both(
        "POST",
        "/api/s/s2s/track",
        Facts(key=key),
        json={"event": "order_shipped", "userId": "u7", "properties": {"total": 12.5}},
        headers=headers,
        params=params,
    )
    assert pair.direct.status == 200 and len(pair.direct.stored) == 1
    assert_same(pair)


async def test_null_timestamp_and_message_id(start: Start) -> None:
    """Jitsu sets timestamp and messageId only where the event has none (SetIfAbsent): a null
    timestamp is the client's and stays; a null messageId gets the edge's id (INTENDED)."""
    diff = await start()
    pair = await diff.both(
        "POST",
        "/api/s/s2s/track",
        Facts(key=SITE_S2S),
        json={"event": "e", "timestamp": None, "messageId": None},
        headers={"X-Write-Key": SITE_S2S.value},
    )
    assert pair.direct.stored[0].payload["timestamp"] is None
    assert_same(pair)


async def test_no_user_agent_of_the_proxys_own(start: Start) -> None:
    """A client without User-Agent or Accept-Language: Jitsu stores empty ones (patchEvent),
    and so it does through the proxy (issue 8, point 5)."""
    diff = await start()
    pair = await diff.both(
        "POST",
        "/api/s/page",
        Facts(key=SITE_BROWSER),
        json={"anonymousId": "a1"},
        headers={"X-Write-Key": SITE_BROWSER.value},
    )
    (stored,) = pair.proxied.stored
    assert stored.payload["context"]["userAgent"] == ""
    assert "User-Agent" not in stored.headers
    assert_same(pair)


@pytest.mark.parametrize(
    ("case", "headers", "trusted", "client_ip"),
    [
        ("one hop", {"X-Forwarded-For": "203.0.113.7"}, None, "203.0.113.7"),
        ("X-Real-IP", {"X-Real-IP": "198.51.100.4"}, None, "198.51.100.4"),
        (
            "a chain: the hop next to the proxy",
            {"X-Forwarded-For": "203.0.113.7, 10.1.2.3"},
            None,
            "10.1.2.3",
        ),
        ("forged by an untrusted peer", {"X-Forwarded-For": "203.0.113.7"}, ["10.0.0.0/8"], None),
        ("Jitsu's IP policy", {"X-IP-Policy": "stripLastOctet"}, None, "127.0.0.1"),
    ],
)
async def test_client_ip(
    start: Start, case: str, headers: dict[str, str], trusted: list[str] | None, client_ip: str
) -> None:
    overrides = {"server": {"trusted_proxies": trusted}} if trusted else {}
    diff = await start(**overrides)
    pair = await diff.both(
        "POST",
        "/api/s/page",
        Facts(key=SITE_BROWSER, client_ip=client_ip or "127.0.0.1"),
        json={},
        headers={"X-Write-Key": SITE_BROWSER.value, **headers},
    )
    if case == "Jitsu's IP policy":
        assert pair.proxied.stored[0].payload["context"]["ip"] == "127.0.0.0"
    assert_same(pair)


@pytest.mark.parametrize("key", [SITE_BROWSER, SITE_S2S], ids=["browser key", "server key"])
@pytest.mark.parametrize(
    ("path", "event"),
    [
        ("/api/s/track", {"properties": {}}),
        ("/api/s/s2s/track", {"properties": {}}),
        ("/api/s/login", {}),
        ("/api/s/event", {"type": 5}),
        ("/api/s/track", {"event": "x" * 129}),
    ],
)
async def test_refused_event_is_answered_as_jitsu_answers(
    start: Start, path: str, event: dict[str, Any], key: Key
) -> None:
    diff = await start()
    facts = Facts(key=key, server_key=key is SITE_S2S)
    pair = await diff.both("POST", path, facts, json=event, headers={"X-Write-Key": key.value})
    assert "event error" in pair.direct.answer()["body"]["error"]
    assert_same(pair)


@pytest.mark.parametrize("content_type", ["text/html", "Application/JSON"])
@pytest.mark.parametrize("path", ["/api/s/page", "/api/s/s2s/page", "/v1/batch"])
async def test_content_type(start: Start, content_type: str, path: str) -> None:
    """Jitsu takes a media type ending in application/json or text/plain, as sent, case and
    all (gin's ContentType and strings.HasSuffix), and answers 400 to others on every route
    (text/plain: test_beacon_content_type_reaches_jitsu)."""
    diff = await start()
    pair = await diff.both(
        "POST",
        path,
        Facts(key=SITE_BROWSER),
        data=json.dumps({"batch": [{"type": "page"}]} if path == "/v1/batch" else {}),
        headers={"X-Write-Key": SITE_BROWSER.value, "Content-Type": content_type},
    )
    assert pair.direct.status == 400
    assert_same(pair)


# ---- batches -------------------------------------------------------------------------------

BATCH = {
    "batch": [
        {"type": "track", "event": "viewed", "anonymousId": "a1", "context": {"page": {"n": 1}}},
        {
            "type": "identify",
            "userId": "u1",
            "messageId": "batch-msg-2",
            "timestamp": "2024-05-01T10:00:00.000Z",
        },
    ],
    "context": {"library": {"name": "analytics-python", "version": "2.3"}, "page": {"n": 0}},
}


@pytest.mark.parametrize("where", ["body", "authorization", "query", "x-write-key"])
async def test_batch_with_the_key_anywhere(start: Start, where: str) -> None:
    diff = await start()
    payload: dict[str, Any] = json.loads(json.dumps(BATCH))
    headers = {"User-Agent": "analytics-python/2.3"}
    params = {}
    if where == "body":
        payload["writeKey"] = SITE_S2S.value
    elif where == "authorization":
        headers["Authorization"] = basic(SITE_S2S)
    elif where == "query":
        params["writekey"] = SITE_S2S.value
    else:
        headers["X-Write-Key"] = SITE_S2S.value
    pair = await diff.both(
        "POST", "/v1/batch", Facts(key=SITE_S2S), json=payload, headers=headers, params=params
    )
    assert pair.direct.answer()["body"] == {"ok": True, "receivedEvents": 2, "okEvents": 2}
    assert_same(pair)


async def test_batch_with_refused_events_and_events_name(start: Start) -> None:
    diff = await start()
    payload = {
        "writeKey": SITE_S2S.value,
        "eventsName": "imported",
        "batch": [
            {"userId": "u1"},
            {"event": "x" * 129, "messageId": "too-long"},
            {"event": "kept", "type": "page"},
        ],
    }
    pair = await diff.both("POST", "/b", Facts(key=SITE_S2S), json=payload)
    assert pair.direct.answer()["body"]["okEvents"] == 2
    assert_same(pair)


async def test_batch_with_an_unknown_event_type(start: Start) -> None:
    diff = await start()
    payload = {
        "writeKey": SITE_BROWSER.value,
        "batch": [{"type": "login", "messageId": "m-bad"}, {"type": "page", "messageId": "m-ok"}],
    }
    pair = await diff.both(
        "POST", "/api/s/s2s/batch", Facts(key=SITE_BROWSER), json=payload, headers=BROWSER_HEADERS
    )
    assert pair.direct.answer()["body"]["errors"] == [
        "Message ID: m-bad: event error: Unknown event type: login"
    ]
    assert_same(pair)


async def test_gzip_batch(start: Start) -> None:
    diff = await start()
    body = gzip.compress(json.dumps({**BATCH, "writeKey": SITE_S2S.value}).encode())
    pair = await diff.both(
        "POST",
        "/v1/batch",
        Facts(key=SITE_S2S),
        data=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert len(pair.direct.stored) == 2
    assert_same(pair)


# ---- the pixel -----------------------------------------------------------------------------


async def test_pixel_answers_the_gif_and_stores_the_event(start: Start) -> None:
    diff = await start()
    pair = await diff.both(
        "GET",
        "/api/px/track",
        Facts(key=SITE_BROWSER),
        params={
            "writekey": SITE_BROWSER.value,
            "data": b64({"event": "email_opened", "userId": "u3", "properties": {"n": 1}}),
            "properties.campaign": "spring",
            "context.page.host": "mail.example",
        },
        headers={
            "Cookie": "__eventn_id=anon-9; session=private; __group_id=g1",
            **BROWSER_HEADERS,
        },
    )
    assert pair.direct.answer()["headers"][hdrs.CONTENT_TYPE] == "image/gif"
    assert pair.direct.body == pair.proxied.body and len(pair.direct.body) == 43
    assert_same(pair)


async def test_pixel_redirects_as_jitsu_does(start: Start) -> None:
    diff = await start()
    pair = await diff.both(
        "GET",
        "/api/px/page",
        Facts(key=SITE_BROWSER),
        params={
            "writekey": SITE_BROWSER.value,
            "data": b64({"destination_url": "https://shop.example/landing"}),
        },
    )
    assert pair.direct.status == 302
    assert_same(pair)


async def test_pixel_repeated_parameter_becomes_an_array(start: Start) -> None:
    diff = await start()
    pair = await diff.both(
        "GET",
        "/api/px/track?event=clicked&properties.tag=a&properties.tag=b",
        Facts(key=SITE_BROWSER),
        headers={"X-Write-Key": SITE_BROWSER.value},
    )
    assert pair.direct.stored[0].payload["properties"]["tag"] == ["a", "b"]
    assert_same(pair)


# ---- times ---------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["s2s", "batch", "pixel"])
async def test_timestamp_is_the_time_of_acceptance_when_delivery_is_late(
    start: Start, model: JitsuModel, route: str
) -> None:
    """Upstream is unavailable at first (two 503s from its load balancer): Jitsu then stamps
    receivedAt at delivery, and the event keeps the time the proxy accepted it as its
    timestamp, where sent straight it would have been Jitsu's time of receipt (issue 8,
    point 3)."""
    diff = await start()
    headers = {"X-Write-Key": SITE_S2S.value}
    request: dict[str, Any]
    if route == "s2s":
        request = {"path": "/api/s/s2s/track", "json": {"event": "late"}, "headers": headers}
    elif route == "batch":
        batch = {"batch": [{"type": "track", "event": "late"}]}
        request = {"path": "/v1/batch", "json": batch, "headers": headers}
    else:
        params = {"event": "late", "writekey": SITE_S2S.value}
        request = {"path": "/api/px/track", "params": params}
    method = "GET" if route == "pixel" else "POST"
    path = request.pop("path")
    direct = await diff.straight(method, path, **request)
    (straight,) = direct.stored
    assert straight.payload["timestamp"] == straight.payload["receivedAt"]

    model.unavailable = 2
    proxied = await diff.proxied(method, path, **request)
    refusals = [e for e in model.event_exchanges() if e.status == 503]
    assert len(refusals) == 2
    (late,) = proxied.stored
    # Stamped while the proxy took the request, delivered after upstream refused it twice.
    assert _within(late.payload["timestamp"], proxied)
    assert parse_iso(late.payload["receivedAt"]) >= _floor_ms(refusals[-1].at)
    assert late.payload["receivedAt"] > late.payload["timestamp"]
    pair = Pair(direct, proxied, diff.facts(Facts(key=SITE_S2S), path, request))
    assert_same(pair)


# ---- answers of their own --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/s/page", "/api/s/s2s/track", "/v1/batch", "/api/px/page"])
@pytest.mark.parametrize("origin", [None, "https://shop.example"])
async def test_cors_preflight(start: Start, path: str, origin: str | None) -> None:
    diff = await start()
    headers = {"Origin": origin} if origin else {}
    pair = await diff.both(
        "OPTIONS", path, headers={**headers, "Access-Control-Request-Method": "POST"}
    )
    assert pair.direct.status == 200
    assert_same(pair)


@pytest.mark.parametrize(
    "path", ["/health", "/robots.txt", "/v1/projects/someKey/settings", "/projects"]
)
async def test_own_endpoints_of_jitsu(start: Start, path: str) -> None:
    diff = await start()
    pair = await diff.both("GET", path)
    assert pair.direct.status == 200 and pair.direct.body == pair.proxied.body
    assert_same(pair)


async def test_s2s_answer_on_a_stream_with_device_destinations(start: Start) -> None:
    """Device destinations are for browsers: the s2s route answers {"ok":true}."""
    diff = await start()
    pair = await diff.both(
        "POST",
        "/api/s/s2s/page",
        Facts(key=APP_BROWSER),
        json={"anonymousId": "a1"},
        headers={"X-Write-Key": APP_BROWSER.value},
    )
    assert pair.direct.answer()["body"] == {"ok": True}
    assert_same(pair)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"type": "page", "context": {"page": {"host": "app.example"}}}, ["dst-gtm", "dst-ga4"]),
        ({"type": "track", "event": "signup"}, ["dst-gtm", "dst-ga4", "dst-lr"]),
    ],
)
async def test_browser_answer_carries_the_device_destinations(
    start: Start, event: dict[str, Any], expected: list[str]
) -> None:
    diff = await start()
    pair = await diff.both(
        "POST",
        f"/api/s/{event['type']}",
        Facts(key=APP_BROWSER),
        json=event,
        headers={"X-Write-Key": APP_BROWSER.value, **BROWSER_HEADERS},
    )
    answer = pair.direct.answer()["body"]
    assert [d["id"] for d in answer["destinations"]] == expected
    assert_same(pair)


# ---- wrong keys ----------------------------------------------------------------------------


async def test_wrong_key_on_the_browser_route(start: Start, model: JitsuModel) -> None:
    """Jitsu answers 200 with the error; with sync_browser the first request already gets it."""
    diff = await start()
    pair = await diff.both(
        "POST",
        "/api/s/page",
        Facts(key=WRONG),
        json={"anonymousId": "a1"},
        headers={"X-Write-Key": WRONG.value, **BROWSER_HEADERS},
    )
    assert pair.direct.status == 200
    assert pair.direct.answer()["body"]["error"].startswith("stream not found")
    assert_same(pair)


WRONG_KEY_REQUESTS = {
    "s2s": ("POST", "/api/s/s2s/track", {"json": {"event": "e"}}),
    "batch": ("POST", "/v1/batch", {"json": {"batch": [{"type": "page"}]}}),
    "batch, key in the body": (
        "POST",
        "/v1/batch",
        {"json": {"batch": [{"type": "page"}], "writeKey": WRONG.value}},
    ),
    "pixel": ("GET", "/api/px/page", {"params": {"writekey": WRONG.value}}),
}


@pytest.mark.parametrize("route", list(WRONG_KEY_REQUESTS))
async def test_wrong_key_is_answered_as_jitsu_answers_once_known(
    start: Start, model: JitsuModel, route: str
) -> None:
    diff = await start()
    method, path, kw = WRONG_KEY_REQUESTS[route]
    if "writeKey" not in kw.get("json", {}) and "params" not in kw:
        kw = {**kw, "headers": {"X-Write-Key": WRONG.value}}
    direct = await diff.straight(method, path, **kw)
    assert direct.stored == [] and (direct.status == 401 or "X-Jitsu-Error" in direct.headers)
    first = await diff.proxied(method, path, **kw)
    facts = diff.facts(Facts(key=WRONG), path, kw)
    first_answer = INTENDED["answer@first request with an unknown key"]
    assert first_answer.holds(None, None, Pair(direct, first, facts)), first_answer.reason
    forwarded = len(model.event_exchanges())
    later = await diff.proxied(method, path, **kw)
    assert len(model.event_exchanges()) == forwarded, "a known wrong key goes upstream no more"
    assert_same(Pair(direct, later, facts))


# ---- request headers and Host --------------------------------------------------------------


async def test_request_headers_reach_jitsus_functions(start: Start) -> None:
    diff = await start()
    headers = {
        "X-Write-Key": SITE_BROWSER.value,
        **BROWSER_HEADERS,
        "Accept": "*/*",
        "Accept-Encoding": "gzip, deflate, br",
        "Cache-Control": "no-cache",
        "DNT": "1",
        "Sec-Fetch-Site": "cross-site",
        "Sec-Ch-Ua-Platform": '"Linux"',
        "X-Request-Id": "req-42",
        "X-Jitsu-Custom": "dropped by Jitsu itself",
        "X-Vercel-Ip-Country": "DE",
        "Cookie": "session=private",
        "Connection": "keep-alive",
    }
    pair = await diff.both("POST", "/api/s/page", Facts(key=SITE_BROWSER), json={}, headers=headers)
    stored = pair.proxied.stored[0].headers
    assert stored["X-Request-Id"] == "req-42" and stored["Sec-Ch-Ua-Platform"] == '"Linux"'
    assert_same(pair)


async def test_repeated_request_header_is_joined_as_jitsu_joins_it(start: Start) -> None:
    diff = await start()
    headers = [("X-Write-Key", SITE_S2S.value), ("X-Trace", "a"), ("X-Trace", "b")]
    pair = await diff.both(
        "POST", "/api/s/s2s/track", Facts(key=SITE_S2S), json={"event": "e"}, headers=headers
    )
    assert pair.direct.stored[0].headers["X-Trace"] == "a,b"
    assert_same(pair)


async def test_beacon_content_type_reaches_jitsu(start: Start) -> None:
    """navigator.sendBeacon sends text/plain; Jitsu takes it and keeps it in the headers."""
    diff = await start()
    pair = await diff.both(
        "POST",
        "/api/s/page",
        Facts(key=SITE_BROWSER),
        data=json.dumps({"anonymousId": "a1"}),
        headers={"X-Write-Key": SITE_BROWSER.value, "Content-Type": "text/plain;charset=UTF-8"},
    )
    assert_same(pair)


async def test_client_host_rides_in_x_forwarded_host(start: Start) -> None:
    diff = await start()
    pair = await diff.both(
        "POST",
        "/api/s/page",
        Facts(key=SITE_BROWSER),
        json={},
        headers={"X-Write-Key": SITE_BROWSER.value, "Host": "shop.example"},
    )
    (stored,) = pair.proxied.stored
    assert stored.headers["X-Forwarded-Host"] == "shop.example"
    assert stored.headers["X-Forwarded-Proto"] == "http"
    assert_same(pair)


@pytest.mark.parametrize(
    ("host", "stream"), [("shop.example", "site"), ("blog.data.example", "blog")]
)
async def test_preserve_host_finds_the_stream_by_domain_or_slug(
    start: Start, host: str, stream: str
) -> None:
    """A key-less event: Jitsu finds its stream by the Host (custom domain, or slug under its
    data domain), which it sees only with upstream.preserve_host."""
    diff = await start(upstream={"preserve_host": True})
    pair = await diff.both(
        "POST", "/api/s/page", json={"anonymousId": "a1"}, headers={"Host": host}
    )
    assert [s.stream for s in pair.direct.stored] == [stream]
    assert_same(pair)


async def test_drop_headers(start: Start) -> None:
    diff = await start(upstream={"drop_headers": ["X-Internal-Token"]})
    pair = await diff.both(
        "POST",
        "/api/s/s2s/track",
        Facts(key=SITE_S2S),
        json={"event": "e"},
        headers={"X-Write-Key": SITE_S2S.value, "X-Internal-Token": "t", "X-Kept": "k"},
    )
    (stored,) = pair.proxied.stored
    assert "X-Internal-Token" not in stored.headers and stored.headers["X-Kept"] == "k"
    assert_same(pair)


# ---- Jitsu Classic -------------------------------------------------------------------------

CLASSIC_EVENT = {
    "event_type": "pageview",
    "eventn_ctx_event_id": "classic-1",
    "utc_time": "2024-05-01T10:00:00.000000Z",
    "user": {"anonymous_id": "anon-c"},
    "page_title": "Cart",
}


@pytest.mark.parametrize(
    ("path", "key", "where"),
    [
        ("/api/v1/event", SITE_BROWSER, "token"),
        ("/api/v1/event", SITE_BROWSER, "x-write-key"),
        ("/api/v1/events", SITE_BROWSER, "api_key"),
        ("/api.track", SITE_BROWSER, "p_key"),
        ("/api/v1/s2s/event", SITE_S2S, "x-auth-token"),
        ("/api/v1/s2s/events", SITE_S2S, "authorization"),
    ],
)
async def test_classic_api(start: Start, path: str, key: Key, where: str) -> None:
    diff = await start()
    headers = {"User-Agent": "classic-client/1", "Accept-Language": "fr-FR"}
    params = {}
    if where in ("token", "p_key"):
        params[where] = key.value
    elif where == "authorization":
        headers["Authorization"] = basic(key)
    else:
        headers[
            {"x-write-key": "X-Write-Key", "x-auth-token": "X-Auth-Token"}.get(where, where)
        ] = key.value
    events: Any = CLASSIC_EVENT
    if path.endswith("events"):
        events = [CLASSIC_EVENT, {**CLASSIC_EVENT, "eventn_ctx_event_id": "classic-2"}]
    pair = await diff.both(
        "POST", path, Facts(key=key), json=events, headers=headers, params=params
    )
    assert pair.direct.stored and pair.direct.stored[0].payload["api_key"] == key.value
    assert_same(pair)


async def test_classic_wrong_key(start: Start) -> None:
    """Classic routes look keys up strictly: a server key on the browser route is unknown."""
    diff = await start()
    kw: dict[str, Any] = {"json": CLASSIC_EVENT, "params": {"token": SITE_S2S.value}}
    direct = await diff.straight("POST", "/api/v1/event", **kw)
    assert direct.answer()["body"]["error"].startswith("stream not found")
    await diff.proxied("POST", "/api/v1/event", **kw)
    later = await diff.proxied("POST", "/api/v1/event", **kw)
    assert_same(Pair(direct, later, diff.facts(Facts(key=SITE_S2S), "/api/v1/event", kw)))


async def test_classic_script(start: Start) -> None:
    diff = await start()
    pair = await diff.both("GET", "/s/lib.js")
    assert pair.direct.body == pair.proxied.body == S_LIB_JS
    assert pair.proxied.headers[hdrs.CONTENT_TYPE].startswith("application/javascript")
