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

    def __init__(self, message: str, status: int = 400, *, browser_ok: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.browser_ok = browser_ok

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in the parser's worker process too: keep status and browser_ok across pickling.
        return (_ingest_error, (self.message, self.status, self.browser_ok))


def _ingest_error(message: str, status: int, browser_ok: bool) -> IngestError:
    return IngestError(message, status, browser_ok=browser_ok)


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
