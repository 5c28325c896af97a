"""Turns an accepted ingest request into an Envelope: the exact upstream request we will replay.

One envelope is one upstream request with Jitsu's per-request meaning kept: a single event goes
to the same `/api/s/...` path, a batch goes as a batch. Validation mirrors Jitsu's patchEvent, so
callers get the error here instead of a silent rejection later.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import re
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from proxy.auth import WriteKey, mask_key
from proxy.config import LimitsConfig
from proxy.errors import IngestError

EVENT_TYPES = frozenset({"page", "identify", "track", "group", "alias", "screen"})
TYPE_ALIASES = {
    "p": "page",
    "i": "identify",
    "t": "track",
    "g": "group",
    "a": "alias",
    "s": "screen",
    "e": "event",
}
MAX_EVENT_NAME = 128
# Of a refused event name, the answer repeats this many characters.
MAX_SHOWN_NAME = 1024

# What a stored row costs besides its fields (SQLite record and index overhead, roughly), so
# that a flood of tiny rows is counted against buffer.max_bytes too.
ROW_OVERHEAD = 64
# Gzip input is fed to zlib in slices of this size: the bytes left over at the end of a member
# are copied once per member, so their cost stays linear in the body.
GZIP_SLICE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Envelope:
    """What goes into the buffer: path (with query), headers and body of the upstream request."""

    path: str
    headers: dict[str, str]
    body: bytes
    events: int
    key_id: str
    method: str = "POST"

    @functools.cached_property
    def headers_json(self) -> str:
        return json.dumps(self.headers)

    @functools.cached_property  # the buffer asks several times per row
    def stored_size(self) -> int:
        """Everything the buffer stores for this row, so that buffer.max_bytes is a bound on
        the disk: body, path (a pixel's event lives in its query string), headers, key id."""
        return (
            len(self.body)
            + len(self.path.encode("utf-8", "surrogatepass"))
            + len(self.headers_json)
            + len(self.key_id.encode("utf-8", "surrogatepass"))
            + ROW_OVERHEAD
        )


@dataclasses.dataclass(frozen=True)
class BatchResult:
    payload: dict[str, Any]
    received: int
    errors: list[str]
    # Each kept event as it will be forwarded (compact JSON, body key masked).
    raw_events: list[bytes] = dataclasses.field(default_factory=list)

    @property
    def ok_events(self) -> int:
        return len(self.payload["batch"])


def check_content_type(content_type: str) -> None:
    """Jitsu accepts a media type ending in application/json or text/plain (beacons), compared
    as sent, case and all (gin's ContentType and strings.HasSuffix): what Jitsu would refuse
    is refused here, not after the 2xx."""
    media = content_type.split(";", 1)[0].strip()
    if not media.endswith(("application/json", "text/plain")):
        raise IngestError(
            f"invalid content type: {media or '(none)'}. Expected: application/json",
            status=400,
            browser_ok=False,
        )


def decompress(body: bytes, encoding: str, limit: int, max_members: int = 100) -> bytes:
    """Inflate a gzip request body, refusing to produce more than `limit` bytes or to read more
    than `max_members` gzip members. Linear in the body: input goes in by slices, so what is
    left over after a member is at most one slice (never the rest of the body, copied again
    for every member)."""
    if "gzip" not in encoding.lower():
        return body
    parts: list[bytes] = []
    produced = 0
    members = 1
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pos = 0
    data = b""
    while True:
        if not data:
            if pos >= len(body):
                break
            data = body[pos : pos + GZIP_SLICE]
            pos += GZIP_SLICE
        try:
            out = inflater.decompress(data, limit - produced + 1)
        except zlib.error as exc:
            raise IngestError(
                f"error parsing message: invalid gzip body: {exc}", status=400
            ) from None
        produced += len(out)
        if produced > limit:
            raise IngestError(
                f"request body too large: more than {limit} bytes after decompression",
                status=413,
            )
        parts.append(out)
        # Below the cap the whole slice was consumed (unconsumed_tail is empty).
        data = b""
        if inflater.eof:
            # A gzip stream may be several members back to back; Go's reader reads them all.
            data = inflater.unused_data
            if not data and pos >= len(body):
                break
            members += 1
            if members > max_members:
                raise IngestError(
                    f"request body too large: more than {max_members} gzip members", status=413
                )
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    if not inflater.eof:
        raise IngestError("error parsing message: truncated gzip body", status=400)
    return b"".join(parts)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


@contextlib.contextmanager
def _reading_json() -> Iterator[None]:
    """A body that is not JSON we can take is Jitsu's "error parsing message"."""
    try:
        yield
    except RecursionError:
        raise IngestError("error parsing message: JSON nested too deeply", status=400) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IngestError(f"error parsing message: {exc}", status=400) from None


def _fast_load(body: bytes) -> Any:
    """orjson's reading of a body, or None where json must read it: anything orjson refuses
    (UTF-16, a BOM, a lone surrogate, NaN, numbers out of range, deep nesting) gets json's own
    answer. What orjson reads, json reads the same, except integers past 64 bits, which orjson
    reads as floats: _fast_dump gives those away (issue 9; fuzzed in tests/test_envelope.py)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


# A float in orjson's output with an exponent, or below 1e-4: there json.dumps may write other
# digits ("1e-05" for orjson's "0.00001", "2.5e-07" for "2.5e-7"), and an integer past 64
# bits that orjson read as a float shows as one (1.8446744073709552e+19). Searched with re:
# faster here than `in` on bytes.
_SMALL_FLOAT = re.compile(rb"0\.0000")
_EXPONENT = re.compile(rb"e[-+]")
_NUMBER_TEXT = frozenset(b"0123456789.-")


def _fast_dump(obj: Any) -> bytes | None:
    """orjson's bytes for `obj` when they are json.dumps's (compact, ensure_ascii=False), else
    None. orjson refuses lone surrogates and integers past 64 bits itself."""
    try:
        raw = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return None
    if _SMALL_FLOAT.search(raw):
        return None
    for match in _EXPONENT.finditer(raw):
        # A number when the digits before the `e` follow `:`, `,` or `[` (a uuid's "3e-4"
        # in a string does not): json is asked then, a rare case.
        start = match.start()
        while start > 0 and raw[start - 1] in _NUMBER_TEXT:
            start -= 1
        if start < match.start() and start > 0 and raw[start - 1] in b":,[":
            return None
    return raw


def _parse_json(body: bytes) -> Any:
    """Strict JSON: NaN, Infinity and overflowing numbers are refused here, since what we
    accept we must be able to forward as JSON."""
    with _reading_json():
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)


def _dump(obj: Any) -> bytes:
    """Compact JSON, non-ASCII as UTF-8: json.dumps's bytes, written by orjson where they are
    the same (issue 9: about 20 times faster), by json where they may not be."""
    fast = _fast_dump(obj)
    if fast is not None:
        return fast
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate from a \ud800 escape has no UTF-8 form; escaped, it stays JSON.
            return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    except RecursionError:
        # Parsed a few frames higher up the stack, it can be too deep to write out here.
        raise IngestError("error parsing message: JSON nested too deeply", status=400) from None


def resolve_type(path_type: str) -> str:
    return TYPE_ALIASES.get(path_type, path_type)


def _validate_event(
    event: dict[str, Any], fixed_type: str, default_name: str | None = None
) -> None:
    """Jitsu's patchEvent checks, with its words: the path type wins unless it is `event`; a
    `type` or `event` that is not a string counts as absent (OrderedMap.GetS)."""
    if fixed_type == "event":
        body_type = _string(event.get("type"))
        if not body_type:
            raise IngestError("event error: type property of event is required")
        fixed_type = body_type
    if fixed_type not in EVENT_TYPES:
        raise IngestError(f"event error: Unknown event type: {fixed_type}")
    if fixed_type == "track":
        name = _string(event.get("event")) or default_name
        if not name:
            raise IngestError("event error: 'event' property is required for 'track' event")
        # Go's len() counts bytes, and Jitsu checks with it.
        if len(name.encode("utf-8", "surrogatepass")) > MAX_EVENT_NAME:
            # Jitsu repeats the name whole; cut here, so that a batch answer stays small.
            shown = name if len(name) <= MAX_SHOWN_NAME else name[:MAX_SHOWN_NAME] + "…"
            raise IngestError(
                f"event error: Invalid track event name '{shown}'. "
                f"Max length is {MAX_EVENT_NAME} characters."
            )


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def accepted_at(now: float | None = None) -> str:
    """Jitsu's timestamp format: UTC, milliseconds, Z (Go's 2006-01-02T15:04:05.000Z).

    The second's text is kept (issue 9: strftime per event cost some 4 µs); the rest is what
    datetime.fromtimestamp would give: microseconds rounded half to even, then cut to ms."""
    now = time.time() if now is None else now
    second = math.floor(now)
    micros = round((now - second) * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    return f"{_second_text(second)}{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.")


def ensure_timestamp(event: dict[str, Any], stamp: str | None) -> None:
    """Jitsu sets `timestamp` to when it received an event that has none; behind the proxy
    that would be the time of delivery, hours late after an outage. The edge passes the time
    of acceptance (`stamp`) instead. A client's own timestamp is never changed (issue 8), null
    included: Jitsu keeps that too (patchEvent: SetIfAbsent)."""
    if stamp is not None and "timestamp" not in event:
        event["timestamp"] = stamp


def ensure_message_id(event: dict[str, Any]) -> str:
    """Give the event a stable messageId before its first attempt, so retries dedupe upstream."""
    message_id = event.get("messageId")
    if message_id is None or message_id == "":
        message_id = str(uuid.uuid4())
        event["messageId"] = message_id
    return str(message_id)


def _event_size_check(raw: bytes, max_event_bytes: int) -> None:
    if len(raw) > max_event_bytes:
        raise IngestError(
            f"event error: message size {len(raw)} is too big. max allowed: {max_event_bytes}"
        )


def _mask_body_key(event: dict[str, Any], field: str = "writeKey") -> None:
    """jitsu-js puts a masked key in the body; anything else there would carry the secret,
    a key inside a list or an object too (second attack pass of issue 9)."""
    body_key = event.get(field)
    if isinstance(body_key, str):
        if body_key and not body_key.endswith(":***"):
            event[field] = mask_key(body_key)
    elif isinstance(body_key, list | dict):
        event[field] = _mask_strings(body_key)


def mask_shown_keys(event: dict[str, Any]) -> None:
    """A stored event's keys masked once more before an offline tool shows it (`writeKey`, the
    Classic API's `api_key`): the ingest masked them, a row stored by an older proxy may not be."""
    _mask_body_key(event)
    _mask_body_key(event, "api_key")


def _mask_strings(value: Any) -> Any:
    if isinstance(value, str):
        return mask_key(value) if value and not value.endswith(":***") else value
    if isinstance(value, list):
        return [_mask_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: _mask_strings(v) for k, v in value.items()}
    return value


def parse_single(
    body: bytes, path_type: str, max_event_bytes: int, stamp: str | None = None
) -> tuple[bytes, str]:
    """Validate one event and return its bytes to forward, plus its messageId; `stamp` is the
    timestamp it gets if it has none."""
    event = _fast_load(body)
    raw = None
    if event is not None:
        message_id = _prepare_single(event, path_type, stamp)
        raw = _fast_dump(event)
    if raw is None:
        event = _parse_json(body)
        message_id = _prepare_single(event, path_type, stamp)
        raw = _dump(event)
    _event_size_check(raw, max_event_bytes)
    return raw, message_id


def _prepare_single(event: Any, path_type: str, stamp: str | None) -> str:
    """Check a parsed event and give it what it lacks (messageId, timestamp, masked key)."""
    if not isinstance(event, dict):
        raise IngestError("error parsing message: event must be a JSON object")
    _validate_event(event, resolve_type(path_type))
    message_id = ensure_message_id(event)
    ensure_timestamp(event, stamp)
    _mask_body_key(event)
    return message_id


def parse_batch_payload(body: bytes, max_events: int | None = None) -> dict[str, Any]:
    """The batch payload, read one array element at a time: more than `max_events` elements
    are refused (413) before they exist in memory, so a small body of `{},{},...` cannot turn
    into millions of events."""
    payload = _load_batch(body, max_events)
    batch = payload.get("batch")
    if not isinstance(batch, list):
        raise IngestError("error parsing message: 'batch' must be a JSON array")
    context = payload.get("context")
    if context is not None and not isinstance(context, dict):
        raise IngestError("error parsing message: 'context' must be a JSON object")
    return payload


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_SPACE = re.compile(r"[ \t\n\r]*")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """Lone surrogates (a JSON "\\ud800" escape, bytes that were not UTF-8) as U+FFFD, as Go
    decodes them, and so that the text has a UTF-8 form SQLite can store."""
    return _LONE_SURROGATE.sub("\ufffd", text)


@dataclasses.dataclass
class _BatchLayout:
    """Where the `batch` array and its elements lie in the text `_load_batch` read."""

    text: str = ""
    start: int = -1  # just after the array's `[`
    end: int = -1  # at its `]`
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def _load_batch(
    body: bytes, max_events: int | None, layout: _BatchLayout | None = None
) -> dict[str, Any]:
    """json.loads for a top-level object, except that a `batch` array is read element by
    element and capped. Same acceptance as json.loads otherwise (duplicate keys: the last).
    With `layout`, it also notes where the `batch` array's elements lie in the text."""
    with _reading_json():
        text = _json_text(body)
        if layout is not None:
            layout.text = text
        pos = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] != "{":
            if len(text) - pos <= 64 * 1024:
                # Small: parse it, so that malformed JSON gets the parser's own message.
                _value, end = _DECODER.raw_decode(text, pos)
                _expect_end(text, end)
            # Large: not an object either way; never build a million-element array to say so.
            raise IngestError("error parsing message: batch payload must be a JSON object")
        payload: dict[str, Any] = {}
        pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] == "}":
            _expect_end(text, pos + 1)
            return payload
        while True:
            if text[pos : pos + 1] != '"':
                raise ValueError(f"Expecting property name enclosed in double quotes: char {pos}")
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos : pos + 1] != ":":
                raise ValueError(f"Expecting ':' delimiter: char {pos}")
            pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            if key == "batch" and text[pos : pos + 1] == "[":
                payload[key], pos = _load_array(text, pos, max_events, layout)
            else:
                payload[key], pos = _DECODER.raw_decode(text, pos)
            pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
            delimiter = text[pos : pos + 1]
            pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            if delimiter == "}":
                _expect_end(text, pos)
                return payload
            if delimiter != ",":
                raise ValueError(f"Expecting ',' delimiter: char {pos}")


def _json_text(body: bytes) -> str:
    text = body.decode(json.detect_encoding(body), "surrogatepass")
    if text.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")
    return text


def _expect_end(text: str, pos: int) -> None:
    pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
    if pos != len(text):
        raise ValueError(f"Extra data: char {pos}")


def _load_array(
    text: str, pos: int, max_events: int | None, layout: _BatchLayout | None = None
) -> tuple[list[Any], int]:
    items: list[Any] = []
    spans: list[tuple[int, int]] = []
    start = pos + 1
    pos = _SPACE.match(text, start).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] == "]":
        if layout is not None:
            layout.start, layout.end, layout.spans = start, pos, spans
        return items, pos + 1
    while True:
        if max_events is not None and len(items) >= max_events:
            raise IngestError(
                f"request body too large: a batch holds at most {max_events} events", status=413
            )
        value, end = _DECODER.raw_decode(text, pos)
        items.append(value)
        spans.append((pos, end))
        pos = _SPACE.match(text, end).end()  # type: ignore[union-attr]
        delimiter = text[pos : pos + 1]
        if delimiter == "]" and layout is not None:
            # The last `batch` wins, as it does in the payload.
            layout.start, layout.end, layout.spans = start, pos, spans
        pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        if delimiter == "]":
            return items, pos
        if delimiter != ",":
            raise ValueError(f"Expecting ',' delimiter: char {pos}")


def filter_batch(
    payload: dict[str, Any],
    max_event_bytes: int,
    max_errors: int | None = None,
    stamp: str | None = None,
    dump: Callable[[Any], bytes] = _dump,
) -> BatchResult:
    """Keep the valid events of a batch; report the others the way Jitsu's batch answer does,
    listing at most `max_errors` of them (a hostile batch must not make a huge answer).
    One bad event never blocks the rest."""
    events_name = payload.get("eventsName")
    default_name = events_name if isinstance(events_name, str) and events_name else None
    kept: list[dict[str, Any]] = []
    raw_events: list[bytes] = []
    errors: list[str] = []
    refused = 0
    for index, event in enumerate(payload["batch"]):
        error: str | None = None
        if not isinstance(event, dict):
            error = f"Event #{index}: error parsing message: event must be a JSON object"
        else:
            message_id = ensure_message_id(event)
            ensure_timestamp(event, stamp)
            _mask_body_key(event)
            try:
                _validate_event(event, "track" if default_name else "event", default_name)
                raw = dump(event)
                _event_size_check(raw, max_event_bytes)
            except IngestError as exc:
                error = f"Message ID: {message_id}: {exc.message}"
        if error is None:
            kept.append(event)
            raw_events.append(raw)
            continue
        refused += 1
        if max_errors is None or len(errors) < max_errors:
            errors.append(error)
    if refused > len(errors):
        errors.append(f"{refused - len(errors)} more event(s) refused, not listed")
    out = {k: v for k, v in payload.items() if k != "writeKey"}
    out["batch"] = kept
    return BatchResult(
        payload=out, received=len(payload["batch"]), errors=errors, raw_events=raw_events
    )


def split_batch(
    result: BatchResult,
    max_bytes: int,
    header_bytes: int = 0,
    dump: Callable[[Any], bytes] = _dump,
) -> list[tuple[bytes, int]]:
    """The kept events as upstream batch bodies of at most `max_bytes` each (one event alone
    may exceed it), every piece with the batch's other top-level fields (context, eventsName),
    which Jitsu applies per event, so the split changes nothing upstream. Returns (body, events)
    pairs; the events' bytes are the ones already checked, not serialised again.
    `header_bytes`: what the request's headers cost in every stored piece."""
    head = dump({k: v for k, v in result.payload.items() if k != "batch"})
    prefix = head[:-1] + (b"," if len(head) > 2 else b"") + b'"batch":['
    suffix = b"]}"
    if (len(prefix) + header_bytes) * 4 > max_bytes:
        # Every piece repeats the context and the request's headers: split with large ones
        # and a hostile batch of small events would store them once per event. Such a batch
        # goes whole, as it came.
        max_bytes = 1 << 62
    pieces: list[tuple[bytes, int]] = []
    group: list[bytes] = []
    size = len(prefix) + len(suffix)
    for raw in result.raw_events:
        extra = len(raw) + (1 if group else 0)
        if group and size + extra > max_bytes:
            pieces.append((prefix + b",".join(group) + suffix, len(group)))
            group, size = [], len(prefix) + len(suffix)
            extra = len(raw)
        group.append(raw)
        size += extra
    if group:
        pieces.append((prefix + b",".join(group) + suffix, len(group)))
    return pieces


@dataclasses.dataclass(frozen=True)
class StoredBatch:
    """A buffered batch body taken apart, so that some of its events can be stored or sent
    on their own (a batch Jitsu took in part, a batch too large for upstream): the bytes
    around the `batch` array, kept as they are (context, eventsName), and each event's own
    bytes, unchanged (messageId, timestamp)."""

    head: bytes
    tail: bytes
    events: tuple[bytes, ...]
    # Each event's `messageId` as stored (None when it has none or is not an object).
    message_ids: tuple[object, ...]

    def body(self, indices: Iterable[int]) -> bytes:
        """The batch with only these events, in the order given."""
        return self.head + b",".join(self.events[i] for i in indices) + self.tail


def read_stored_batch(body: bytes) -> StoredBatch | None:
    """A stored body taken apart as a batch; None when it is not a JSON object with a
    `batch` array (a single event, or a body this proxy did not write)."""
    if json.detect_encoding(body) != "utf-8":
        return None
    layout = _BatchLayout()
    try:
        payload = _load_batch(body, None, layout)
    except IngestError:
        return None
    batch = payload.get("batch")
    if not isinstance(batch, list) or layout.start < 0 or len(layout.spans) != len(batch):
        return None
    text = layout.text

    def encoded(part: str) -> bytes:
        return part.encode("utf-8", "surrogatepass")

    return StoredBatch(
        head=encoded(text[: layout.start]),
        tail=encoded(text[layout.end :]),
        events=tuple(encoded(text[a:b]) for a, b in layout.spans),
        message_ids=tuple(e.get("messageId") if isinstance(e, dict) else None for e in batch),
    )


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """A batch request made ready for the buffer (the result of `prepare_batch`)."""

    body_key: Any  # `writeKey` of the body, for auth; never forwarded
    received: int
    errors: list[str]
    pieces: list[tuple[bytes, int]]  # upstream bodies and their event counts

    @property
    def ok_events(self) -> int:
        return sum(n for _, n in self.pieces)


def prepare_batch(
    body: bytes,
    encoding: str,
    limits: LimitsConfig,
    max_forward_bytes: int,
    stamp: str | None = None,
    header_bytes: int = 0,
) -> PreparedBatch:
    """Inflate, parse, validate and split a batch body (`header_bytes`: see split_batch). Pure
    and picklable: large bodies run in a worker process (proxy.offload)."""
    if "gzip" in encoding.lower() and body[:2] == b"\x1f\x8b":
        body = decompress(body, encoding, limits.max_decompressed_bytes, limits.max_gzip_members)
    payload = _fast_batch_payload(body, limits.max_batch_events)
    # Read by orjson, and every number in it written as json writes it: the events (which
    # gain only strings: messageId, timestamp, a masked key) are written by orjson alone.
    dump: Callable[[Any], bytes] = orjson.dumps
    if payload is None:
        payload = parse_batch_payload(body, limits.max_batch_events)
        dump = _dump
    result = filter_batch(payload, limits.max_event_bytes, limits.max_batch_errors, stamp, dump)
    return PreparedBatch(
        body_key=payload.get("writeKey"),
        received=result.received,
        errors=result.errors,
        pieces=split_batch(result, max_forward_bytes, header_bytes, dump),
    )


def _fast_batch_payload(body: bytes, max_events: int) -> dict[str, Any] | None:
    """The batch payload as orjson reads it (issue 9: some 5 times faster than element by
    element), when that is what parse_batch_payload would return: fewer commas than
    `max_events`, so no array in it can reach the cap that the element-wise reading is there
    to enforce (and a repeated `batch` cannot hide one that does); a JSON object whose
    `batch` is an array and `context` an object; and every number in it written by orjson
    as json writes it (_fast_dump: no integer past 64 bits that orjson read as a float).
    Else None, and parse_batch_payload reads it, with its own errors."""
    if body.count(b",") >= max_events:
        return None
    payload = _fast_load(body)
    if type(payload) is not dict or not isinstance(payload.get("batch"), list):
        return None
    context = payload.get("context")
    if context is not None and not isinstance(context, dict):
        return None
    if _fast_dump(payload) is None:
        return None
    return payload


@dataclasses.dataclass(frozen=True)
class ClassicBody:
    """A Classic API body made ready for the buffer (the result of `parse_classic`)."""

    events: list[bytes]  # each event to forward on its own, as a JSON object
    error: str | None  # Jitsu's answer when one of them was refused (the others go on)


def parse_classic(
    body: bytes, max_events: int, max_event_bytes: int, stamp: str | None = None
) -> ClassicBody:
    """A Classic API body read as Jitsu's ClassicHandler reads it
    (ingest/router_classic_handler.go): an array of events when its first byte is `[`, else
    one event. Any JSON object is an event: the classic format has no type to check. Pure and
    picklable, like prepare_batch."""
    if not body:
        # Jitsu indexes body[0] and recovers from the panic: 500, and nothing stored.
        raise _classic_panic()
    with _reading_json():
        text = _json_text(body)
        if body[:1] == b"[":
            parsed, end = _load_array(text, 0, max_events)
        else:
            parsed, end = _DECODER.raw_decode(text, _SPACE.match(text).end())  # type: ignore[union-attr]
        _expect_end(text, end)
    events: list[Any] = parsed if body[:1] == b"[" else [parsed]
    if any(event is None for event in events):
        # `null` unmarshals to a nil event, whose first read panics in Jitsu.
        raise _classic_panic()
    if not all(isinstance(event, dict) for event in events):
        raise IngestError("error parsing message: an event must be a JSON object")
    raws: list[bytes] = []
    error: str | None = None
    for event in events:
        _prepare_classic_event(event, stamp)
        raw = _dump(event)
        try:
            _event_size_check(raw, max_event_bytes)
        except IngestError as exc:
            # Jitsu answers its first refusal and goes on with the next events.
            error = error or exc.message
            continue
        raws.append(raw)
    return ClassicBody(raws, error)


def _classic_panic() -> IngestError:
    """Jitsu's answer after it recovered from a panic in the classic handler (a masked error
    with an id of its own: appbase ResponseError)."""
    return IngestError(f"error# {uuid.uuid4().hex}: panic", status=500, browser_ok=False)


def _prepare_classic_event(event: dict[str, Any], stamp: str | None) -> None:
    """What patchClassicEvent sets at receipt, set here at acceptance when the event lacks it:
    `eventn_ctx_event_id` (the messageId, so that retries dedupe) and `utc_time` (the time of
    acceptance, not of delivery hours later). Both only when absent, as its SetIfAbsent does.
    `api_key` is masked: Jitsu overwrites it with the key it found the stream by (the key
    in X-Write-Key), so its body value only ever carried the secret to disk."""
    if "eventn_ctx_event_id" not in event:
        event["eventn_ctx_event_id"] = str(uuid.uuid4())
    if stamp is not None and "utc_time" not in event:
        event["utc_time"] = stamp
    _mask_body_key(event, "api_key")


def forward_path(path: str, query: Mapping[str, str] | Mapping[str, list[str]]) -> str:
    """The request path with `writekey` removed from the query string. A multidict's repeated
    names, or a name's list of values, go as repeated parameters."""
    rest = [(k, v) for k, v in query.items() if k.lower() != "writekey"]
    return f"{path}?{urlencode(rest, doseq=True)}" if rest else path


def build_envelope(
    path: str,
    headers: dict[str, str],
    body: bytes,
    events: int,
    key: WriteKey | None,
    method: str = "POST",
) -> Envelope:
    return Envelope(
        path=path,
        headers=headers,
        body=body,
        events=events,
        key_id=key.key_id if key else "",
        method=method,
    )


def encode_batch(payload: dict[str, Any]) -> bytes:
    return _dump(payload)


# Pixel query parameters that steer the pixel rather than describe the event.
PIXEL_CONTROL = frozenset({"data", "cookie_domain", "process_headers", "destination_url"})

# Every value of every query parameter, in order: what Go's url.Values holds.
PixelQuery = dict[str, list[str]]


def _first_only(name: str) -> bool:
    """Parameters of which Jitsu reads the first value only (url.Values.Get, c.Query) and puts
    none in the event: the control ones, and the key (never in the event here: its secret)."""
    return name in PIXEL_CONTROL or name.lower() == "writekey"


def pixel_query(pairs: Iterable[tuple[str, str]]) -> PixelQuery:
    """The pixel's query string: every value of a repeated parameter, in order, since Jitsu's
    parsePixelEvent makes an array of them (ingest/router_pixel_handler.go); of a control
    parameter or the key only the first value, the only one Jitsu reads.

    Everything the pixel does (the key, the event and its validation, the cookie, the
    redirect) reads this dict, and the forwarded query is encoded from it, so what is
    validated is exactly what goes upstream (issue 7, finding 12), and Jitsu builds from the
    forwarded query the event validated here.
    """
    query: PixelQuery = {}
    for name, value in pairs:
        values = query.setdefault(name, [])
        if not values or not _first_only(name):
            values.append(value)
    return query


def pixel_first(query: PixelQuery, name: str) -> str | None:
    """A parameter as Go's url.Values.Get reads it: its first value."""
    values = query.get(name)
    return values[0] if values else None


def pixel_event(query: PixelQuery, path_type: str) -> dict[str, Any]:
    """The event a pixel request describes, as Jitsu assembles it: `data` (standard base64 of a
    JSON object), then every other parameter set at its dotted path, a repeated one as the
    array of its values. Validated like any event."""
    event: dict[str, Any] = {}
    data = pixel_first(query, "data")
    if data:
        try:
            decoded = json.loads(base64.b64decode(data, validate=True))
        except (ValueError, binascii.Error, RecursionError):
            raise IngestError("error parsing message: 'data' is not base64 of JSON") from None
        if not isinstance(decoded, dict):
            raise IngestError("error parsing message: 'data' must be a JSON object")
        event = decoded
    for name, values in query.items():
        if not _first_only(name):
            _set_path(event, name, values[0] if len(values) == 1 else list(values))
    _validate_event(event, resolve_type(path_type))
    return event


def _set_path(event: dict[str, Any], path: str, value: Any) -> None:
    """jsonorder's SetPath: a dotted name sets a nested field, making the objects on the way;
    when one on the way is already something else, nothing is set. So `a=1&a.b=2` gives
    `a: "1"` in whichever order Go's map hands the names over."""
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


def pixel_destination(path: str) -> str | None:
    """Where Jitsu's pixel sends the visitor after taking the event of this (forwarded) pixel
    request: `destination_url` of the query, else of the event in `data` (extractRedirectUrl,
    which reads the first value of a parameter)."""
    query: dict[str, str] = {}
    for name, value in parse_qsl(urlsplit(path).query, keep_blank_values=True):
        query.setdefault(name, value)
    if "destination_url" in query:
        return query["destination_url"] or None
    try:
        event = json.loads(base64.b64decode(query.get("data", ""), validate=True))
    except (ValueError, binascii.Error, RecursionError):
        return None
    destination = event.get("destination_url") if isinstance(event, dict) else None
    return destination if isinstance(destination, str) and destination else None


def mask_pixel_key(query: PixelQuery, event: Mapping[str, Any]) -> None:
    """A write key inside the pixel's base64 `data` is masked there, as in any other event
    body: the forwarded query string must not carry the secret. `event` is what pixel_event
    built from that query: its `writeKey` can only come from `data` (the query's own writekey
    is never set on the event), and without one no spelling of the name is in `data` either,
    whose bytes then stay as sent."""
    data = pixel_first(query, "data")
    if not data or "writeKey" not in event:
        return
    decoded = json.loads(base64.b64decode(data, validate=True))  # pixel_event checked it
    _mask_body_key(decoded)
    # Written out again from what was parsed: the raw text may hold the key more than once
    # (a repeated name, an escaped spelling) where the parsed object shows only the last.
    query["data"] = [base64.b64encode(_dump(decoded)).decode("ascii")]
