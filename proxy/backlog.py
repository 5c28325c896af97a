"""Warnings about the backlog, once and not per event: a `warning` when the buffer passes its
high-water mark (buffer.warn_fill_ratio of max_bytes) or its oldest event an age
(buffer.warn_age_s), an `info` when it is back well below (issue 10, "Seeing it")."""

from __future__ import annotations

import dataclasses
from typing import Any

# Back below the mark by this much before the all-clear, so that a backlog hovering at the
# mark cannot make a line per event: a tenth of max_bytes, half the age.
FILL_MARGIN = 0.1
AGE_MARGIN = 0.5


@dataclasses.dataclass(frozen=True)
class Notice:
    """One log line to write: its level, event name and key/value pairs."""

    level: str
    event: str
    fields: dict[str, Any]


class BacklogWatch:
    """Remembers which marks are passed; `observe` says what changed, if anything."""

    def __init__(self, fill_ratio: float, age_s: float) -> None:
        self.fill_ratio = fill_ratio  # 0: no warning
        self.age_s = age_s  # 0: no warning
        self.full = False
        self.old = False

    def observe(self, used: int, max_bytes: int, oldest_age_s: float) -> list[Notice]:
        notices: list[Notice] = []
        fill = used / max_bytes if max_bytes > 0 else 0.0
        sizes = {"bytes": used, "max_bytes": max_bytes, "fill_ratio": round(fill, 3)}
        if self.fill_ratio > 0:
            if not self.full and fill >= self.fill_ratio:
                self.full = True
                notices.append(
                    Notice(
                        "warning",
                        "buffer_high_water",
                        {**sizes, "warn_fill_ratio": self.fill_ratio},
                    )
                )
            elif self.full and fill < self.fill_ratio - min(FILL_MARGIN, self.fill_ratio / 2):
                self.full = False
                notices.append(Notice("info", "buffer_high_water_cleared", sizes))
        if self.age_s > 0:
            age = {"oldest_event_age_s": round(oldest_age_s, 1)}
            if not self.old and oldest_age_s >= self.age_s:
                self.old = True
                notices.append(Notice("warning", "backlog_old", {**age, "warn_age_s": self.age_s}))
            elif self.old and oldest_age_s < self.age_s * AGE_MARGIN:
                self.old = False
                notices.append(Notice("info", "backlog_old_cleared", age))
        return notices
