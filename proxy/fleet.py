"""What the workers of one proxy tell each other: each publishes its status and its metric
samples to a file of its own under `buffer.path/workers/` every second, and whichever worker
answers /metrics or /readyz adds up everyone's. A restarted worker carries on the counters its
predecessor published, so the totals never go back."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

FLEET_DIR = "workers"
PUBLISH_EVERY_S = 1.0
# A worker that has not published for this long is gone or stuck: the proxy is not ready.
STALE_AFTER_S = 5.0
# Gauges that are not added up: all must hold (min), or any (max).
ALL_OF = frozenset({"proxy_buffer_writable", "proxy_upstream_up"})
ANY_OF = frozenset({"proxy_upstream_redirected"})
# Metric types whose samples only grow while a process lives: carried over a restart.
CUMULATIVE = frozenset({"counter", "histogram", "summary"})

# One metric family as published: name, type, help, and its samples (name, labels, value).
Family = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Worker:
    """Which of the proxy's worker processes this is."""

    index: int
    count: int


def families(registry: CollectorRegistry) -> list[Family]:
    """The registry's samples in a form that travels as JSON."""
    return [
        {
            "name": metric.name,
            "type": metric.type,
            "help": metric.documentation,
            "samples": [[s.name, s.labels, s.value] for s in metric.samples],
        }
        for metric in registry.collect()
    ]


def add_up(published: Iterable[list[Family]]) -> list[Family]:
    """Every worker's families as one: samples with the same name and labels are added up
    (a few gauges take the min or max instead)."""
    merged: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fams in published:
        for fam in fams:
            name = fam["name"]
            if name not in merged:
                merged[name] = {"name": name, "type": fam["type"], "help": fam["help"]}
                values[name] = {}
            into = values[name]
            for sample, labels, value in fam["samples"]:
                key = (sample, tuple(sorted(labels.items())))
                if key not in into:
                    into[key] = value
                elif name in ALL_OF:
                    into[key] = min(into[key], value)
                elif name in ANY_OF:
                    into[key] = max(into[key], value)
                else:
                    into[key] += value
    for name, fam in merged.items():
        fam["samples"] = [[s, dict(labels), v] for (s, labels), v in values[name].items()]
    return list(merged.values())


def cumulative(fams: list[Family]) -> list[Family]:
    return [fam for fam in fams if fam["type"] in CUMULATIVE]


def render(fams: list[Family]) -> bytes:
    """Prometheus text for published families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Published(fams))
    return generate_latest(registry)


class _Published(Collector):
    def __init__(self, fams: list[Family]) -> None:
        self._fams = fams

    def collect(self) -> Iterable[Metric]:
        for fam in self._fams:
            metric = Metric(fam["name"], fam["help"], fam["type"])
            for sample, labels, value in fam["samples"]:
                metric.add_sample(sample, labels, value)
            yield metric


@dataclasses.dataclass(frozen=True)
class Report:
    """What one worker last published, and how long ago."""

    index: int
    pid: int
    age_s: float
    status: dict[str, Any]
    metrics: list[Family]

    @property
    def fresh(self) -> bool:
        return self.age_s <= STALE_AFTER_S


class Fleet:
    """This worker's view of the others, through the files under `buffer.path/workers/`."""

    def __init__(self, base: Path, worker: Worker) -> None:
        self.dir = base / FLEET_DIR
        self.worker = worker
        # The counters this worker's predecessor (same index) had published.
        self.carried: list[Family] = []

    def _file(self, index: int) -> Path:
        return self.dir / f"worker-{index}.json"

    def take_over(self) -> None:
        """Keep what the previous worker with this index counted."""
        report = self._read(self.worker.index)
        self.carried = cumulative(report.metrics) if report is not None else []

    def publish(self, status: dict[str, Any], fams: list[Family]) -> None:
        """Atomically replace this worker's file (a reader never sees half of it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "index": self.worker.index,
            "pid": os.getpid(),
            "at": time.time(),
            "status": status,
            "metrics": add_up([fams, self.carried]),
        }
        target = self._file(self.worker.index)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, separators=(",", ":")))
        os.replace(tmp, target)

    def others(self) -> list[Report | None]:
        """The last report of every other worker, None for one that never published."""
        return [self._read(i) for i in range(self.worker.count) if i != self.worker.index]

    def _read(self, index: int) -> Report | None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            payload = json.loads(self._file(index).read_text())
            return Report(
                index,
                int(payload["pid"]),
                max(0.0, time.time() - float(payload["at"])),
                dict(payload["status"]),
                list(payload["metrics"]),
            )
        return None


def clear(base: Path) -> None:
    """At the supervisor's start: reports of an earlier run describe nobody now."""
    directory = base / FLEET_DIR
    with contextlib.suppress(OSError):  # none yet, or no usable buffer.path: workers say so
        for entry in directory.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
