"""What `make bench` prints and writes: the runs it measured, and issue 9's targets as ratios
against baselines measured in the same run. Pure functions: no I/O but `write_json`."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Run:
    """One server under one load: what it answered, and for relays and the proxy, what the null
    upstream got of it."""

    name: str
    server: str  # raw, raw xN, relay, nginx, proxy
    route: str
    setup: str  # workers, coalescing, fsync, upstream up or down
    tool: str  # wrk, python (closed loop), paced (python, fixed rate)
    requests: int  # answered 2xx
    events: int  # accepted: answered 2xx, or what the proxy counted into its buffer
    seconds: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    failed: int = 0  # transport errors and non-2xx answers
    delivered: int | None = None  # distinct messageIds of this run the null upstream got
    duplicates: int = 0
    drain_s: float | None = None  # after the load, until upstream had every accepted event
    rss_mb: float | None = None  # peak, all the server's processes together
    processes: int | None = None
    rate: float | None = None  # paced runs: the rate asked for, requests/s
    behind: int | None = None  # paced runs: the most requests waiting for a connection at once
    p99_each: list[float] | None = None  # paced runs: the p99 of each repetition (median kept)

    @property
    def held_rate(self) -> bool:
        """A paced run kept up if never more than a tenth of a second's requests waited."""
        return self.rate is None or (self.behind or 0) <= max(8, self.rate / 10)

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def all_delivered(self) -> bool:
        return self.delivered is None or self.delivered >= self.events

    @property
    def sustained(self) -> float:
        """Events per second that went all the way through: accepted events over the load's
        time plus the drain after it. What a server can keep up with, not just take in. (A
        drain run's seconds are the drain itself.)"""
        if self.delivered is None or self.tool == "drain":
            return self.events_per_s
        seconds = self.seconds + (self.drain_s or 0.0)
        return min(self.events, self.delivered) / seconds if seconds else 0.0


@dataclasses.dataclass(frozen=True)
class Target:
    op: str  # ">=" or "<="
    value: float

    def met(self, figure: float) -> bool:
        return figure >= self.value if self.op == ">=" else figure <= self.value

    def __str__(self) -> str:
        return f"{self.op} {_num(self.value)}"


@dataclasses.dataclass
class TargetRow:
    """One row of issue 9's targets table. With a baseline the ratio is judged, without one
    (peak RSS) the figure itself."""

    figure: str
    value: float | None
    unit: str
    target: Target
    baseline: str = ""
    baseline_value: float | None = None
    baseline_unit: str = ""
    note: str = ""
    void: str = ""  # why the figure does not stand (events lost, a run that failed)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @property
    def verdict(self) -> str:
        judged = self.ratio if self.baseline else self.value
        if self.void:
            return f"void: {self.void}"
        if judged is None or math.isnan(judged):
            return "not measured"
        return "met" if self.target.met(judged) else "not met"


def _num(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    if value >= 100:
        text = f"{value:,.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A Markdown table whose columns also line up in a terminal."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_targets(rows: Sequence[TargetRow]) -> str:
    header = ("figure", "measured", "baseline", "ratio", "target", "verdict")
    cells = []
    for row in rows:
        baseline = (
            f"{row.baseline} {_num(row.baseline_value, row.baseline_unit)}" if row.baseline else "-"
        )
        figure = f"{row.figure} ({row.note})" if row.note else row.figure
        cells.append(
            (
                figure,
                _num(row.value, row.unit),
                baseline,
                "-" if row.ratio is None else f"{row.ratio:.2f}",
                str(row.target),
                row.verdict,
            )
        )
    return _markdown(header, cells, {1, 3})


def format_runs(runs: Sequence[Run]) -> str:
    header = (
        "run",
        "route",
        "setup",
        "tool",
        "req/s",
        "events/s",
        "p50 ms",
        "p99 ms",
        "failed",
        "delivered",
        "drain s",
        "sustained ev/s",
        "RSS MB",
        "procs",
    )
    cells = []
    for r in runs:
        delivered = "-" if r.delivered is None else f"{r.delivered}/{r.events}"
        cells.append(
            (
                r.name,
                r.route,
                r.setup,
                r.tool if r.rate is None else f"{r.tool} @{r.rate:.0f}/s" + _each(r.p99_each),
                _num(r.req_per_s),
                _num(r.events_per_s),
                _num(r.p50_ms),
                _num(r.p99_ms),
                str(r.failed),
                delivered,
                _num(r.drain_s),
                _num(r.sustained) if r.delivered is not None else "-",
                _num(r.rss_mb),
                "-" if r.processes is None else str(r.processes),
            )
        )
    return _markdown(header, cells, set(range(4, 14)))


def _each(p99s: list[float] | None) -> str:
    return f", median of {len(p99s)}" if p99s and len(p99s) > 1 else ""


def format_machine(machine: dict[str, Any]) -> str:
    return "machine: " + "; ".join(f"{k} {v}" for k, v in machine.items())


def to_json(
    machine: dict[str, Any], runs: Sequence[Run], rows: Sequence[TargetRow]
) -> dict[str, Any]:
    return {
        "machine": machine,
        "targets": [
            {
                **dataclasses.asdict(row),
                "target": str(row.target),
                "ratio": row.ratio,
                "verdict": row.verdict,
            }
            for row in rows
        ],
        "runs": [
            {
                **dataclasses.asdict(run),
                "req_per_s": run.req_per_s,
                "events_per_s": run.events_per_s,
                "sustained": run.sustained,
            }
            for run in runs
        ],
    }


def write_json(
    path: Path, machine: dict[str, Any], runs: Sequence[Run], rows: Sequence[TargetRow]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(machine, runs, rows), indent=2, allow_nan=False) + "\n")
