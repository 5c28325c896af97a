"""The log line: what structlog's JSONRenderer writes, written faster (issue 9)."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from proxy.auth import KeySource
from proxy.logs import render_json


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
