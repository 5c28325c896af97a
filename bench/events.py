"""The event the bench sends (the seed's track event, about 450 bytes), and request bodies made
from it: each event with a messageId of its own, b<run>-<seq>, which the null upstream counts.
wrk builds the same bodies in bench/post.lua from EVENT_HEAD and EVENT_TAIL."""

from __future__ import annotations

import json
import time
from typing import Any

WRITE_KEY = "bench:secret"
_MARK = "@MESSAGE_ID@"
# post.lua numbers wrk's threads 0-15 in the low four bits of seq; the Python generator is 15.
SEQ_STRIDE = 16
PYTHON_THREAD = 15


def event(message_id: str) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Bench Event",
        "messageId": message_id,
        "anonymousId": "anon-4711",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "properties": {"plan": "pro", "value": 42, "currency": "EUR"},
        "context": {
            "library": {"name": "jitsu-bench", "version": "0.1.0"},
            "page": {"url": "https://example.com/pricing", "path": "/pricing", "title": "Pricing"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) bench",
            "locale": "en-US",
        },
    }


EVENT_HEAD, EVENT_TAIL = json.dumps(event(_MARK), separators=(",", ":")).split(_MARK)


class Bodies:
    """Request bodies for one run: one bare event each, or a /v1/batch body of `per_request`."""

    def __init__(self, run_id: int, per_request: int, thread: int = PYTHON_THREAD) -> None:
        self.head = f"{EVENT_HEAD}b{run_id}-".encode()
        self.tail = EVENT_TAIL.encode()
        self.per_request = per_request
        self.thread = thread
        self.counter = 0

    def _event(self) -> bytes:
        self.counter += 1
        return b"%s%d%s" % (self.head, self.counter * SEQ_STRIDE + self.thread, self.tail)

    def __call__(self) -> bytes:
        if not self.per_request:
            return self._event()
        events = b",".join(self._event() for _ in range(self.per_request))
        return b'{"batch":[%s]}' % events
