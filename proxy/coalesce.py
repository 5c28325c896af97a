"""Which buffered single events may go upstream together as one batch, and what Jitsu's answer
to that batch says about each of them (issue 9: coalesced forwarding, only where it changes
nothing). Pure: the forwarder decides when, this module decides what.

Jitsu's batch handler (ingest/router_batch_handler.go BatchHandler) runs each event through the
same patchEvent and buildIngestMessage as its single-event handler (router_ingest_handler.go),
with what the request says applied to every event: the write key (looked up strictly, no slug,
domain or sole stream: router.go getStream), the client IP and X-IP-Policy, the User-Agent and
Accept-Language, every header (kept for functions as ctx.headers), the Host. Its ingest type is
the key's, or the route's for a plain key: /v1/batch is the browser route's twin and
/api/s/s2s/batch the s2s route's (WriteKeyStreamLocator). The event's type comes from its body
(tp "event"), where the single route takes the path's. So events share a batch only when their
stored requests have the same route kind and the same headers, a write key among them, and
each event carries the path's type in its body. Two events Jitsu's in-batch deduplication
(deduplicateBatch) might take for one never share a batch, nor two that Jitsu's answer would
name alike (its messageId clean-up), nor one it would name by an id of its own.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any, Generic, TypeVar

from proxy.envelope import EVENT_TYPES, MAX_EVENT_NAME, replace_surrogates, resolve_type
from proxy.retry import (
    BATCH_ERROR,
    EVENT_ERROR,
    NO_DESTINATIONS,
    THROTTLED,
    jitsu_message_id,
)

T = TypeVar("T")

# Jitsu's batch route for each single-event route kind (ingest/router.go NewRouter).
BATCH_PATHS = {"/api/s/": "/v1/batch", "/api/s/s2s/": "/api/s/s2s/batch"}
_SINGLE = re.compile(r"(/api/s/(?:s2s/)?)([^/?#]+)")
# A batch holds at most this many events: Jitsu's answer to it stays small.
MAX_EVENTS = 500
_FRAME = len(b'{"batch":[]}')
# How many rows of one kind a batch passes over (in-batch twins) before it is sent as it is.
MAX_PASSED_OVER = 64
# The size error patchEvent's caller gives (router.go buildIngestMessage): the ingest message
# holds the request's headers, Content-Length included, which a batch makes longer.
MESSAGE_SIZE = f"{EVENT_ERROR}: message size "


@dataclasses.dataclass(frozen=True)
class Member:
    """What a buffered single event brings to a batch."""

    kind: Hashable  # batch path and every header: events alike in what their request says
    batch_path: str
    s2s: bool  # from the s2s route
    event: bytes  # the event as it goes into the batch: the path's type in its body
    jitsu_id: str  # how Jitsu's batch answer names it
    # deduplicateBatch's fields (anonymousId, userId, type, event); None when the event has no
    # timestamp, which Jitsu never takes for a duplicate.
    twin: tuple[str, str, str, str] | None
    properties: str | None  # canonical form; None: not an object, may print like anything
    traits: str | None


def member(
    method: str, path: str, headers: Mapping[str, str], body: bytes, events: int
) -> Member | None:
    """The stored request as a batch member, or None when it must go as it is: not a single
    event of /api/s/{type} or /api/s/s2s/{type} (a query string included), no write key (Jitsu
    finds no stream by Host for a batch), an event whose type or name Jitsu's single route
    would refuse, a body type other than the path's (the path's wins there), no string
    messageId, or one nested too deep for this process to compare with others (ingest takes
    deeper events than Python's recursion can walk; alone, its bytes go as they are)."""
    try:
        return _member(method, path, headers, body, events)
    except RecursionError:
        return None


def _member(
    method: str, path: str, headers: Mapping[str, str], body: bytes, events: int
) -> Member | None:
    match = _SINGLE.fullmatch(path)
    if method != "POST" or events != 1 or match is None or not headers.get("X-Write-Key"):
        return None
    try:
        event = json.loads(body)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    jitsu_id = jitsu_message_id(event.get("messageId"))
    path_type = resolve_type(match[2])
    body_type = event.get("type")
    fixed = _string(body_type) if path_type == "event" else path_type
    if jitsu_id is None or fixed not in EVENT_TYPES or not _named(event, fixed):
        return None
    raw = body
    if body_type != fixed:
        if "type" in event or not body.endswith(b"}"):
            return None
        # Appended to the proxy's compact JSON. (Alone, Jitsu's Set would append it after the
        # fields patchEvent adds; the order of an object's keys means nothing in JSON.)
        raw = body[:-1] + (b"," if body != b"{}" else b"") + b'"type":"' + fixed.encode() + b'"}'
    timestamp = _string(event.get("timestamp"))
    twin = (
        (
            _string(event.get("anonymousId")),
            _string(event.get("userId")),
            fixed,
            _string(event.get("event")),
        )
        if timestamp
        else None
    )
    batch_path = BATCH_PATHS[match[1]]
    return Member(
        kind=(batch_path, tuple(sorted(headers.items()))),
        batch_path=batch_path,
        s2s=match[1] == "/api/s/s2s/",
        event=raw,
        jitsu_id=jitsu_id,
        twin=twin,
        properties=_printed(event, "properties"),
        traits=_printed(event, "traits"),
    )


def _string(value: Any) -> str:
    """OrderedMap.GetS: the value if it is a string, else ""."""
    return value if isinstance(value, str) else ""


def _named(event: dict[str, Any], fixed: str) -> bool:
    """patchEvent's check of a track event's name (Go's len counts bytes)."""
    if fixed != "track":
        return True
    name = _string(event.get("event"))
    return 0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_EVENT_NAME


def _printed(event: dict[str, Any], field: str) -> str | None:
    """How deduplicateBatch compares a field (fmt.Sprint of it: an object prints as its JSON,
    in key order), as a form two events share whenever Jitsu may print them alike: numbers as
    floats, lone surrogates as U+FFFD (Go decodes them so). "" when absent; None for anything
    but an object, whose printed form may equal another's."""
    if field not in event:
        return ""
    value = event[field]
    if not isinstance(value, dict):
        return None
    return json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":"))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {replace_surrogates(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return replace_surrogates(value)
    if isinstance(value, bool) or value is None:
        return value
    try:
        return float(value)
    except OverflowError:
        return "<huge number>"


def _alike(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b


class Batch(Generic[T]):
    """Members gathered for one request, at most `max_bytes` of body and MAX_EVENTS events."""

    def __init__(self, max_bytes: int, max_events: int = MAX_EVENTS) -> None:
        self.max_bytes = max_bytes
        self.max_events = max_events
        self.items: list[tuple[T, Member]] = []
        self.size = _FRAME
        self._ids: set[str] = set()
        self._twins: dict[tuple[str, str, str, str], list[Member]] = {}

    def full(self, m: Member) -> bool:
        """No room for `m`, nor for anything larger."""
        extra = len(m.event) + (1 if self.items else 0)
        return len(self.items) >= self.max_events or self.size + extra > self.max_bytes

    def apart(self, m: Member) -> bool:
        """`m` must not be in this batch: Jitsu's answer would name it like another member, or
        deduplicateBatch might drop it as another member's twin (sent alone, both are kept)."""
        if m.jitsu_id in self._ids:
            return True
        twins = self._twins.get(m.twin) if m.twin is not None else None
        return bool(twins) and any(
            _alike(t.properties, m.properties) and _alike(t.traits, m.traits) for t in twins or ()
        )

    def add(self, item: T, m: Member) -> None:
        self.size += len(m.event) + (1 if self.items else 0)
        self.items.append((item, m))
        self._ids.add(m.jitsu_id)
        if m.twin is not None:
            self._twins.setdefault(m.twin, []).append(m)


@dataclasses.dataclass(frozen=True)
class Unit(Generic[T]):
    """What goes upstream in one request: one row as stored, or a batch of several."""

    items: Sequence[tuple[T, Member | None]]

    @property
    def batch(self) -> bool:
        return len(self.items) > 1

    @property
    def members(self) -> list[Member]:
        return [m for _, m in self.items if m is not None]

    def body(self) -> bytes:
        """The batch request's body: the members' events, nothing else (no context, no
        eventsName, no writeKey: the key rides in X-Write-Key, which Jitsu reads first)."""
        return b'{"batch":[' + b",".join(m.event for m in self.members) + b"]}"


class ReadAhead(Generic[T]):
    """Rows read from the buffer and not yet sent, oldest first, with their members indexed by
    kind, so that a batch is gathered without a pass over every row read."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[T, Member | None]] = {}
        self._kinds: dict[Hashable, dict[int, tuple[T, Member]]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, seq: int) -> bool:
        return seq in self._items

    def __iter__(self) -> Iterator[T]:
        return (item for item, _ in self._items.values())

    def add(self, seq: int, item: T, m: Member | None) -> None:
        self._items[seq] = (item, m)
        if m is not None:
            self._kinds.setdefault(m.kind, {})[seq] = (item, m)

    def pop(self, seq: int) -> T | None:
        entry = self._items.pop(seq, None)
        if entry is None:
            return None
        item, m = entry
        if m is not None:
            same = self._kinds[m.kind]
            del same[seq]
            if not same:
                del self._kinds[m.kind]
        return item

    def clear(self) -> None:
        self._items.clear()
        self._kinds.clear()

    def take(
        self,
        units: int,
        max_bytes: int,
        seq_of: Callable[[T], int],
        together: Callable[[T], bool],
    ) -> list[Unit[T]]:
        """Up to `units` requests' worth, each starting at the oldest row left: that row alone,
        or with the later rows of its kind that fit. `together(item)`: whether the row may be
        sent in a batch now (the forwarder's say)."""
        out: list[Unit[T]] = []
        while len(out) < units and self._items:
            seq, (first, m) = next(iter(self._items.items()))
            if m is None or not together(first):
                self.pop(seq)
                out.append(Unit([(first, m)]))
                continue
            batch: Batch[T] = Batch(max_bytes)
            passed_over = 0
            for item, other in self._kinds[m.kind].values():
                if batch.items and batch.full(other):
                    break
                if (item is not first and not together(item)) or batch.apart(other):
                    passed_over += 1
                    if passed_over > MAX_PASSED_OVER:
                        break
                    continue
                batch.add(item, other)
            for item, _ in batch.items:
                self.pop(seq_of(item))
            out.append(Unit(batch.items))
        return out


# ---- Jitsu's answer to a coalesced batch ---------------------------------------------------


class Fate(StrEnum):
    TAKEN = "taken"  # Jitsu took it (or has nowhere to send it, as it would have alone)
    REFUSED = "refused"  # Jitsu's verdict on the event: dead-letter it, as alone
    RETRY = "retry"  # Jitsu's own trouble with the event (a masked producer error): again
    ALONE = "alone"  # the batch cannot show what a request of its own would: send it alone


@dataclasses.dataclass(frozen=True)
class Settled:
    fate: Fate
    message: str = ""  # Jitsu's words about the event


def read_answer(members: Sequence[Member], answer: Mapping[str, object]) -> list[Settled]:
    """Each member's fate from Jitsu's 2xx batch answer ("Message ID: <id>: <error>" for each
    event it did not take: router_batch_handler.go). Members have distinct ids, so each error
    names one; an answer that does not read so (a count or an id that is not this batch's, an
    error in another form) sends every member again alone, where its answer is its own."""
    taken = Settled(Fate.TAKEN)
    fates = [taken] * len(members)
    errors = answer.get("errors")
    alone = [Settled(Fate.ALONE, "upstream's answer does not describe the batch")] * len(members)
    if errors is not None and not isinstance(errors, list):
        return alone  # Jitsu lists its errors or leaves the key out
    if not errors:
        return fates
    received = answer.get("receivedEvents")
    index = {m.jitsu_id: i for i, m in enumerate(members)}
    if isinstance(received, int) and not isinstance(received, bool) and received != len(members):
        return alone
    for error in errors:
        match = BATCH_ERROR.fullmatch(error) if isinstance(error, str) else None
        i = index.get(match[1]) if match is not None else None
        if match is None or i is None or fates[i] is not taken:
            return alone
        fates[i] = _fate(members[i], match[2])
    return fates


def _fate(m: Member, message: str) -> Settled:
    if message.startswith(NO_DESTINATIONS):
        # Alone on the browser route with a browser key, Jitsu still serves the stream's device
        # destinations (router_ingest_handler.go:121): only the s2s route's answer is the same.
        return Settled(Fate.TAKEN if m.s2s else Fate.ALONE, message)
    if message.startswith(MESSAGE_SIZE):
        return Settled(Fate.ALONE, message)  # it may fit alone, with its own Content-Length
    if message.startswith((EVENT_ERROR, THROTTLED)):
        return Settled(Fate.REFUSED, message)
    return Settled(Fate.RETRY, message)


def refusal(m: Member, message: str) -> tuple[int, str]:
    """The status and reason a dead letter would have had, sent alone: the billing throttle
    answers 402 on either route, an event error 400 on the s2s route and 200 with the error on
    the browser route (with a browser key: router_ingest_handler.go, s2sEndpoint)."""
    if message.startswith(THROTTLED):
        return 402, f"upstream answered 402: {message}"
    if m.s2s:
        return 400, f"upstream answered 400: {message}"
    return 200, f"upstream refused: {message}"
