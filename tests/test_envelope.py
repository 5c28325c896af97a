"""Request -> upstream envelope: content type, gzip, Jitsu's event checks, batch filtering,
forwarded path (proxy/envelope.py; forwarded headers: test_forward_headers.py).

Jitsu reference: research notes §3.2 (content type, gzip, sizes), §3.5 (event types),
§3.6 (messageId), §3.8 (batch answer), and ingest/router.go patchEvent.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import json
import uuid
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from proxy.auth import KeySource, WriteKey, mask_key
from proxy.config import LimitsConfig
from proxy.envelope import (
    MAX_EVENT_NAME,
    Envelope,
    PreparedBatch,
    accepted_at,
    build_envelope,
    check_content_type,
    decompress,
    encode_batch,
    ensure_message_id,
    filter_batch,
    forward_path,
    parse_batch_payload,
    parse_single,
    pixel_destination,
    prepare_batch,
    resolve_type,
    split_batch,
)
from proxy.errors import IngestError

BIG = 1_000_000
KEY = WriteKey("kid1234:secretsecretsecret", KeySource.AUTHORIZATION)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def ingest_error(fn: Any, *args: Any) -> IngestError:
    with pytest.raises(IngestError) as info:
        fn(*args)
    return info.value


def is_uuid4(value: str) -> bool:
    return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value


# ---- check_content_type ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "text/plain",
        "text/plain;charset=UTF-8",  # navigator.sendBeacon(url, string)
        "  application/json  ",
        # Jitsu checks strings.HasSuffix(c.ContentType(), "application/json").
        "x-application/json",
        "x/text/plain",
    ],
)
def test_content_type_accepted(content_type: str) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("text/html", "text/html"),
        ("text/html; charset=utf-8", "text/html"),
        ("", "(none)"),
        ("   ", "(none)"),
        ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
        ("multipart/form-data; boundary=xyz", "multipart/form-data"),
        ("application/jsonp", "application/jsonp"),
        ("text/plainx", "text/plainx"),
        # "+json" does not end with "application/json": Jitsu's HasSuffix refuses it too.
        ("application/vnd.api+json", "application/vnd.api+json"),
        ("application/json-patch+json", "application/json-patch+json"),
        # Jitsu compares as sent: its own refusal, so refused here before the 2xx.
        ("Application/JSON", "Application/JSON"),
        ("TEXT/PLAIN; charset=utf-8", "TEXT/PLAIN"),
    ],
)
def test_content_type_refused(content_type: str, shown: str) -> None:
    error = ingest_error(check_content_type, content_type)

    assert error.status == 400
    assert error.browser_ok is False  # Jitsu answers 400 on browser routes too (§3.8)
    assert error.message == f"invalid content type: {shown}. Expected: application/json"


# ---- decompress --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["", "identity", "br", "deflate"])
def test_decompress_without_gzip_is_identity(encoding: str) -> None:
    body = gzip.compress(b'{"batch":[]}')
    assert decompress(body, encoding, 10) is body


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "x-gzip", "identity, gzip"])
def test_decompress_gzip_roundtrip(encoding: str) -> None:
    data = dumps({"batch": [{"type": "page", "messageId": str(i)} for i in range(100)]})
    assert decompress(gzip.compress(data), encoding, len(data)) == data


def test_decompress_exactly_at_limit() -> None:
    data = b"x" * 1000
    assert decompress(gzip.compress(data), "gzip", 1000) == data


def test_decompress_one_byte_over_limit_is_413() -> None:
    error = ingest_error(decompress, gzip.compress(b"x" * 1001), "gzip", 1000)
    assert error.status == 413
    assert error.message == "request body too large: more than 1000 bytes after decompression"


def test_decompress_bomb_is_413() -> None:
    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100_000

    error = ingest_error(decompress, bomb, "gzip", 1024 * 1024)

    assert error.status == 413
    assert error.message == ("request body too large: more than 1048576 bytes after decompression")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not gzip at all", id="plain-text"),
        pytest.param(b'{"batch":[]}', id="json"),
        pytest.param(b"\x1f\x8b\x08\x00garbage-after-magic", id="garbage-after-magic"),
        pytest.param(zlib.compress(b'{"batch":[]}'), id="zlib-not-gzip"),
    ],
)
def test_decompress_garbage_is_400(body: bytes) -> None:
    error = ingest_error(decompress, body, "gzip", BIG)
    assert error.status == 400
    assert error.message.startswith("error parsing message: invalid gzip body: ")


def test_decompress_bad_crc_is_400() -> None:
    data = gzip.compress(b'{"batch":[]}')
    corrupt = data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]

    error = ingest_error(decompress, corrupt, "gzip", BIG)

    assert error.status == 400
    assert error.message.startswith("error parsing message: invalid gzip body: ")


@pytest.mark.parametrize("cut", [1, 4, 8, 20])
def test_decompress_truncated_is_400(cut: int) -> None:
    data = gzip.compress(dumps({"batch": [{"type": "page"}] * 50}))

    error = ingest_error(decompress, data[:-cut], "gzip", BIG)

    assert error.status == 400
    assert error.message == "error parsing message: truncated gzip body"


def test_decompress_truncated_to_half_is_400() -> None:
    data = gzip.compress(bytes(range(256)) * 64)
    error = ingest_error(decompress, data[: len(data) // 2], "gzip", BIG)
    assert error.status == 400
    assert error.message == "error parsing message: truncated gzip body"


def test_decompress_multi_member_gzip() -> None:
    body = gzip.compress(b'{"batch":[') + gzip.compress(b'{"type":"page"}]}')
    assert decompress(body, "gzip", BIG) == b'{"batch":[{"type":"page"}]}'


# ---- parse_single ------------------------------------------------------------------------


def test_parse_single_keeps_messageid_and_bytes() -> None:
    event = {"type": "page", "messageId": "m-1", "properties": {"title": "Héllo ✓"}}

    raw, message_id = parse_single(dumps(event), "page", BIG)

    assert message_id == "m-1"
    assert raw == '{"type":"page","messageId":"m-1","properties":{"title":"Héllo ✓"}}'.encode()


def test_parse_single_compacts_whitespace() -> None:
    body = b'{ "type" : "identify" ,\n "messageId" : "x" }'
    raw, _ = parse_single(body, "identify", BIG)
    assert raw == b'{"type":"identify","messageId":"x"}'


@pytest.mark.parametrize("given", [{}, {"messageId": None}, {"messageId": ""}])
def test_parse_single_adds_messageid_when_missing(given: dict[str, Any]) -> None:
    event = {"type": "page", "properties": {"a": 1}, **given}

    raw, message_id = parse_single(dumps(event), "page", BIG)

    assert is_uuid4(message_id)
    assert json.loads(raw) == {"type": "page", "properties": {"a": 1}, "messageId": message_id}


def test_parse_single_messageids_are_unique() -> None:
    ids = {parse_single(b'{"type":"page"}', "page", BIG)[1] for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize(
    ("path_type", "event"),
    [
        ("page", {}),
        ("identify", {"userId": "u1"}),
        ("track", {"event": "signup"}),
        ("group", {"groupId": "g1"}),
        ("alias", {"previousId": "a"}),
        ("screen", {"name": "home"}),
        ("p", {}),
        ("i", {}),
        ("t", {"event": "signup"}),
        ("g", {}),
        ("a", {}),
        ("s", {}),
        ("event", {"type": "page"}),
        ("e", {"type": "identify"}),
        ("e", {"type": "track", "event": "x"}),
    ],
)
def test_parse_single_accepted_types(path_type: str, event: dict[str, Any]) -> None:
    body = dumps({**event, "messageId": "m"})
    raw, message_id = parse_single(body, path_type, BIG)
    assert message_id == "m"
    assert raw == body


@pytest.mark.parametrize(
    ("alias", "full"),
    [
        ("p", "page"),
        ("i", "identify"),
        ("t", "track"),
        ("g", "group"),
        ("a", "alias"),
        ("s", "screen"),
        ("e", "event"),
        ("page", "page"),
        ("custom", "custom"),
    ],
)
def test_resolve_type(alias: str, full: str) -> None:
    assert resolve_type(alias) == full


@pytest.mark.parametrize(
    ("path_type", "event", "message"),
    [
        ("foo", {}, "event error: Unknown event type: foo"),
        ("x", {"type": "page"}, "event error: Unknown event type: x"),
        ("event", {}, "event error: type property of event is required"),
        ("event", {"type": ""}, "event error: type property of event is required"),
        ("e", {}, "event error: type property of event is required"),
        ("event", {"type": "bogus"}, "event error: Unknown event type: bogus"),
        ("event", {"type": "event"}, "event error: Unknown event type: event"),
        (
            "event",
            {"type": "track"},
            "event error: 'event' property is required for 'track' event",
        ),
        ("track", {}, "event error: 'event' property is required for 'track' event"),
        ("t", {"event": ""}, "event error: 'event' property is required for 'track' event"),
        ("track", {"event": None}, "event error: 'event' property is required for 'track' event"),
        # The path type wins over the body type (Jitsu: ev.Set("type", typeFixed)).
        ("track", {"type": "page"}, "event error: 'event' property is required for 'track' event"),
        # Not a string: absent for Jitsu (GetS).
        ("track", {"event": 123}, "event error: 'event' property is required for 'track' event"),
        ("track", {"event": ["a"]}, "event error: 'event' property is required for 'track' event"),
        ("event", {"type": 5}, "event error: type property of event is required"),
        (
            "track",
            {"event": "x" * (MAX_EVENT_NAME + 1)},
            f"event error: Invalid track event name '{'x' * 129}'. Max length is 128 characters.",
        ),
        (
            "event",
            {"type": "track", "event": "y" * 300},
            f"event error: Invalid track event name '{'y' * 300}'. Max length is 128 characters.",
        ),
        (
            "track",
            {"event": "z" * 2000},
            f"event error: Invalid track event name '{'z' * 1024}…'. Max length is 128 characters.",
        ),
    ],
)
def test_parse_single_event_errors(path_type: str, event: dict[str, Any], message: str) -> None:
    error = ingest_error(parse_single, dumps(event), path_type, BIG)

    assert error.message == message
    assert error.status == 400
    assert error.browser_ok is True  # Jitsu: 200 + error body on browser routes


def test_parse_single_event_name_at_limit() -> None:
    name = "n" * MAX_EVENT_NAME
    raw, _ = parse_single(dumps({"event": name, "messageId": "m"}), "track", BIG)
    assert json.loads(raw)["event"] == name


def test_parse_single_event_name_limit_is_in_bytes() -> None:
    name = "é" * 100  # 100 characters, 200 UTF-8 bytes
    with pytest.raises(IngestError):
        parse_single(dumps({"event": name}), "track", BIG)


@pytest.mark.parametrize("body", [b"[]", b"[{}]", b'"page"', b"1", b"null", b"true"])
def test_parse_single_non_object(body: bytes) -> None:
    error = ingest_error(parse_single, body, "page", BIG)
    assert error.status == 400
    assert error.message == "error parsing message: event must be a JSON object"


@pytest.mark.parametrize(
    "body", [b"", b"{", b"{'type': 'page'}", b'{"type":"page",}', b"\xff\xfe", b"NaNx"]
)
def test_parse_single_malformed_json(body: bytes) -> None:
    error = ingest_error(parse_single, body, "page", BIG)
    assert error.status == 400
    assert error.message.startswith("error parsing message: ")


def test_parse_single_deeply_nested_json() -> None:
    body = b'{"type":"page","p":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    error = ingest_error(parse_single, body, "page", 10**7)
    assert error.status == 400
    assert error.message == "error parsing message: JSON nested too deeply"


def test_parse_single_size_limit_is_inclusive() -> None:
    body = dumps({"type": "page", "messageId": "m", "properties": {"pad": "z" * 500}})

    raw, _ = parse_single(body, "page", len(body))
    assert raw == body

    error = ingest_error(parse_single, body, "page", len(body) - 1)
    assert error.status == 400
    assert error.message == (
        f"event error: message size {len(body)} is too big. max allowed: {len(body) - 1}"
    )


def test_parse_single_size_counts_the_added_messageid() -> None:
    body = dumps({"type": "page"})
    # The forwarded event carries a 36-char uuid, so the raw body's size is not enough.
    error = ingest_error(parse_single, body, "page", len(body) + 10)
    assert error.message.startswith("event error: message size ")


@pytest.mark.parametrize(
    ("given", "forwarded"),
    [
        ("kid1234:secretsecretsecret", "kid1234:***"),
        ("kid1234:***", "kid1234:***"),  # jitsu-js already masks it
        ("plainlegacykey", "plai…:***"),
    ],
)
def test_parse_single_masks_body_write_key(given: str, forwarded: str) -> None:
    body = dumps({"type": "page", "messageId": "m", "writeKey": given})

    raw, _ = parse_single(body, "page", BIG)

    assert json.loads(raw)["writeKey"] == forwarded
    assert b"secret" not in raw
    assert b"plainlegacykey" not in raw


@pytest.mark.parametrize("value", [None, "", 42])
def test_parse_single_leaves_non_key_write_key_values(value: Any) -> None:
    body = dumps({"type": "page", "messageId": "m", "writeKey": value})
    raw, _ = parse_single(body, "page", BIG)
    assert json.loads(raw)["writeKey"] == value


def test_ensure_message_id() -> None:
    event: dict[str, Any] = {"messageId": "keep"}
    assert ensure_message_id(event) == "keep"
    assert event == {"messageId": "keep"}

    event = {}
    new_id = ensure_message_id(event)
    assert is_uuid4(new_id)
    assert event == {"messageId": new_id}
    assert ensure_message_id(event) == new_id  # stable across retries


# ---- orjson, only where it writes json's bytes (issue 9) ---------------------------------


def json_bytes(obj: Any) -> bytes:
    """What the proxy forwarded before orjson: json.dumps, compact, UTF-8; a lone surrogate
    (no UTF-8 form) escaped."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


# Lone surrogates included: a \ud800 escape in a body reads as one.
TEXT = st.text(st.characters(exclude_categories=()), max_size=8)
# Where orjson and json write floats differently (below 1e-4), or read numbers differently
# (integers past 64 bits), besides everything else.
NUMBERS = (
    st.integers()
    | st.integers(min_value=2**62, max_value=2**66)
    | st.integers(min_value=-(2**66), max_value=-(2**62))
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=-1e-3, max_value=1e-3)
    | st.sampled_from([1e16, 1e-5, 2.5e-7, 0.0001, -0.0, 5e-324, 1.7976931348623157e308])
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None)


STYLES = st.sampled_from(["compact", "ascii", "spaced", "indented"])


def spelled(payload: Any, style: str) -> bytes:
    """A payload as some client might send it: compact, ASCII-escaped, spaced or indented."""
    if style == "compact":
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    elif style == "ascii":
        text = json.dumps(payload)
    else:
        text = json.dumps(payload, ensure_ascii=False, indent=2 if style == "indented" else None)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate as (invalid) UTF-8 bytes


@FUZZ
@given(value=JSON_VALUES)
def test_events_are_written_as_json_writes_them(value: Any) -> None:
    payload = {"context": {"v": value}, "batch": []}
    assert encode_batch(payload) == json_bytes(payload)


@FUZZ
@given(
    value=JSON_VALUES,
    message_id=TEXT.filter(bool) | NUMBERS,
    has_timestamp=st.booleans(),
    write_key=st.none() | TEXT,
    style=STYLES,
)
def test_parse_single_forwards_what_the_json_reading_forwards(
    value: Any, message_id: Any, has_timestamp: bool, write_key: str | None, style: str
) -> None:
    """orjson reads the event where it reads it as json does; either way the same bytes go
    upstream, whatever the client's spelling of them."""
    event: dict[str, Any] = {"type": "track", "event": "e", "messageId": message_id}
    event["properties"] = {"p": value}
    if has_timestamp:
        event["timestamp"] = "2024-01-01T00:00:00.000Z"
    if write_key is not None:
        event["writeKey"] = write_key
    data = spelled(event, style)
    stamp = "2024-06-01T00:00:00.000Z"

    raw, got_id = parse_single(data, "track", BIG, stamp)

    reference = json.loads(data)
    expected_id = ensure_message_id(reference)
    reference.setdefault("timestamp", stamp)
    if isinstance(write_key, str) and write_key and not write_key.endswith(":***"):
        reference["writeKey"] = mask_key(write_key)
    assert raw == json_bytes(reference)
    assert got_id == expected_id


# ---- parse_batch_payload -----------------------------------------------------------------


def test_parse_batch_payload_ok() -> None:
    payload = {"batch": [{"type": "page"}], "context": {"library": {"name": "x"}}, "writeKey": "k"}
    assert parse_batch_payload(dumps(payload)) == payload


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[]", "error parsing message: batch payload must be a JSON object"),
        (b'"batch"', "error parsing message: batch payload must be a JSON object"),
        (b"{}", "error parsing message: 'batch' must be a JSON array"),
        (b'{"batch":null}', "error parsing message: 'batch' must be a JSON array"),
        (b'{"batch":{"type":"page"}}', "error parsing message: 'batch' must be a JSON array"),
        (b'{"batch":"[]"}', "error parsing message: 'batch' must be a JSON array"),
        (b'{"batch":[],"context":[]}', "error parsing message: 'context' must be a JSON object"),
        (b'{"batch":[],"context":"x"}', "error parsing message: 'context' must be a JSON object"),
    ],
)
def test_parse_batch_payload_refused(body: bytes, message: str) -> None:
    error = ingest_error(parse_batch_payload, body)
    assert error.status == 400
    assert error.message == message


def test_parse_batch_payload_null_context_is_fine() -> None:
    assert parse_batch_payload(b'{"batch":[],"context":null}') == {"batch": [], "context": None}


def test_parse_batch_payload_malformed_json() -> None:
    error = ingest_error(parse_batch_payload, b'{"batch":[')
    assert error.status == 400
    assert error.message.startswith("error parsing message: ")


# ---- filter_batch ------------------------------------------------------------------------


def test_filter_batch_keeps_good_events_and_reports_bad_ones() -> None:
    good_page = {"type": "page", "messageId": "m1"}
    good_identify = {"type": "identify", "userId": "u"}
    payload = {
        "batch": [
            good_page,
            {"type": "track", "messageId": "m2"},
            "not an object",
            {"type": "nope", "messageId": "m4"},
            good_identify,
            {"type": "track", "messageId": "m6", "event": "e" * 129},
        ]
    }

    result = filter_batch(payload, BIG)

    assert result.errors == [
        "Message ID: m2: event error: 'event' property is required for 'track' event",
        "Event #2: error parsing message: event must be a JSON object",
        "Message ID: m4: event error: Unknown event type: nope",
        f"Message ID: m6: event error: Invalid track event name '{'e' * 129}'. Max length is 128"
        " characters.",
    ]
    assert result.received == 6
    assert result.ok_events == 2
    kept = result.payload["batch"]
    assert kept[0] == {"type": "page", "messageId": "m1"}
    assert kept[1]["type"] == "identify"
    assert kept[1]["userId"] == "u"
    assert is_uuid4(kept[1]["messageId"])


def test_filter_batch_error_for_event_without_messageid_names_the_new_id() -> None:
    result = filter_batch({"batch": [{"properties": {}}]}, BIG)

    assert result.ok_events == 0
    (error,) = result.errors
    prefix, new_id, rest = error.split(": ", 2)
    assert prefix == "Message ID"
    assert is_uuid4(new_id)
    assert rest == "event error: type property of event is required"


def test_filter_batch_all_good() -> None:
    payload = {"batch": [{"type": "page", "messageId": str(i)} for i in range(5)]}
    result = filter_batch(payload, BIG)
    assert result.errors == []
    assert result.received == 5
    assert result.ok_events == 5
    assert [e["messageId"] for e in result.payload["batch"]] == ["0", "1", "2", "3", "4"]


def test_filter_batch_empty() -> None:
    result = filter_batch({"batch": []}, BIG)
    assert (result.received, result.ok_events, result.errors) == (0, 0, [])
    assert result.payload == {"batch": []}


def test_filter_batch_events_name_forces_track() -> None:
    """Jitsu: with a top-level eventsName every item is a track event named after it unless
    it has its own name (§3.5)."""
    payload = {
        "eventsName": "signup",
        "batch": [
            {"messageId": "a"},
            {"type": "page", "messageId": "b"},
            {"type": "bogus", "messageId": "c", "event": "own_name"},
            {"messageId": "d", "event": "z" * 129},
        ],
    }

    result = filter_batch(payload, BIG)

    assert [e["messageId"] for e in result.payload["batch"]] == ["a", "b", "c"]
    assert result.errors == [
        f"Message ID: d: event error: Invalid track event name '{'z' * 129}'. Max length is 128"
        " characters."
    ]
    assert result.payload["eventsName"] == "signup"


@pytest.mark.parametrize("events_name", ["", None, 42])
def test_filter_batch_blank_events_name_does_not_force_track(events_name: Any) -> None:
    payload = {"eventsName": events_name, "batch": [{"messageId": "a"}]}
    result = filter_batch(payload, BIG)
    assert result.ok_events == 0
    assert result.errors == ["Message ID: a: event error: type property of event is required"]


def test_filter_batch_removes_write_key_and_keeps_the_rest() -> None:
    context = {"library": {"name": "analytics-python", "version": "2.0"}, "ip": "1.2.3.4"}
    payload = {
        "writeKey": "kid1234:secretsecretsecret",
        "batch": [{"type": "page", "messageId": "m1"}],
        "context": context,
        "sentAt": "2026-01-01T00:00:00.000Z",
        "eventsName": "",
    }

    result = filter_batch(payload, BIG)

    assert result.payload == {
        "batch": [{"type": "page", "messageId": "m1"}],
        "context": context,
        "sentAt": "2026-01-01T00:00:00.000Z",
        "eventsName": "",
    }
    assert b"secret" not in encode_batch(result.payload)


def test_filter_batch_per_event_size_limit() -> None:
    small = {"type": "page", "messageId": "s"}
    big = {"type": "page", "messageId": "b", "properties": {"pad": "x" * 200}}
    limit = len(dumps(small)) + 10

    result = filter_batch({"batch": [small, big]}, limit)

    assert result.payload["batch"] == [small]
    assert result.errors == [
        f"Message ID: b: event error: message size {len(dumps(big))} is too big. "
        f"max allowed: {limit}"
    ]


def test_encode_batch_is_compact_utf8() -> None:
    assert encode_batch({"batch": [{"n": "é"}], "context": {}}) == (
        '{"batch":[{"n":"é"}],"context":{}}'.encode()
    )


# ---- forward_path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, "/api/s/page"),
        ({"writekey": "kid:secret"}, "/api/s/page"),
        ({"writekey": "kid:secret", "foo": "bar"}, "/api/s/page?foo=bar"),
        ({"a": "1", "writekey": "k", "b": "2"}, "/api/s/page?a=1&b=2"),
        ({"writeKey": "kid:secret", "WRITEKEY": "x", "keep": "y"}, "/api/s/page?keep=y"),
        ({"q": "x y&z=1"}, "/api/s/page?q=x+y%26z%3D1"),
    ],
)
def test_forward_path(query: dict[str, str], expected: str) -> None:
    assert forward_path("/api/s/page", query) == expected


def test_forward_path_multidict_keeps_repeated_params() -> None:
    query = MultiDict([("a", "1"), ("writekey", "kid:secret"), ("a", "2")])
    assert forward_path("/v1/batch", query) == "/v1/batch?a=1&a=2"


BATCH_EVENTS = (
    st.fixed_dictionaries(
        {"messageId": TEXT.filter(bool) | NUMBERS},
        optional={
            "type": st.sampled_from(["track", "page", "nope"]) | JSON_VALUES,
            "event": TEXT | JSON_VALUES,
            "timestamp": TEXT,
            "writeKey": TEXT,
            "properties": JSON_VALUES,
        },
    )
    | JSON_VALUES.filter(lambda v: not isinstance(v, dict))  # not an object: refused
)


@FUZZ
@given(
    events=st.lists(BATCH_EVENTS, max_size=5),
    context=st.none() | st.dictionaries(TEXT, JSON_VALUES, max_size=3),
    extra=st.dictionaries(TEXT, JSON_VALUES, max_size=2),
    style=STYLES,
    max_events=st.sampled_from([2, 10_000]),
)
def test_prepare_batch_forwards_what_the_json_reading_forwards(
    events: list[Any], context: Any, extra: dict[str, Any], style: str, max_events: int
) -> None:
    """orjson reads the batch where it reads it as json does; either way the same pieces go
    upstream and the same answer goes back."""
    payload: dict[str, Any] = {**extra, "batch": events}
    if context is not None:
        payload["context"] = context
    body = spelled(payload, style)
    limits = LimitsConfig(max_batch_events=max_events, max_batch_errors=3)
    stamp = "2024-06-01T00:00:00.000Z"

    try:
        got: Any = prepare_batch(body, "", limits, 600, stamp, 10)
    except IngestError as exc:
        got = exc.message

    try:
        reference = parse_batch_payload(body, max_events)
        result = filter_batch(reference, limits.max_event_bytes, 3, stamp)
        expected: Any = PreparedBatch(
            reference.get("writeKey"), result.received, result.errors, split_batch(result, 600, 10)
        )
    except IngestError as exc:
        expected = exc.message
    assert got == expected


# ---- accepted_at -------------------------------------------------------------------------


def datetime_stamp(now: float) -> str:
    """accepted_at as it was written before issue 9: datetime and strftime per event."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@pytest.mark.parametrize(
    "now", [0.0, 1717200000.0, 1717200000.9995, 1717200000.9999995, 1717200059.99999949, 4e9]
)
def test_accepted_at_is_utc_with_milliseconds(now: float) -> None:
    assert accepted_at(now) == datetime_stamp(now)


@FUZZ
@given(now=st.floats(min_value=0, max_value=4e9))
def test_accepted_at_rounds_as_datetime_does(now: float) -> None:
    assert accepted_at(now) == datetime_stamp(now)


# ---- build_envelope ----------------------------------------------------------------------


def test_build_envelope() -> None:
    envelope = build_envelope("/v1/batch", {"X-Write-Key": KEY.value}, b"{}", 3, KEY)
    assert envelope == Envelope(
        path="/v1/batch",
        headers={"X-Write-Key": KEY.value},
        body=b"{}",
        events=3,
        key_id="kid1234",
    )


def test_build_envelope_without_key() -> None:
    assert build_envelope("/api/s/page", {}, b"{}", 1, None).key_id == ""


def test_an_event_too_deep_to_write_out_is_its_own_error_not_a_crash() -> None:
    """JSON parsed a few frames up the stack can be too deep for json.dumps further down: that
    is the event's own 400, and the rest of the batch goes on."""
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    payload = {"batch": [{"type": "page", "messageId": "deep", "p": deep}, {"type": "page"}]}
    result = filter_batch(payload, BIG)
    assert result.ok_events == 1
    assert result.errors == ["Message ID: deep: error parsing message: JSON nested too deeply"]


@pytest.mark.parametrize(
    ("path", "destination"),
    [
        ("/api/px/page?destination_url=https%3A%2F%2Fa.example%2Fx&data=", "https://a.example/x"),
        (
            "/api/px/page?data="
            + base64.b64encode(b'{"destination_url":"https://b.example/"}').decode(),
            "https://b.example/",
        ),
        ("/api/px/page?destination_url=&data=e30%3D", None),
        (
            "/api/px/page?destination_url=https%3A%2F%2Fc.example&destination_url=x",
            "https://c.example",
        ),
        ("/api/px/page?data=%%%", None),
        ("/api/px/page?data=WzFd", None),
        ("/api/px/page", None),
    ],
)
def test_pixel_destination_is_where_jitsu_redirects(path: str, destination: str | None) -> None:
    assert pixel_destination(path) == destination


def test_a_key_inside_a_list_or_an_object_in_the_body_is_masked_too() -> None:
    """Second attack pass of issue 9: only a string writeKey was masked; ["kid:SECRET"] went
    upstream, and into the buffer, as it came."""
    key = "kid0:TopSecret123"
    odd = [key, {"nested": key}, 7, None, "kid0:***"]
    raw, _mid = parse_single(
        json.dumps({"type": "track", "event": "e", "writeKey": odd}).encode(), "track", 10**6
    )
    assert json.loads(raw)["writeKey"] == ["kid0:***", {"nested": "kid0:***"}, 7, None, "kid0:***"]
    batch = {"batch": [{"type": "track", "event": "e", "writeKey": {"k": [key]}}]}
    prepared = prepare_batch(json.dumps(batch).encode(), "", LimitsConfig(), 10**6)
    ((body, _n),) = prepared.pieces
    assert b"TopSecret123" not in body
