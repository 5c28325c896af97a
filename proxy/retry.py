"""What to do with an upstream answer (deliver, retry, dead-letter) and how long to wait.

Classification follows Vector's default strategy (reliability notes §3.1): transport errors,
timeouts, 408, 425, 429 and 5xx except 501 are retried; every other non-2xx is permanent.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import json
import random
import time
from enum import StrEnum

RETRYABLE_STATUSES = frozenset({408, 425, 429})


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


def classify_status(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in RETRYABLE_STATUSES or (500 <= status < 600 and status != 501):
        return Outcome.RETRY
    return Outcome.REJECTED


def rejection_in_body(status: int, body: bytes) -> str | None:
    """Jitsu's browser routes answer 200 with `{"error": ...}` when they refuse an event
    (research notes §2.4, §3.8). That is a rejection, not a delivery."""
    if not 200 <= status < 300 or not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(payload, dict) and payload.get("error") and payload.get("ok") is not True:
        return str(payload["error"])
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if invalid."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # Saturate absurd values instead of converting thousands of digits.
        return float(int(text[:12]))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # asctime dates carry no zone; HTTP dates are always UTC (RFC 9110 §5.6.7).
        when = when.replace(tzinfo=datetime.UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


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
