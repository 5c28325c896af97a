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
        # Its id again: events alike but for their messageId are twins Jitsu's in-batch
        # dedup would merge, and the proxy never sends twins in one batch (upstream.coalesce).
        "properties": {"plan": "pro", "value": 42, "currency": "EUR", "order": message_id},
        "context": {
            "library": {"name": "jitsu-bench", "version": "0.1.0"},
            "page": {"url": "https://example.com/pricing", "path": "/pricing", "title": "Pricing"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) bench",
            "locale": "en-US",
        },
    }


EVENT_HEAD, _middle, _end = json.dumps(event(_MARK), separators=(",", ":")).split(_MARK)
# Everything after the messageId, the id's second place marked (post.lua fills it too).
EVENT_TAIL = _middle + _MARK + _end


class Bodies:
    """Request bodies for one run: one bare event each, or a /v1/batch body of `per_request`."""

    def __init__(self, run_id: int, per_request: int, thread: int = PYTHON_THREAD) -> None:
        self.head = EVENT_HEAD.encode()
        self.prefix = f"b{run_id}-".encode()
        self.middle, self.tail = (part.encode() for part in EVENT_TAIL.split(_MARK))
        self.per_request = per_request
        self.thread = thread
        self.counter = 0

    def _event(self) -> bytes:
        self.counter += 1
        mid = b"%s%d" % (self.prefix, self.counter * SEQ_STRIDE + self.thread)
        return b"%s%s%s%s%s" % (self.head, mid, self.middle, mid, self.tail)

    def __call__(self) -> bytes:
        if not self.per_request:
            return self._event()
        events = b",".join(self._event() for _ in range(self.per_request))
        return b'{"batch":[%s]}' % events
