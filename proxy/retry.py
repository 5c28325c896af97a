"""What to do with an upstream answer (deliver, retry, dead-letter) and how long to wait.

Classification follows Vector's default strategy (reliability notes §3.1): transport errors,
timeouts, 408, 425, 429 and 5xx except 501 are retried. Beyond that, only Jitsu's own verdict on
an event dead-letters it (issue 7): a redirect, a 404 from an ingress, an HTML error page are
trouble between us and Jitsu, retried like an outage. A row that fails alone, while others go
through, is told apart from an outage by `RowFailures`.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import json
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum

RETRYABLE_STATUSES = frozenset({408, 425, 429})
# Every status retried, inside a request (aiohttp-retry) and from the buffer.
RETRY_STATUSES = frozenset(RETRYABLE_STATUSES | set(range(500, 600)) - {501})
# Jitsu's ingest routes exist: a 404 or 405 there comes from something in between.
NOT_JITSU_STATUSES = frozenset({404, 405})


# Jitsu's public errors (ingest/router.go): "no destinations" is what Jitsu does with an event
# of a stream that has none, a success for the sender; "quota exceeded" is its billing
# throttle (ErrThrottledType), "event error" its verdict on the event itself.
NO_DESTINATIONS = "no destinations found for stream"
THROTTLED = "quota exceeded"
EVENT_ERROR = "event error"


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


def classify_status(status: int) -> Outcome:
    """By the status alone; a REJECTED still needs Jitsu's body to be a verdict
    (classify_answer). A redirect is never followed (it would hand the key to another host,
    and turn a POST into a body-less GET): it means upstream.url is wrong, so retry."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in RETRY_STATUSES or 300 <= status < 400:
        return Outcome.RETRY
    return Outcome.REJECTED


def classify_answer(
    method: str,
    status: int,
    body: bytes,
    jitsu_error: str | None = None,
    *,
    whole: bool = True,
    to_destination: bool = False,
) -> tuple[Outcome, str]:
    """The outcome of an upstream answer, with its reason (for the log and the dead letter).
    `whole` is false when only the start of a (very large) body was read; `to_destination`
    says that a redirect points where the pixel's event asks Jitsu to send the visitor."""
    if method == "GET" and status == 302 and to_destination:
        # Jitsu's pixel redirects to destination_url once it took the event
        # (router_pixel_handler.go): delivered, not a wrong upstream.url.
        return Outcome.DELIVERED, "ok"
    outcome = classify_status(status)
    if outcome is Outcome.RETRY:
        if 300 <= status < 400:
            return outcome, f"upstream answered {status} (a redirect): is upstream.url right?"
        return outcome, f"upstream answered {status}"
    if method == "GET":
        # The pixel: 200 with a GIF, its refusal in a header (research notes §2.4).
        if outcome is Outcome.DELIVERED:
            if jitsu_error and not jitsu_error.startswith(NO_DESTINATIONS):
                return Outcome.REJECTED, f"upstream refused: {jitsu_error}"
            return outcome, "ok"
        return Outcome.RETRY, f"upstream answered {status}, not Jitsu's pixel answer"
    if outcome is Outcome.DELIVERED and not whole and body.lstrip().startswith(b"{"):
        # Too large to read whole: Jitsu's refusals are small; its device destinations are not.
        return outcome, "ok"
    payload = jitsu_json(body)
    if outcome is Outcome.DELIVERED:
        if payload is None:
            # Jitsu always answers JSON; a 200 HTML page is a wrong URL or a portal.
            return Outcome.RETRY, f"upstream answered {status} without Jitsu's JSON answer"
        refused = rejection_in_body(status, body)
        if refused is not None:
            return Outcome.REJECTED, f"upstream refused: {refused}"
        return outcome, "ok"
    error = payload.get("error") if payload is not None else None
    if status == 413:
        # Whoever said it (Jitsu has no size check of its own that answers 413; an ingress in
        # front of it does), the same bytes will be refused again: a batch is split
        # (Forwarder._settle), a single event is dead-lettered.
        said = f": {error}" if isinstance(error, str) and error else ""
        return Outcome.REJECTED, f"upstream answered 413: request too large for upstream{said}"
    if status in NOT_JITSU_STATUSES or not isinstance(error, str) or not error:
        return Outcome.RETRY, f"upstream answered {status}, not Jitsu's verdict on the event"
    return Outcome.REJECTED, f"upstream answered {status}: {error}"


def jitsu_json(body: bytes) -> dict[str, object] | None:
    """The JSON object Jitsu answered with. gin writes one more body for each c.JSON call, and
    Jitsu's classic handler makes two when it refuses an event: the refusal, then
    {"ok":true} (ingest/router_classic_handler.go). The first is the answer, as its status is."""
    try:
        text = body.decode("utf-8")
        values = []
        pos = _skip_space(text, 0)
        while pos < len(text):
            value, pos = _DECODER.raw_decode(text, pos)
            values.append(value)
            pos = _skip_space(text, pos)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    payload = values[0] if values else None
    return payload if isinstance(payload, dict) else None


_DECODER = json.JSONDecoder()


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


@dataclasses.dataclass
class _Mark:
    delivered: int
    failed: int
    outage_failed: int
    lone: int = 0  # failures while others went through
    strikes: int = 0  # of those, failures while upstream was clearly healthy for others
    tries: int = 0  # failures handled alone: the exponent of the row's own backoff


@dataclasses.dataclass(frozen=True)
class RowVerdict:
    # Handle this row on its own (park it), not as an outage: others went through since it
    # was last sent or failed, or they did at an earlier failure of it and no other row has
    # failed like an outage since (with no traffic to compare, it stays a suspect).
    lone: bool
    failures: int  # failures handled alone so far: the exponent of the row's own backoff
    dead: bool  # it has failed alone often enough: dead-letter it


class RowFailures:
    """Tells a row that keeps failing while others go through (a poison event, upstream's
    problem with that one request) from an outage, where every row fails (issue 7, finding 3).

    A failure is *lone* when some other row was delivered since this row was sent or last
    failed: the row is then taken off the head of the queue with a backoff of its own, and
    the forwarder does not go into outage mode. It is a *strike* when, in that time, at least
    four in five attempts of other rows went through (a flapping upstream does not count).
    `max_strikes` strikes dead-letter the row. In an outage nothing is delivered, so nothing
    strikes, and nothing is dead-lettered. Only failures that are not lone count as signs of
    an outage: two poison rows failing in turn, with no other traffic, are two suspects on
    their own backoffs, not an outage."""

    def __init__(
        self, max_strikes: int, recent_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_strikes = max_strikes
        self.recent_s = recent_s
        self._clock = clock
        self.last_ok = -math.inf
        self.delivered = 0
        self.failed = 0
        self.outage_failed = 0
        self._rows: dict[int, _Mark] = {}

    def _mark(self) -> _Mark:
        return _Mark(self.delivered, self.failed, self.outage_failed)

    def sent(self, seq: int) -> None:
        if seq not in self._rows:
            self._rows[seq] = self._mark()

    def ok(self, seq: int) -> None:
        self.delivered += 1
        self.last_ok = self._clock()
        self._rows.pop(seq, None)

    def forget(self, seq: int) -> None:
        self._rows.pop(seq, None)

    def failure(self, seq: int, about_the_row: bool = False) -> RowVerdict:
        """`about_the_row`: the answer was about this request (a 4xx from something in front
        of Jitsu), not a sign of an outage (transport errors, timeouts, 429, 5xx). Such a
        failure is lone also when another row was delivered within `recent_s`: rows a
        client made that no ingress passes on, all failing at once, once put the forwarder
        into outage mode and stalled everyone (second attack pass)."""
        mark = self._rows.setdefault(seq, self._mark())
        ok_since = self.delivered - mark.delivered
        others_failed = self.failed - mark.failed
        outage_since = self.outage_failed - mark.outage_failed
        suspect = mark.lone > 0
        if ok_since > 0:
            mark.lone += 1
            if others_failed * 4 <= ok_since:
                mark.strikes += 1
        recent = about_the_row and self._clock() - self.last_ok <= self.recent_s
        lone = ok_since > 0 or recent or (suspect and outage_since == 0)
        self.failed += 1
        if lone:
            mark.tries += 1
        else:
            self.outage_failed += 1
        mark.delivered, mark.failed = self.delivered, self.failed
        mark.outage_failed = self.outage_failed
        return RowVerdict(lone, mark.tries, mark.strikes >= self.max_strikes)

    def __len__(self) -> int:
        return len(self._rows)


def rejection_in_body(status: int, body: bytes) -> str | None:
    """Jitsu's browser routes answer 200 with `{"error": ...}` when they refuse an event
    (research notes §2.4, §3.8). That is a rejection, not a delivery."""
    if not 200 <= status < 300 or not body:
        return None
    payload = jitsu_json(body)
    if payload is not None and payload.get("error") and payload.get("ok") is not True:
        error = str(payload["error"])
        # Jitsu answers so for a stream without destinations: it took the event (issue 8).
        return None if error.startswith(NO_DESTINATIONS) else error
    return None


# ---- a batch answer, event by event ---------------------------------------------------------

# Jitsu's batch answer names each event it did not take as "Message ID: <id>: <public error>"
# (ingest/router_batch_handler.go, BatchHandler), where <id> is the event's messageId with
# every character outside this set replaced by `_`, cut to 64 characters (router.go
# messageIdUnsupportedChars, jitsubase/utils.ShortenString), or a fresh uuid when the event
# has no string messageId.
_UNSUPPORTED_ID_CHARS = re.compile(r"[^a-zA-Z0-9._-]")
BATCH_ERROR = re.compile(r"Message ID: ([a-zA-Z0-9._-]+): (.*)", re.DOTALL)
MAX_MESSAGE_ID_CHARS = 64


def jitsu_message_id(value: object) -> str | None:
    """The id Jitsu's batch answer gives an event with this `messageId`; None when Jitsu makes
    up one of its own (no messageId, an empty one, or one that is not a string)."""
    if not isinstance(value, str) or not value:
        return None
    # Python's str and Go's runes agree here: one code point, one `_`.
    return _UNSUPPORTED_ID_CHARS.sub("_", value)[:MAX_MESSAGE_ID_CHARS]


class EventFate(StrEnum):
    ACCEPTED = "accepted"
    RETRY = "retry"
    REFUSED = "refused"


def classify_event_error(message: str) -> EventFate:
    """What one event's error in a batch answer means (ingest/router.go, sendToRotor and the
    batch handler): no destinations is a success, Jitsu's verdict on the event or its quota
    throttle is a refusal. Masked errors ("error# <id>: producer error") are Jitsu's own
    failures, and an error this proxy does not know is treated alike: retried, which
    RowFailures bounds, rather than dead-lettered."""
    if message.startswith(NO_DESTINATIONS):
        return EventFate.ACCEPTED
    if message.startswith((EVENT_ERROR, THROTTLED)):
        return EventFate.REFUSED
    return EventFate.RETRY


@dataclasses.dataclass(frozen=True)
class EventVerdict:
    fate: EventFate
    reason: str = ""  # Jitsu's message about the event, or why its fate is not known


ACCEPTED = EventVerdict(EventFate.ACCEPTED)


def read_batch_answer(
    message_ids: Sequence[object], answer: Mapping[str, object]
) -> tuple[EventVerdict, ...]:
    """Jitsu's verdict on each event of a batch (their `messageId`s, in order) from its 2xx
    answer. An event its `errors` do not name was taken (or dropped as an in-batch duplicate:
    `deduplicatedEvents`, taken too). Where the answer cannot be pinned on events (an error
    naming no event of the batch, one that is not in Jitsu's format, a count that does not
    match), the events it may be about are sent again: never lost, and never dead-lettered
    while Jitsu may have taken them."""
    count = len(message_ids)
    errors = answer.get("errors")
    if errors is not None and not isinstance(errors, list):
        # Jitsu lists its errors, or leaves the key out: this is no answer of Jitsu's.
        unread = EventVerdict(EventFate.RETRY, "upstream's batch answer has errors not as a list")
        return (unread,) * count
    if not errors:
        return (ACCEPTED,) * count
    received = answer.get("receivedEvents")
    if isinstance(received, int) and not isinstance(received, bool) and received != count:
        unsure = EventVerdict(
            EventFate.RETRY, f"upstream counted {received} events in a batch of {count}"
        )
        return (unsure,) * count
    ids = [jitsu_message_id(m) for m in message_ids]
    events_of: dict[str, list[int]] = {}
    for index, jid in enumerate(ids):
        if jid is not None:
            events_of.setdefault(jid, []).append(index)
    named: dict[str, list[str]] = {}
    stray: list[str] = []  # errors that name no event this proxy can tell
    for error in errors:
        match = BATCH_ERROR.fullmatch(error) if isinstance(error, str) else None
        if match is None:
            stray.append(str(error))
        else:
            named.setdefault(match[1], []).append(match[2])
    verdicts: list[EventVerdict | None] = [None] * count
    for jid, messages in named.items():
        indices = events_of.get(jid, [])
        if all(classify_event_error(m) is EventFate.ACCEPTED for m in messages):
            continue  # whichever events they are about, taken
        if len(messages) == len(indices):
            # Jitsu answers in the batch's order: the n-th error with an id is its n-th event.
            for index, message in zip(indices, messages, strict=True):
                verdicts[index] = EventVerdict(classify_event_error(message), message)
            continue
        # Several events share the id (Jitsu may have dropped some as duplicates), or no
        # event has it: which event each error is about is not known.
        for index in indices:
            verdicts[index] = EventVerdict(
                EventFate.RETRY, f"not known which event with this id failed: {messages[0]}"
            )
        if len(messages) > len(indices):
            stray.extend(f"Message ID: {jid}: {m}" for m in messages)
    # Stray errors all in Jitsu's form name ids Jitsu made up for events without one.
    pinned = all(BATCH_ERROR.fullmatch(error) for error in stray)
    stray = [error for error in stray if not _harmless(error)]
    if stray:
        own_ids = [i for i, jid in enumerate(ids) if jid is None and verdicts[i] is None]
        if pinned and len(own_ids) >= len(stray):
            # Ids Jitsu made up: about events without a string messageId, not known which.
            suspects = own_ids
        else:
            suspects = [i for i in range(count) if verdicts[i] is None]
        unsure = EventVerdict(EventFate.RETRY, f"upstream's error names no event: {stray[0]}")
        for index in suspects:
            verdicts[index] = unsure
    return tuple(v or ACCEPTED for v in verdicts)


def _harmless(error: str) -> bool:
    match = BATCH_ERROR.fullmatch(error)
    return match is not None and classify_event_error(match[2]) is EventFate.ACCEPTED


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if invalid."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # Saturate absurd values instead of converting thousands of digits.
        digits = text.lstrip("0") or "0"
        return float(int(digits)) if len(digits) <= 12 else 1e12
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # asctime dates carry no zone; HTTP dates are always UTC (RFC 9110 §5.6.7).
        when = when.replace(tzinfo=datetime.UTC)
    now = time.time() if now is None else now
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter": the delay is drawn from [d/2, d]."""

    initial_s: float
    max_s: float
    multiplier: float = 2.0
    max_retry_after_s: float = 900.0

    def ceiling(self, failures: int) -> float:
        """d for the n-th consecutive failure (n >= 1)."""
        exponent = max(0, failures - 1)
        # Cap the exponent so a long outage never overflows the float.
        exponent = min(exponent, 64)
        return min(self.max_s, self.initial_s * self.multiplier**exponent)

    def delay(
        self, failures: int, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        d = self.ceiling(failures)
        draw = (rng or random).uniform(d / 2, d)
        if retry_after_s is not None:
            draw = max(draw, min(retry_after_s, self.max_retry_after_s))
        return draw
