"""The README's configuration reference is kept in step with the schema in proxy/config.py: a
key added to the code and not to the docs (or left in the docs after it went) fails here, and so
does a default the docs state wrongly."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config

README = Path(__file__).resolve().parent.parent / "README.md"
SIZES = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def schema() -> Iterator[tuple[str, Any]]:
    """Every leaf key of the config, dotted, with its default."""

    def walk(cls: type, prefix: str) -> Iterator[tuple[str, Any]]:
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                default = field.default
            else:
                default = field.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                yield from walk(type(default), f"{prefix}{field.name}.")
            else:
                yield f"{prefix}{field.name}", default

    yield from walk(Config, "")


def documented() -> dict[str, str]:
    """The rows of the README's configuration table: key -> default cell."""
    text = README.read_text()
    table = text[text.index("| key | default | meaning |") :]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        key_cell, default_cell, _meaning = (c.strip() for c in line.strip("|").split("|", 2))
        key = key_cell.strip("`")
        assert key_cell == f"`{key}`", f"one key per row, in backticks: {key_cell!r}"
        assert key not in rows, f"{key} documented twice"
        rows[key] = default_cell
    return rows


def stated(cell: str, like: Any) -> Any:
    """The value a default cell states: its first code span (`1 MiB`, `a, b`, `true`), or
    "empty" for an empty string, list or mapping; any words after it are commentary."""
    if cell.startswith("empty"):
        return type(like)()
    match = re.match(r"`([^`]*)`", cell)
    assert match, f"a default starts with `value` or 'empty': {cell!r}"
    value = match.group(1)
    if isinstance(like, bool):
        return {"true": True, "false": False}[value]
    if isinstance(like, list):
        return value.split(", ")
    if isinstance(like, int | float):
        number, _, unit = value.partition(" ")
        return float(number) * SIZES[unit] if unit else float(number)
    return value


def test_every_config_key_is_documented_with_its_default() -> None:
    keys = dict(schema())
    rows = documented()
    assert sorted(set(keys) - set(rows)) == [], "keys missing from the README's table"
    assert sorted(set(rows) - set(keys)) == [], "README documents keys the schema lacks"
    for key, default in keys.items():
        assert stated(rows[key], default) == default, f"README states a wrong default for {key}"


@pytest.mark.parametrize(
    ("cell", "like", "value"),
    [
        ("`1 GiB`", 0, 1 << 30),
        ("`0` (off)", 0.0, 0),
        ("empty (anyone)", [], []),
        ("`a, b`", [], ["a", "b"]),
        ("`false`", True, False),
    ],
)
def test_default_cells_are_read_as_written(cell: str, like: Any, value: Any) -> None:
    assert stated(cell, like) == value


async def test_every_exported_metric_is_in_the_metrics_reference(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    """The README's metrics table against a scrape of a real app: one row per metric family it
    exports, and no row for one it does not."""
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.app import create_app
    from proxy.config import build_config

    config = build_config({"buffer": {"path": str(tmp_path)}, "server": {"workers": 1}}, {})
    client = await aiohttp_client(create_app(config))
    scrape = await (await client.get("/metrics")).text()
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(scrape)
    }
    text = README.read_text()
    table = text[text.index("| metric | type | labels | what it says |") :]
    rows = set()
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.add(line.split("|")[1].strip().strip("`"))
    assert sorted(exported - rows) == [], "exported, not in the README's metrics reference"
    assert sorted(rows - exported) == [], "in the README's metrics reference, not exported"
