"""The proxy's one exception hierarchy; foreign errors are translated into it at their boundary.

ProxyError
├── ConfigError             bad config file or environment override (exit 1)
├── BufferError_            durable buffer problems
│   ├── BufferLockedError   another process holds the buffer directory
│   ├── BufferFullError     configured bound or the disk is full (503 + Retry-After)
│   └── BufferClosedError   the buffer is closing or closed (503)
├── IngestError             a client request Jitsu would refuse (status + public message)
├── RateLimitedError        a client over its request rate (429 + Retry-After)
├── OverloadedError         a request the proxy cannot handle right now (503 + Retry-After)
├── UsageError              a bad argument to an offline command (exit 2 from dead-letters)
├── DeadLetterError         `dead-letters show` found no such dead letter (exit 1)
└── SalvageError            the file given to `salvage` is not a readable buffer (exit 1)
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError):
    """The configuration is invalid; the message names the offending key."""


class BufferError_(ProxyError):
    """The durable buffer cannot do what was asked."""


class BufferLockedError(BufferError_):
    """Another process holds the lock on the buffer directory."""


class BufferFullError(BufferError_):
    """The buffer reached `buffer.max_bytes` or the disk is full."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BufferClosedError(BufferError_):
    """The buffer is shutting down or closed."""


class IngestError(ProxyError):
    """A request the proxy refuses, answered the way Jitsu's ingest would.

    `status` is the HTTP status for server-to-server and batch routes; browser routes answer 200
    with the same body when `browser_ok` is true, as Jitsu does.
    """

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        browser_ok: bool = True,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.browser_ok = browser_ok
        # The label of proxy_events_refused_total, when the status alone does not tell it.
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in the parser's worker process too: keep status and browser_ok across pickling.
        return (_ingest_error, (self.message, self.status, self.browser_ok, self.reason))


def _ingest_error(
    message: str, status: int, browser_ok: bool, reason: str | None = None
) -> IngestError:
    return IngestError(message, status, browser_ok=browser_ok, reason=reason)


class RateLimitedError(ProxyError):
    """A client IP or write key is over its configured request rate."""

    def __init__(self, what: str, retry_after_s: float) -> None:
        super().__init__(f"rate limit exceeded for this {what}")
        self.retry_after_s = retry_after_s


class OverloadedError(ProxyError):
    """The proxy cannot take this request now (its parser worker died); try again later."""


class UsageError(ProxyError):
    """An offline command (`dead-letters`, `salvage`) got an argument it cannot use. The message
    names the flag, never a secret it may hold."""


class DeadLetterError(ProxyError):
    """The dead letter asked for is in no shard of the buffer."""


class SalvageError(ProxyError):
    """The source given to `salvage` is missing, a directory, or not a readable buffer file."""


# Every reason proxy_events_refused_total counts (its series exist from the start, at 0).
REFUSAL_REASONS = (
    "invalid_event",
    "too_large",
    "body_timeout",
    "no_key",
    "unknown_key",
    "key_refused_upstream",
    "rate_limited",
    "overloaded",
    "buffer_full",
    "shutting_down",
    "buffer_error",
)
# proxy_events_refused_total's reasons by the status of an IngestError that names none.
_REFUSED_BY_STATUS = {
    401: "unknown_key",
    408: "body_timeout",
    413: "too_large",
    414: "too_large",
    431: "too_large",
}


def refusal_reason(exc: BaseException) -> str | None:
    """Why an event request was refused, as a small fixed set of words (a metric label);
    None for what is not a refusal of the request (a bug: 500)."""
    if isinstance(exc, IngestError):
        return exc.reason or _REFUSED_BY_STATUS.get(exc.status, "invalid_event")
    if isinstance(exc, RateLimitedError):
        return "rate_limited"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, BufferFullError):
        return "buffer_full"
    if isinstance(exc, BufferClosedError):
        return "shutting_down"
    if isinstance(exc, BufferError_):
        return "buffer_error"
    return None
