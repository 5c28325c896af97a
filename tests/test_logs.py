"""The log line: what structlog's JSONRenderer and TimeStamper write, written faster (issue 9)."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.auth import KeySource
from proxy.logs import add_timestamp, iso_timestamp, render_json


class Shown:
    def __structlog__(self) -> str:
        return "shown my way"


@dataclasses.dataclass
class Point:
    x: int


VALUES: list[Any] = [
    "plain",
    "héllo ✓ \u2028 \x00 \x7f",
    "lone \ud800 surrogate",  # orjson refuses it: json writes it, escaped, as before
    10**30,  # past 64 bits: the same
    {"nested": [1, 2.5, None, True], "n": -(2**63)},
    {1: "int key"},
    0.1,
    1e-7,
    Path("/buffer/db"),
    Shown(),
    Point(1),
    datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    KeySource.HEADER,
    ValueError("boom"),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_a_line_says_what_structlogs_json_renderer_says(value: Any) -> None:
    event = {"event": "request", "value": value, "key_id": "k"}
    ours = render_json(None, "info", dict(event))
    theirs = structlog.processors.JSONRenderer()(None, "info", dict(event))
    assert json.loads(ours) == json.loads(theirs)
    assert list(json.loads(ours)) == ["event", "value", "key_id"]


def datetime_iso(nanos: int) -> str:
    """TimeStamper(fmt="iso", utc=True)'s text for a moment."""
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    moment += datetime.timedelta(microseconds=nanos // 1000)
    return moment.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    "nanos", [0, 1_717_200_000_000_000_000, 1_717_200_000_000_999_999, 1_717_200_059_999_999_999]
)
def test_the_timestamp_is_written_as_structlogs_time_stamper_writes_it(nanos: int) -> None:
    assert iso_timestamp(nanos) == datetime_iso(nanos)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(nanos=st.integers(min_value=0, max_value=4_000_000_000 * 10**9))
def test_the_timestamp_is_datetimes_for_any_moment(nanos: int) -> None:
    assert iso_timestamp(nanos) == datetime_iso(nanos)


def test_a_line_is_stamped_now() -> None:
    before = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})
    ours = add_timestamp(None, "info", {})
    after = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})
    moments = [datetime.datetime.fromisoformat(d["timestamp"]) for d in (before, ours, after)]
    assert moments == sorted(moments)
