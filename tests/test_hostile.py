"""Hostile input (issue 3): hypothesis throws random JSON, bytes, headers and broken auth at every
ingest route. The proxy never answers 5xx to client garbage, always answers JSON, forwards nothing
it refused and everything it accepted, and lets a write key's secret out only in upstream's
X-Write-Key: never in an answer, a metric, a log line, a query string or a body.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import gzip
import io
import ipaddress
import json
import re
import string
import unicodedata
from typing import Any
from urllib.parse import quote, unquote

import hypothesis
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth import mask_key
from proxy.headers import NOT_FORWARDED
from proxy.routes import BATCH_PATHS
from proxy.state import APP_STATE, AppState
from tests.fakejitsu import FakeJitsu, Received

KEY_ID = "hostileKeyId"
SECRET = "Zq7SecretHalfOfTheKeyXw9"
KEY = f"{KEY_ID}:{SECRET}"
UNICODE_KEY = "kïd-ünïcødé:sëcrët-ключ-鍵"

EVENT_TYPES = ["page", "identify", "track", "group", "alias", "screen"]
ALIASES = ["p", "i", "t", "g", "a", "s", "e", "event"]
PASSTHROUGH = ["User-Agent", "Accept-Language", "X-IP-Policy", "Origin", "Referer"]
# What a client may see: refusals are 4xx; 503 only when the buffer is full, never here.
CLIENT_STATUSES = {200, 400, 401, 404, 413}

# derandomize: the same examples on every run and in CI; a failure prints its minimal example.
HOSTILE = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one proxy per test, reset between examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


class Key(enum.Enum):
    """What a key source is expected to yield, when it is not a key we can name."""

    ABSENT = "absent"  # not there (or blank): the next source is looked at
    NONE = "none"  # there, wins, and holds no key (Authorization: Basic base64(":"))
    BAD = "bad"  # an Authorization that cannot be decoded: the request is refused
    UNKNOWN = "unknown"  # random garbage: no prediction


Expect = str | Key


@dataclasses.dataclass
class Shot:
    """One hostile request, and what the test knows about it."""

    path: str
    body: bytes
    plain: bytes  # body before gzip, if it was gzipped
    headers: dict[str, str]
    params: list[tuple[str, str]]
    key: Expect  # the write key that must win, by Jitsu's precedence
    content_type_ok: bool | None  # None: random, no prediction
    skip_auto: tuple[str, ...] = ()
    routable: bool = True  # aiohttp's {type} matches no "{" or "}": such paths are 404

    @property
    def batch(self) -> bool:
        return self.path in BATCH_PATHS

    @property
    def strict(self) -> bool:
        """s2s and batch routes answer 4xx; browser routes answer 200 with the error."""
        return self.batch or self.path.startswith("/api/s/s2s/")


# ---- strategies ---------------------------------------------------------------------------

# Lone surrogates are left out here: they are a known bug with a test of their own below.
CHARS = st.characters(exclude_categories=["Cs"])
# Control characters too, where they end up in a header: known bugs as well, tested below.
PRINTABLE = st.characters(exclude_categories=["Cs", "Cc"])
SPECIAL_TEXT = [
    "",
    "\x00",
    "a\x00b",
    "مرحبا بالعالم",
    "\u202eevil\u202c",
    "שָׁלוֹם",
    "👩‍👩‍👧‍👦🏳️‍🌈",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "e\u0301",
    "</script><script>alert(1)</script>",
    "${jndi:ldap://x/a}",
    "' OR 1=1 --",
    "\\",
    '"',
    "\n\r\t\x0b\x0c",
    "x" * 300,
]
texts = st.text(CHARS, max_size=30) | st.sampled_from(SPECIAL_TEXT)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
    max_leaves=20,
)
non_objects = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3), max_leaves=6)

body_write_keys = st.sampled_from([KEY, SECRET, f"{KEY_ID}:***", "", "   ", f" {KEY} "])
# Scalars only: fakejitsu's bookkeeping hashes messageIds (a list one makes the fake answer 500).
odd_message_ids = st.sampled_from(["", None, 0, False, "\x00", "m" * 200]) | scalars
OMIT = object()  # a field left out
RESERVED = {"type", "event", "messageId", "writeKey"}


def either(draw: st.DrawFn, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    """Mostly `good`, one time in four `bad`. A request is then hostile in one or two ways at
    a time, so accepted requests are checked as often as refusals are."""
    return draw(bad) if draw(st.integers(1, 4)) == 1 else draw(good)


good_names = st.sampled_from(["signup", "Order Completed", "注册"]) | st.text(
    CHARS, min_size=1, max_size=32
)
bad_names = st.just(OMIT) | st.sampled_from(["", "n" * 129, "é" * 65]) | texts | json_values


@st.composite
def events(draw: st.DrawFn, tag: str) -> dict[str, Any]:
    """A Segment-ish event, mostly valid. `tag` is its messageId unless it draws an odd one."""
    event: dict[str, Any] = draw(
        st.dictionaries(texts.filter(lambda k: k not in RESERVED), json_values, max_size=3)
    )
    event.update(
        draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "writeKey": body_write_keys,
                    "properties": st.dictionaries(texts, json_values, max_size=4),
                    "context": json_values,
                    "userId": texts,
                    "anonymousId": texts,
                },
            )
        )
    )
    bad_types = st.just(OMIT) | st.sampled_from(["event", "Track", "", "x"]) | scalars
    fields = {
        "type": either(draw, st.sampled_from(EVENT_TYPES), bad_types),
        "event": either(draw, good_names, bad_names),
        "messageId": either(draw, st.just(tag), st.just(OMIT) | odd_message_ids),
    }
    event.update({k: v for k, v in fields.items() if v is not OMIT})
    return event


def nested(depth: int) -> bytes:
    return (
        b'{"type":"track","event":"deep","properties":{"p":' + b"[" * depth + b"]" * depth + b"}}"
    )


# Bodies that are not a plain dump of a generated event: numbers at the edges, nesting, junk.
VALID_FLOATS = ["1e308", "-1.7976931348623157e308", "5e-324", "1e-400", "-0", "-0.0", "1E+2"]
raw_event_bodies = st.one_of(
    st.integers(1, 400).map(nested),
    st.sampled_from([2_000, 50_000]).map(nested),
    st.integers(1, 6_000).map(lambda n: b'{"type":"track","event":"big","n":' + b"9" * n + b"}"),
    st.sampled_from(VALID_FLOATS).map(lambda f: b'{"type":"page","f":' + f.encode() + b"}"),
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"null", b"[]", b"{}", b"\xef\xbb\xbf{}", b'{"type":"page"}' * 2]),
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


NEWLINE = b"\n"
NOT_UTF8 = b"\xff\xfe:"
LATIN1 = "kid:séc:".encode("latin-1")
# Authorization values and the key each must yield.
AUTHORIZATIONS: list[tuple[str, Expect]] = [
    (f"Basic {b64(KEY.encode() + b':')}", KEY),
    (f"Basic {b64(KEY.encode())}", KEY),
    (f"basic    {b64(KEY.encode() + b':')}", KEY),
    (b64(KEY.encode() + b":"), KEY),  # no scheme: Jitsu's TrimPrefix leaves it, decodes it
    (f"Basic {b64(KEY.encode() + b':' + NEWLINE)}", KEY),  # Jitsu's docs example shape
    (f"Basic {b64(UNICODE_KEY.encode() + b':')}", UNICODE_KEY),
    (f"Basic {b64(b':')}", Key.NONE),
    (f"Basic {b64(b'   :')}", Key.NONE),
    ("Basic", Key.BAD),
    ("Basic !!!notbase64", Key.BAD),
    ("Bearer xyz", Key.BAD),
    (f"Bearer {KEY}", Key.BAD),
    (f"Basic {KEY}", Key.BAD),
    (f"Basic {b64(NOT_UTF8)}", Key.BAD),
    (f"Basic {b64(LATIN1)}", Key.BAD),
    (f"Basic {b64(KEY.encode())[:-3]}", Key.BAD),  # truncated
    (f"Basic {b64(KEY.encode())}====", Key.BAD),
    ("Basic 8J+Ygg==", "😂"),
    ("Digest username=x", Key.BAD),
]
TOKEN = string.ascii_letters + string.digits + ":._-"
random_keys = st.text(
    st.sampled_from(TOKEN) | st.characters(categories=["L"]), min_size=1, max_size=40
)
header_values = st.text(PRINTABLE, min_size=1, max_size=40).filter(lambda v: v == v.strip(" \t"))


def decodes_to_control_characters(authorization: str) -> bool:
    """Garbage that happens to be base64 of a key with control characters: a known bug with
    its own test below, kept out of the random draws."""
    value = authorization.strip()
    for candidate in (value, value.partition(" ")[2].strip()):
        try:
            key = base64.b64decode(candidate, validate=True).decode("utf-8")
        except ValueError:
            continue
        if any(unicodedata.category(c) == "Cc" for c in key.strip()):
            return True
    return False


@st.composite
def authorization(draw: st.DrawFn) -> tuple[str | None, Expect]:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return None, Key.ABSENT
    if choice == 1:
        ascii_garbage = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)
        garbage = ascii_garbage.filter(lambda g: g.strip() and not decodes_to_control_characters(g))
        return draw(garbage), Key.UNKNOWN
    return draw(st.sampled_from(AUTHORIZATIONS))


X_WRITE_KEYS: list[tuple[str | None, Expect]] = [
    (None, Key.ABSENT),
    ("", Key.ABSENT),
    ("   ", Key.ABSENT),
    (KEY, KEY),
    (f"  {KEY}  ", KEY),  # the HTTP parser strips the spaces
    (UNICODE_KEY, UNICODE_KEY),
    (SECRET, SECRET),
]
x_write_keys = st.sampled_from(X_WRITE_KEYS) | random_keys.map(lambda k: (k, k))


param_names = st.text(
    st.sampled_from(string.ascii_letters + string.digits + "_-."), min_size=1, max_size=8
)


@st.composite
def query(draw: st.DrawFn) -> tuple[list[tuple[str, str]], Expect]:
    """Query pairs: `writekey` (Jitsu reads it lowercase only) in odd shapes, plus random ones."""
    forms: list[tuple[list[tuple[str, str]], Expect]] = [
        ([], Key.ABSENT),
        ([("writekey", KEY)], KEY),
        ([("writekey", "")], Key.ABSENT),
        ([("writekey", "   ")], Key.ABSENT),
        ([("writekey", KEY), ("writekey", "other:key")], KEY),
        ([("writekey", ""), ("writekey", KEY)], Key.ABSENT),
        ([("WriteKey", KEY)], Key.ABSENT),
        ([("WRITEKEY", KEY), ("writeKey", KEY)], Key.ABSENT),
        ([("writekey", UNICODE_KEY)], UNICODE_KEY),
        ([("writekey", f"{KEY}&x=1")], f"{KEY}&x=1"),
    ]
    pairs, expected = draw(
        st.sampled_from(forms) | random_keys.map(lambda k: ([("writekey", k)], k))
    )
    others = draw(
        st.lists(
            st.tuples(param_names.filter(lambda n: n.lower() != "writekey"), texts), max_size=3
        )
    )
    return [*others, *pairs], expected


CONTENT_TYPES: list[tuple[str | None, bool | None]] = [
    ("application/json", True),
    ("application/json; charset=utf-8", True),
    ("text/plain;charset=UTF-8", True),
    ("TEXT/PLAIN", False),  # Jitsu compares as sent (gin ContentType, strings.HasSuffix)
    ("x/application/json", True),
    ("application/x-json", False),
    ("application/json+x", False),
    ("application/vnd.api+json", False),
    ("text/html", False),
    ("multipart/form-data; boundary=x", False),
    ("", False),
    (None, False),
]
content_encodings = (
    st.sampled_from([None, "gzip", "GZIP", "x-gzip", "deflate", "br", "identity", "gzip, br", ""])
    | header_values
)
forwarding_values = st.lists(
    st.ip_addresses().map(str)
    | st.sampled_from(["unknown", "", "[::1]:80", "1.2.3.4:5", '"x"'])
    | header_values,
    min_size=1,
    max_size=4,
).map(", ".join)
extra_headers = st.dictionaries(
    st.sampled_from([*PASSTHROUGH, "Cookie", "X-Jitsu-Custom", "Cache-Control", "X-Enable-Debug"])
    | st.from_regex(r"\AX-Hostile-[A-Za-z0-9-]{1,10}\Z"),
    header_values,
    max_size=4,
) | st.fixed_dictionaries(
    {}, optional={"X-Forwarded-For": forwarding_values, "X-Real-IP": forwarding_values}
)
# The Classic API's key headers (ingest/router_classic_handler.go): never forwarded.
key_carriers = st.fixed_dictionaries(
    {}, optional={"X-Auth-Token": st.just(KEY), "api_key": st.just(KEY)}
)


@dataclasses.dataclass
class Parts:
    """Headers and query of a request, and what each key source is expected to yield."""

    headers: dict[str, str]
    params: list[tuple[str, str]]
    sources: list[Expect]  # Authorization, X-Write-Key, ?writekey=, in Jitsu's precedence
    content_type_ok: bool | None
    skip_auto: tuple[str, ...]


GOOD_AUTH: list[tuple[dict[str, str], list[tuple[str, str]], list[Expect]]] = [
    ({"X-Write-Key": KEY}, [], [Key.ABSENT, KEY, Key.ABSENT]),
    ({"X-Write-Key": UNICODE_KEY}, [], [Key.ABSENT, UNICODE_KEY, Key.ABSENT]),
    ({"Authorization": AUTHORIZATIONS[0][0]}, [], [KEY, Key.ABSENT, Key.ABSENT]),
    ({}, [("writekey", KEY)], [Key.ABSENT, Key.ABSENT, KEY]),
    ({}, [], [Key.ABSENT, Key.ABSENT, Key.ABSENT]),  # a batch may carry it in its body
]


@st.composite
def hostile_auth(draw: st.DrawFn) -> tuple[dict[str, str], list[tuple[str, str]], list[Expect]]:
    headers: dict[str, str] = {}
    auth, auth_key = draw(authorization())
    xwk, xwk_key = draw(x_write_keys)
    params, query_key = draw(query())
    if auth is not None:
        headers["Authorization"] = auth
    if xwk is not None:
        headers["X-Write-Key"] = xwk
    return headers, params, [auth_key, xwk_key, query_key]


GOOD_CONTENT_TYPES = [(ct, ok) for ct, ok in CONTENT_TYPES if ok]


@st.composite
def request_parts(draw: st.DrawFn) -> Parts:
    headers = {**draw(extra_headers), **draw(key_carriers)}
    auth_headers, params, sources = either(draw, st.sampled_from(GOOD_AUTH), hostile_auth())
    headers.update(auth_headers)
    others = draw(
        st.lists(
            st.tuples(param_names.filter(lambda n: n.lower() != "writekey"), texts), max_size=2
        )
    )
    content_type, ct_ok = either(
        draw,
        st.sampled_from(GOOD_CONTENT_TYPES),
        st.sampled_from(CONTENT_TYPES) | header_values.map(lambda v: (v, None)),
    )
    skip: tuple[str, ...] = ()
    if content_type is None:
        skip = ("Content-Type",)
    else:
        headers["Content-Type"] = content_type
    encoding = either(draw, st.none(), content_encodings)
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return Parts(headers, [*others, *params], sources, ct_ok, skip)


def winner(sources: list[Expect]) -> Expect:
    """Jitsu's precedence: the first source present wins, even when it holds nothing usable."""
    for source in sources:
        if source is not Key.ABSENT:
            return source
    return Key.NONE


path_types = (
    st.sampled_from(EVENT_TYPES + ALIASES)
    | st.text(
        st.sampled_from(string.ascii_letters + string.digits + "-_~"), min_size=1, max_size=12
    )
    | st.text(CHARS, min_size=1, max_size=12)
).filter(lambda t: t not in {".", "..", "batch"})


@st.composite
def single_shots(draw: st.DrawFn) -> Shot:
    prefix = draw(st.sampled_from(["/api/s/", "/api/s/s2s/"]))
    path_type = either(draw, st.sampled_from(EVENT_TYPES + ALIASES), path_types)
    parts = draw(request_parts())
    event = draw(events(tag="hostile-single"))
    whole = json.dumps(event, ensure_ascii=draw(st.booleans())).encode()
    plain = either(
        draw,
        st.just(whole),
        raw_event_bodies
        | non_objects.map(lambda v: json.dumps(v).encode())
        | st.integers(0, max(0, len(whole) - 1)).map(lambda n: whole[:n]),
    )
    body = gzip.compress(plain) if draw(st.integers(1, 10)) == 1 else plain
    return Shot(
        prefix + quote(path_type, safe=""),
        body,
        plain,
        parts.headers,
        parts.params,
        winner(parts.sources),
        parts.content_type_ok,
        parts.skip_auto,
        routable=not set(path_type) & set("{}"),
    )


BATCH_KEYS: list[tuple[Any, Expect]] = [
    (KEY, KEY),
    (f" {KEY} ", KEY),
    (UNICODE_KEY, UNICODE_KEY),
    *[(v, Key.ABSENT) for v in ["", "  ", 123, None, True, [KEY], {"k": KEY}]],
]


@st.composite
def batch_shots(draw: st.DrawFn) -> Shot:
    path = draw(st.sampled_from(BATCH_PATHS))
    parts = draw(request_parts())
    items: list[Any] = [
        either(draw, events(tag=f"hostile-{i}"), non_objects)
        for i in range(draw(st.integers(0, 6)))
    ]
    payload: dict[str, Any] = draw(
        st.dictionaries(
            texts.filter(lambda k: k not in {"batch", "writeKey", "context", "eventsName"}),
            json_values,
            max_size=2,
        )
    )
    payload["batch"] = items
    if draw(st.booleans()):
        context = st.dictionaries(texts, json_values, max_size=3)
        payload["context"] = either(draw, context, json_values)
    if draw(st.integers(1, 4)) == 1:
        payload["eventsName"] = draw(st.sampled_from(["", "signup"]) | texts | scalars)
    body_key: Expect = Key.ABSENT
    if draw(st.booleans()):
        payload["writeKey"], body_key = draw(st.sampled_from(BATCH_KEYS))
    whole = json.dumps(payload, ensure_ascii=draw(st.booleans())).encode()
    not_a_list = json_values.filter(lambda v: not isinstance(v, list))
    plain = either(
        draw,
        st.just(whole),
        st.binary(max_size=200)
        | non_objects.map(lambda v: json.dumps(v).encode())
        | not_a_list.map(lambda v: json.dumps({**payload, "batch": v}).encode())
        | st.integers(0, max(0, len(whole) - 1)).map(lambda n: whole[:n]),
    )
    body = plain
    if draw(st.integers(1, 4)) == 1:
        body = gzip.compress(plain)
        encoding = either(draw, st.just("gzip"), st.sampled_from(["", "deflate", "x-gzip", "GZIP"]))
        parts.headers["Content-Encoding"] = encoding
    return Shot(
        path,
        body,
        plain,
        parts.headers,
        parts.params,
        winner([*parts.sources, body_key]),
        parts.content_type_ok,
        parts.skip_auto,
    )


# ---- checks -------------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    payload: dict[str, Any]
    forwarded: Received | None

    @property
    def error(self) -> str:
        return str(self.payload.get("error", ""))


def strict_json(body: bytes) -> Any:
    """Parse as RFC 8259 JSON: Python's NaN/Infinity extensions are not JSON, Jitsu refuses them."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"not JSON: {constant} forwarded upstream")

    return json.loads(body, parse_constant=refuse)


def check_answer_shape(status: int, payload: Any) -> None:
    assert isinstance(payload, dict), payload
    if "error" in payload:
        assert set(payload) == {"error"}, payload
        assert isinstance(payload["error"], str) and payload["error"]
        assert status >= 400 or status == 200
    else:
        assert status == 200, payload
        assert isinstance(payload.get("ok"), bool), payload
        assert set(payload) <= {"ok", "okEvents", "receivedEvents", "errors"}, payload
        assert all(isinstance(e, str) for e in payload.get("errors", [])), payload


def no_secret_upstream(got: Received) -> None:
    """The key travels in X-Write-Key only: no Authorization, no writekey, no secret elsewhere."""
    assert "Authorization" not in got.headers
    assert all(name.lower() != "writekey" for name in got.query)
    assert SECRET not in got.path and SECRET not in json.dumps(got.query)
    assert SECRET.encode() not in got.body
    for name, value in got.headers.items():
        if name.lower() != "x-write-key":
            assert SECRET not in value, name
    real_ip = got.headers.get("X-Real-IP")
    assert real_ip == got.headers.get("X-Forwarded-For")
    if real_ip is not None:
        ipaddress.ip_address(real_ip)


def expected_query(params: list[tuple[str, str]]) -> dict[str, str]:
    """What the fake records (first value per name), with every writekey spelling removed."""
    out: dict[str, str] = {}
    for name, value in params:
        if name.lower() != "writekey":
            out.setdefault(name, value)
    return out


# Jitsu's timestamp format, which the edge stamps events that have none with.
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def mask_expected(event: dict[str, Any], got: dict[str, Any]) -> None:
    """`got` is `event` as forwarded: same fields, a messageId, a body writeKey masked."""
    sent_id = event.get("messageId")
    assert got.get("messageId") not in (None, "")
    if sent_id not in (None, ""):
        assert got["messageId"] == sent_id
    sent_key = event.get("writeKey")
    if isinstance(sent_key, str) and sent_key:
        assert got["writeKey"].endswith(":***")
    else:
        assert got.get("writeKey", "absent") == event.get("writeKey", "absent")
    own = {"messageId", "writeKey"}
    if event.get("timestamp") is None:
        # Stamped at the edge with the time of acceptance, in Jitsu's format.
        assert STAMP.fullmatch(got["timestamp"]), got["timestamp"]
        own.add("timestamp")
    rest = {k: v for k, v in event.items() if k not in own}
    assert {k: v for k, v in got.items() if k not in own} == rest


def server_of(client: TestClient[Any, Any]) -> TestServer:
    server = client.server
    assert isinstance(server, TestServer)
    return server


def state_of(client: TestClient[Any, Any]) -> AppState:
    return server_of(client).app[APP_STATE]


async def drained(client: TestClient[Any, Any], timeout: float = 5) -> None:
    state = state_of(client)
    async with asyncio.timeout(timeout):
        while state.buffer.rows:
            await asyncio.sleep(0.005)


async def fire(
    client: TestClient[Any, Any], upstream: FakeJitsu, shot: Shot, logs: io.StringIO
) -> Answer:
    """Send one shot and check what holds for every request, whatever its fate."""
    upstream.received.clear()
    state = state_of(client)
    assert state.buffer.rows == 0
    log_mark = logs.tell()
    resp = await client.post(
        shot.path,
        params=shot.params or None,
        data=shot.body,
        headers=shot.headers,
        skip_auto_headers=shot.skip_auto,
    )
    raw = await resp.read()
    assert resp.status in CLIENT_STATUSES, (resp.status, raw)
    assert resp.content_type == "application/json"
    assert SECRET.encode() not in raw
    assert all(SECRET not in value for value in resp.headers.values())
    payload = json.loads(raw)
    check_answer_shape(resp.status, payload)

    accepted = resp.status == 200 and (
        payload.get("okEvents", 0) > 0 if shot.batch else payload == {"ok": True}
    )
    reason = str(payload.get("error", "no valid event")).split(":", 1)[0]
    hypothesis.event("accepted" if accepted else f"refused {resp.status} {reason}")
    forwarded: Received | None = None
    if accepted:
        await upstream.wait_delivered(1, timeout=5)
        await drained(client)
        (forwarded,) = upstream.received
        no_secret_upstream(forwarded)
        assert forwarded.path == unquote(shot.path)
        assert forwarded.query == expected_query(shot.params)
        # The client's type while Jitsu's own check (gin's ContentType(), case as sent) takes
        # it, naming no other charset than UTF-8 (the body sent is); else application/json.
        sent_type = forwarded.headers["Content-Type"]
        assert sent_type in ("application/json", shot.headers.get("Content-Type"))
        assert re.split("[ ;]", sent_type)[0].endswith(("application/json", "text/plain"))
        # Every other end-to-end header the client sent arrives as sent.
        for name, value in shot.headers.items():
            if name.lower() not in NOT_FORWARDED and name.lower() != "content-type":
                assert forwarded.headers.get(name) == value, name
        assert "Cookie" not in forwarded.headers
        assert shot.key is not Key.BAD
        assert not (shot.strict and shot.key is Key.NONE)
        if isinstance(shot.key, str):
            assert forwarded.headers["X-Write-Key"] == shot.key
        elif shot.key is Key.NONE:
            assert "X-Write-Key" not in forwarded.headers
    else:
        # Nothing was committed, so nothing can ever be sent.
        assert state.buffer.rows == 0
        assert upstream.received == []

    health = await client.get("/healthz")
    assert health.status == 200
    metrics = await (await client.get("/metrics")).text()
    assert SECRET not in metrics
    # Route labels are the app's route templates: a random {type} never becomes a label.
    templates = {resource.canonical for resource in server_of(client).app.router.resources()}
    assert set(re.findall(r'route="([^"]*)"', metrics)) <= templates
    logs.seek(log_mark)
    assert SECRET not in logs.read()
    return Answer(resp.status, payload, forwarded)


def check_model(shot: Shot, answer: Answer) -> None:
    """Refusals the request's shape predicts, in the order Jitsu checks: content type, then the
    Authorization header, then (s2s) the missing key."""
    browser = not shot.strict
    if not shot.routable:
        assert answer.status == 404
        assert answer.payload == {"error": "not found"}
    elif shot.content_type_ok is False:
        assert answer.status == 400
        assert answer.error.startswith("invalid content type:")
    elif shot.content_type_ok and shot.key is Key.BAD:
        assert answer.status == (200 if browser else 400)
        assert "failed to decode writeKey from Authorization header" in answer.error
    elif shot.content_type_ok and shot.key is Key.NONE and shot.strict and not shot.batch:
        assert answer.status == 401
        assert answer.error.startswith("stream not found")


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def edge(make_proxy: Any) -> TestClient[Any, Any]:
    # fsync off: these tests are about what is accepted, not power loss; it keeps them quick.
    client: TestClient[Any, Any] = await make_proxy(buffer={"fsync": False})
    return client


# ---- properties ---------------------------------------------------------------------------


@settings(HOSTILE, max_examples=250)
@given(shot=single_shots())
async def test_single_event_routes_survive_anything(
    edge: TestClient[Any, Any], upstream: FakeJitsu, logs: io.StringIO, shot: Shot
) -> None:
    answer = await fire(edge, upstream, shot, logs)
    check_model(shot, answer)
    if shot.strict and "error" in answer.payload:
        assert answer.status >= 400
    if answer.forwarded is not None:
        assert shot.body == shot.plain  # Jitsu inflates batches only; so does the proxy
        sent = json.loads(shot.plain)
        assert isinstance(sent, dict)
        mask_expected(sent, strict_json(answer.forwarded.body))


@settings(HOSTILE, max_examples=250)
@given(shot=batch_shots())
async def test_batch_routes_survive_anything(
    edge: TestClient[Any, Any], upstream: FakeJitsu, logs: io.StringIO, shot: Shot
) -> None:
    answer = await fire(edge, upstream, shot, logs)
    check_model(shot, answer)
    if "error" in answer.payload:
        assert answer.status >= 400
        return
    sent = json.loads(shot.plain)
    received = len(sent["batch"])
    errors = answer.payload.get("errors", [])
    assert answer.payload["receivedEvents"] == received
    assert answer.payload["okEvents"] == received - len(errors)
    assert answer.payload["ok"] is (not errors)
    refused = {m.group(1) for e in errors if (m := re.match(r"Message ID: (hostile-\d+): ", e))}
    if answer.forwarded is None:
        assert answer.payload["okEvents"] == 0
        return
    got = strict_json(answer.forwarded.body)
    assert "writeKey" not in got
    assert {k: v for k, v in got.items() if k != "batch"} == {
        k: v for k, v in sent.items() if k not in {"batch", "writeKey"}
    }
    assert len(got["batch"]) == answer.payload["okEvents"]
    tagged = {
        e["messageId"]: e
        for e in sent["batch"]
        if isinstance(e, dict) and str(e.get("messageId", "")).startswith("hostile-")
    }
    for event in got["batch"]:
        mid = event["messageId"]
        assert mid not in refused, "a refused event reached upstream"
        if mid in tagged:
            mask_expected(tagged[mid], event)


@HOSTILE
@given(
    auth=hostile_auth(),
    parts=request_parts(),
    route=st.sampled_from(["/api/s/track", "/api/s/s2s/page"]),
)
async def test_every_auth_form_on_a_good_event(
    edge: TestClient[Any, Any],
    upstream: FakeJitsu,
    logs: io.StringIO,
    auth: tuple[dict[str, str], list[tuple[str, str]], list[Expect]],
    parts: Parts,
    route: str,
) -> None:
    """A valid event and hostile auth every time, so the answer depends on the key alone."""
    auth_headers, params, sources = auth
    headers = {
        k: v
        for k, v in parts.headers.items()
        if k not in {"Authorization", "X-Write-Key", "Content-Encoding"}
    }
    body = json.dumps({"type": "track", "event": "auth", "writeKey": KEY}).encode()
    shot = Shot(
        route,
        body,
        body,
        {**headers, **auth_headers},
        params,
        winner(sources),
        parts.content_type_ok,
        parts.skip_auto,
    )
    answer = await fire(edge, upstream, shot, logs)
    check_model(shot, answer)
    if parts.content_type_ok and isinstance(shot.key, str):
        assert answer.forwarded is not None, answer.payload


methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
prefixes = st.sampled_from(
    [
        "/debug/pprof/",
        "/debug/",
        "/health/",
        "/p.js",
        "/api/id/",
        "/s/lib.js",
        "/v1/projects/",
        "/projects/",
        "/api/v1/event",
        "/api.",
        "/api/s/",
        "/api/s/s2s/",
        "/v1/",
        "/metrics/",
        "/",
    ]
)


@HOSTILE
@given(method=methods, prefix=prefixes, tail=st.text(CHARS, max_size=20))
async def test_any_path_and_method_answers_json_and_forwards_nothing(
    edge: TestClient[Any, Any], upstream: FakeJitsu, method: str, prefix: str, tail: str
) -> None:
    upstream.received.clear()
    path = prefix + quote(tail.lstrip("/"), safe="/")  # "//x" would be a host, not a path
    resp = await edge.request(method, path, params={"writekey": KEY})
    raw = await resp.read()
    assert resp.status < 500, (resp.status, raw)
    assert SECRET.encode() not in raw
    if resp.status >= 400 and method != "HEAD":
        assert resp.content_type == "application/json"
        assert set(json.loads(raw)) == {"error"}
    if path.startswith(("/debug/", "/health/")):
        assert resp.status == 404
    assert state_of(edge).buffer.rows == 0
    assert upstream.received == []
    assert (await edge.get("/healthz")).status == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/debug/pprof/"),
        ("GET", "/debug/pprof/heap"),
        ("GET", "/debug/pprof/goroutine?debug=2"),
        ("GET", "/debug/pprof/profile?seconds=1"),
        ("POST", "/debug/pprof/symbol"),
        ("GET", "/debug/vars"),
        ("GET", "/debug/pprof/trace"),
    ],
)
async def test_upstream_only_endpoints_are_not_exposed(
    edge: TestClient[Any, Any], upstream: FakeJitsu, method: str, path: str
) -> None:
    resp = await edge.request(method, path)
    assert resp.status == 404
    if method != "HEAD":
        body = await resp.json()
        assert set(body) == {"error"}
        assert SECRET not in json.dumps(body)
    assert upstream.received == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_p_js_is_not_a_hole(
    edge: TestClient[Any, Any], upstream: FakeJitsu, method: str
) -> None:
    """The script is served from the proxy's cache (or is a JSON 404 where it is off); either
    way it is not a way to send events."""
    resp = await edge.request(method, "/p.js", params={"writekey": KEY})
    assert resp.status in (200, 404)
    if resp.status == 404 and method == "GET":
        assert set(await resp.json()) == {"error"}
    assert SECRET not in str(resp.headers)
    assert upstream.received == []


# ---- the tracking pixel -------------------------------------------------------------------

GIF_MAGIC = b"GIF89a"
PIXEL_CONTROL = {"data", "cookie_domain", "process_headers", "destination_url", "type"}
pixel_types = st.text(PRINTABLE, min_size=1, max_size=12).filter(lambda t: t not in {".", ".."})
dotted_names = st.lists(param_names, min_size=1, max_size=3).map(".".join)
DESTINATIONS = [
    "https://example.com/thanks",
    "https://example.com:443/x?y=1#z",
    "http://example.com/",
    "https://127.0.0.1/",
    "https://[::1]/",
    "https://example.com:8443/",
    "https://a.com:99999/",
    "javascript:alert(1)",
    "//evil.example/",
    "https://user:pw@evil.example/",
    "https:///nohost",
    "",
]


@st.composite
def pixel_shots(draw: st.DrawFn) -> Shot:
    path_type = either(draw, st.sampled_from(EVENT_TYPES + ALIASES), pixel_types)
    parts = draw(request_parts())
    event = draw(events(tag="hostile-pixel"))
    if isinstance(event.get("type"), str):  # echoed in X-Jitsu-Error: see the known bugs
        event["type"] = "".join(c for c in event["type"] if unicodedata.category(c) != "Cc")
    encoded = base64.b64encode(json.dumps(event).encode()).decode()
    data = either(
        draw,
        st.just(encoded),
        st.just(OMIT)
        | st.text(PRINTABLE, max_size=20)
        | st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
        | non_objects.map(lambda v: base64.b64encode(json.dumps(v).encode()).decode())
        | st.just(base64.urlsafe_b64encode(json.dumps(event).encode()).decode()),
    )
    params = [(k, v) for k, v in parts.params if k not in PIXEL_CONTROL]
    if data is not OMIT:
        params.append(("data", data))
    fields = st.tuples(
        dotted_names.filter(lambda n: n not in PIXEL_CONTROL and n.lower() != "writekey"),
        st.text(PRINTABLE, max_size=20),
    )
    params += draw(st.lists(fields, max_size=4))
    if draw(st.integers(1, 4)) == 1:
        params.append(("event", draw(good_names)))
    if draw(st.integers(1, 3)) == 1:
        params.append(
            ("destination_url", draw(st.sampled_from(DESTINATIONS) | texts.filter(str.isprintable)))
        )
    if draw(st.integers(1, 3)) == 1:
        params.append(("process_headers", draw(st.sampled_from(["true", "1", "false", "yes"]))))
    if draw(st.integers(1, 3)) == 1:
        domain = st.sampled_from([".example.com", "localhost", "a;b", "é.com", ""])
        params.append(("cookie_domain", draw(domain | st.text(PRINTABLE, max_size=20))))
    for name in ("Content-Type", "Content-Encoding"):
        parts.headers.pop(name, None)
    return Shot(
        "/api/px/" + quote(path_type, safe=""),
        b"",
        b"",
        parts.headers,
        params,
        winner(parts.sources),
        None,
        routable=not set(path_type) & set("{}"),
    )


@HOSTILE
@given(shot=pixel_shots())
async def test_pixel_survives_anything(
    edge: TestClient[Any, Any], upstream: FakeJitsu, logs: io.StringIO, shot: Shot
) -> None:
    """Jitsu's pixel always answers the GIF (or its redirect); errors ride in X-Jitsu-Error."""
    upstream.received.clear()
    state = state_of(edge)
    assert state.buffer.rows == 0
    log_mark = logs.tell()
    resp = await edge.get(
        shot.path, params=shot.params, headers=shot.headers, allow_redirects=False
    )
    raw = await resp.read()
    if not shot.routable:
        assert (resp.status, json.loads(raw)) == (404, {"error": "not found"})
        return
    assert resp.status in (200, 302), (resp.status, raw)
    assert SECRET.encode() not in raw
    assert all(SECRET not in value for value in resp.headers.values())
    error = resp.headers.get("X-Jitsu-Error")
    if resp.status == 302:
        assert error is None
        assert resp.headers["Location"] == dict(reversed(shot.params))["destination_url"]
    else:
        assert resp.content_type == "image/gif" and raw.startswith(GIF_MAGIC)
    hypothesis.event("accepted" if error is None else f"refused {error.split(':', 1)[0]}")
    if shot.key is Key.BAD:
        assert error is not None and "failed to decode writeKey" in error
    if error is not None:
        assert state.buffer.rows == 0
        assert upstream.received == []
    else:
        await upstream.wait_delivered(1, timeout=5)
        await drained(edge)
        (got,) = upstream.received
        no_secret_upstream(got)
        assert got.method == "GET" and got.body == b""
        assert got.path == unquote(shot.path)
        forwarded = dict(got.query)
        expected = expected_query(shot.params)
        added, sent_id = forwarded.pop("messageId", None), expected.pop("messageId", None)
        assert added == sent_id or (not sent_id and added)  # kept, or one given at the edge
        stamp, sent_stamp = forwarded.pop("timestamp", None), expected.pop("timestamp", None)
        assert stamp == sent_stamp or (not sent_stamp and STAMP.fullmatch(stamp or ""))
        if expected.get("data"):
            # The data's event as sent, but a write key in it masked (the secret stays home).
            sent = json.loads(base64.b64decode(expected.pop("data")))
            arrived = json.loads(base64.b64decode(forwarded.pop("data")))
            assert SECRET not in json.dumps(arrived)
            body_key = sent.get("writeKey")
            if isinstance(body_key, str) and body_key and not body_key.endswith(":***"):
                sent["writeKey"] = mask_key(body_key)
            assert arrived == sent
        assert forwarded == expected
        if isinstance(shot.key, str):
            assert got.headers["X-Write-Key"] == shot.key
        elif shot.key is Key.NONE:
            assert "X-Write-Key" not in got.headers
    assert (await edge.get("/healthz")).status == 200
    logs.seek(log_mark)
    assert SECRET not in logs.read()


# ---- known bugs ---------------------------------------------------------------------------


def _post_parts(body: bytes) -> dict[str, Any]:
    return {"data": body, "headers": {"X-Write-Key": KEY, "Content-Type": "application/json"}}


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/api/s/track", b'{"type":"track","event":"x","p":"\\ud800"}'),
        ("/api/s/s2s/track", b'{"type":"track","event":"x","p":{"\\udfff":1}}'),
        ("/api/s/s2s/track", b'{"type":"track","event":"\\ud83d"}'),
        ("/v1/batch", b'{"batch":[{"type":"track","event":"x","p":"\\udc00"}]}'),
    ],
)
async def test_lone_surrogate_escape_is_not_a_500(
    edge: TestClient[Any, Any], upstream: FakeJitsu, route: str, body: bytes
) -> None:
    resp = await edge.post(route, **_post_parts(body))
    assert resp.status < 500
    payload = await resp.json()
    if payload == {"ok": True} or payload.get("okEvents"):
        (got,) = await upstream.wait_delivered(1)
        strict_json(got.body)
    else:
        assert upstream.received == []


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
@pytest.mark.parametrize("route", ["/api/s/s2s/track", "/v1/batch"])
async def test_non_json_numbers_are_refused_at_the_edge(
    edge: TestClient[Any, Any], upstream: FakeJitsu, number: bytes, route: str
) -> None:
    event = b'{"type":"track","event":"x","n":' + number + b"}"
    body = b'{"batch":[' + event + b"]}" if route == "/v1/batch" else event
    resp = await edge.post(route, **_post_parts(body))
    assert resp.status < 500
    payload = await resp.json()
    if payload == {"ok": True} or payload.get("okEvents"):
        (got,) = await upstream.wait_delivered(1)
        strict_json(got.body)  # accepted: then what goes upstream must be JSON
    else:
        assert upstream.received == []


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"Authorization": "Basic " + b64(KEY.encode() + b"\r\nX-Evil: 1:")}, {}),
        ({"Authorization": "Basic " + b64(b"kid:se\x00cret:")}, {}),
        ({"Authorization": "Basic " + b64(b"kid:se\x7fcret:")}, {}),
        ({}, {"writekey": "kid:se\r\ncret"}),
        ({}, {"writekey": "kid:se\x00cret"}),
    ],
    ids=["basic-crlf", "basic-nul", "basic-del", "query-crlf", "query-nul"],
)
async def test_control_characters_in_the_key_do_not_poison_the_buffer(
    edge: TestClient[Any, Any],
    upstream: FakeJitsu,
    headers: dict[str, str],
    params: dict[str, str],
) -> None:
    resp = await edge.post(
        "/api/s/s2s/track",
        params=params,
        json={"type": "track", "event": "x", "messageId": "ctl"},
        headers=headers,
    )
    assert resp.status < 500
    if resp.status == 200:
        # Accepted: then it must leave the buffer (delivered, or dead-lettered with a reason).
        await drained(edge, timeout=1)
    else:
        assert upstream.received == []


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/px/%1F", {}),
        ("/api/px/track%0D%0AX-Evil:%201", {}),
        ("/api/px/event", {"type": "\r\nSet-Cookie: x=1"}),
        ("/api/px/event", {"type": "a\x00b"}),
    ],
    ids=["type-us", "type-crlf", "body-type-crlf", "body-type-nul"],
)
async def test_pixel_errors_with_control_characters_are_answered(
    edge: TestClient[Any, Any], upstream: FakeJitsu, path: str, params: dict[str, str]
) -> None:
    resp = await edge.get(path, params={"writekey": KEY, **params})
    assert resp.status == 200
    assert (await resp.read()).startswith(GIF_MAGIC)
    assert "Unknown event type" in resp.headers["X-Jitsu-Error"]
    assert "Set-Cookie" not in resp.headers
    assert upstream.received == []


@pytest.mark.parametrize(
    "destination",
    ["https://evil.example/\r\nSet-Cookie: x=1", "https://evil.example/a\x00b"],
    ids=["crlf", "nul"],
)
async def test_pixel_redirect_with_control_characters_is_refused(
    edge: TestClient[Any, Any], upstream: FakeJitsu, destination: str
) -> None:
    resp = await edge.get(
        "/api/px/page",
        params={"writekey": KEY, "destination_url": destination},
        allow_redirects=False,
    )
    # No redirect to a URL that cannot be a header; the GIF, as for any other bad destination.
    assert resp.status == 200
    assert (await resp.read()).startswith(GIF_MAGIC)
    assert "Location" not in resp.headers and "Set-Cookie" not in resp.headers


@pytest.mark.parametrize("key", ["kid:se\r\ncret", "kid:se\x00cret"], ids=["crlf", "nul"])
async def test_control_characters_in_a_pixel_key_do_not_poison_the_buffer(
    edge: TestClient[Any, Any], upstream: FakeJitsu, key: str
) -> None:
    resp = await edge.get("/api/px/page", params={"writekey": key})
    assert resp.status == 200
    if "X-Jitsu-Error" not in resp.headers:
        await drained(edge, timeout=1)
    else:
        assert upstream.received == []


async def test_a_refusal_in_the_middle_loses_nothing_around_it(
    edge: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    """The property tests reset between examples; here good and hostile requests interleave."""
    bodies = [
        b"\x00\xff{" if i % 2 else json.dumps({"type": "track", "event": "e", "messageId": f"g{i}"})
        for i in range(20)
    ]
    statuses = []
    for body in bodies:
        resp = await edge.post(
            "/api/s/s2s/track",
            data=body,
            headers={"X-Write-Key": KEY, "Content-Type": "application/json"},
        )
        statuses.append(resp.status)
    assert statuses == [200, 400] * 10
    await upstream.wait_delivered(10)
    await drained(edge)
    assert sorted(upstream.delivered_ids()) == sorted(f"g{i}" for i in range(0, 20, 2))
