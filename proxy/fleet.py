"""What the workers of one proxy tell each other: each publishes its status and its metric
samples to a file of its own under `buffer.path/workers/` twice a second and whenever it answers
/metrics, and the one that answers adds up everyone's files (its own too: a scrape answered by
another worker a moment later sees no less). A restarted worker carries on the counters its
predecessor published, so the totals never go back."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

FLEET_DIR = "workers"
# How often each worker publishes; also when it answers /metrics or /readyz. What a worker
# killed by kill -9 counted since its last report is not in the totals.
PUBLISH_EVERY_S = 0.5
# A report is a few KiB; anything much larger is not one.
MAX_REPORT_BYTES = 1 << 20
# Nor is one with far more families or series than the proxy exports, or a restart count no
# supervisor reaches.
MAX_FAMILIES = 500
MAX_SAMPLES = 20_000
MAX_RESTARTS = 1_000_000_000
METRIC_TYPES = frozenset(
    {"counter", "gauge", "histogram", "summary", "info", "stateset", "unknown"}
)
# A worker that has not published for this long is gone or stuck: the proxy is not ready.
STALE_AFTER_S = 5.0
# Gauges that are not added up: all must hold (min), or any (max).
ALL_OF = frozenset({"proxy_buffer_writable", "proxy_upstream_up"})
ANY_OF = frozenset({"proxy_upstream_redirected"})
# Figures where the fleet's is the largest of any worker's: the oldest event anywhere, the
# longest wait; and what every worker reads from the same place (the supervisor's count of
# restarts, the configured workers), which a sum would multiply.
MAX_OF = frozenset(
    {
        "proxy_buffer_oldest_event_age_seconds",
        "proxy_upstream_backoff_seconds",
        "proxy_upstream_next_attempt_seconds",
        "proxy_upstream_consecutive_failures",
        "proxy_workers",
        "proxy_workers_reporting",
        "proxy_buffer_fill_ratio",
        "proxy_worker_restarts",
    }
)
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
                elif name in ANY_OF or name in MAX_OF:
                    into[key] = max(into[key], value)
                else:
                    into[key] += value
    for name, fam in merged.items():
        fam["samples"] = [[s, dict(labels), v] for (s, labels), v in values[name].items()]
    return list(merged.values())


def cumulative(fams: list[Family]) -> list[Family]:
    return [fam for fam in fams if fam["type"] in CUMULATIVE]


def gauges(fams: list[Family]) -> list[Family]:
    return [fam for fam in fams if fam["type"] not in CUMULATIVE]


def set_gauge(fams: list[Family], name: str, value: float) -> None:
    """Give an unlabelled gauge of the totals a value only the answering worker knows."""
    for fam in fams:
        if fam["name"] == name:
            fam["samples"] = [[name, {}, float(value)]]


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
        """Written lately by a process that still runs: a worker killed a moment ago (its
        successor not yet reporting) is not counted as ready on its last words."""
        return self.age_s <= STALE_AFTER_S and _running(self.pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return pid > 0


class Fleet:
    """This worker's view of the others, through the files under `buffer.path/workers/`."""

    def __init__(self, base: Path, worker: Worker) -> None:
        self.dir = base / FLEET_DIR
        self.worker = worker
        # The counters this worker's predecessor (same index) had published.
        self.carried: list[Family] = []
        # Publishing failed last time (said once in the log, not every time).
        self.failing = False
        # Each worker's last report read, and when it was written.
        self._last: dict[int, tuple[float, Report]] = {}

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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # never write through something planted under that name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(json.dumps(payload, separators=(",", ":")).encode())
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # a full disk must not collect empty files too
            raise

    def others(self) -> dict[int, Report | None]:
        """The last report of every other worker by index, None for one that never published."""
        return {i: self._read(i) for i in range(self.worker.count) if i != self.worker.index}

    def everyone(self) -> list[Report | None]:
        """The last report of every worker, this one's included."""
        return [self._read(i) for i in range(self.worker.count)]

    def _read(self, index: int) -> Report | None:
        """The worker's report; the last one read if its file cannot be read now (the
        directory was removed, the disk is full): figures never go back for that."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            payload = json.loads(_read_report(self._file(index)))
            at = float(payload["at"])
            if not _well_formed(payload["metrics"]):
                raise ValueError("not a worker's metrics")
            self._last[index] = (
                at,
                Report(
                    index, int(payload["pid"]), 0.0, dict(payload["status"]), payload["metrics"]
                ),
            )
        last = self._last.get(index)
        if last is None:
            return None
        at, report = last
        return dataclasses.replace(report, age_s=max(0.0, time.time() - at))


def _well_formed(fams: Any) -> bool:
    """Metric families as publish() writes them, within bounds: a file that is not one (planted
    by anyone who can write in the directory, or half-written by a bug) must neither break
    /metrics nor enter the totals."""
    if not isinstance(fams, list) or len(fams) > MAX_FAMILIES:
        return False
    samples = 0
    for fam in fams:
        if not (
            isinstance(fam, dict)
            and isinstance(fam.get("name"), str)
            and isinstance(fam.get("help"), str)
            and fam.get("type") in METRIC_TYPES
            and isinstance(fam.get("samples"), list)
        ):
            return False
        samples += len(fam["samples"])
        for sample in fam["samples"]:
            if not (isinstance(sample, list) and len(sample) == 3):
                return False
            name, labels, value = sample
            if not (
                isinstance(name, str)
                and isinstance(labels, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
                and isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                return False
    return samples <= MAX_SAMPLES


def _read_report(path: Path) -> bytes:
    """A report as the worker wrote it, or OSError: only a regular file of at most
    MAX_REPORT_BYTES, opened without following a symlink nor waiting on a FIFO. Anyone who can
    write in the directory must not be able to hang or exhaust the worker that reads it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_REPORT_BYTES:
            raise OSError(f"{path.name}: not a worker's report")
        return os.read(fd, MAX_REPORT_BYTES + 1)[:MAX_REPORT_BYTES]
    finally:
        os.close(fd)


# Where the supervisor keeps its count of worker restarts, for the workers to export (the
# supervisor serves no /metrics of its own).
RESTARTS_FILE = "restarts"


def write_restarts(base: Path, count: int) -> None:
    """The supervisor's count of restarts, replaced atomically; not kept if it cannot be."""
    directory = base / FLEET_DIR
    with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{RESTARTS_FILE}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(str(count))
        os.replace(tmp, directory / RESTARTS_FILE)


def read_restarts(base: Path) -> int:
    """Worker restarts since the supervisor started; 0 when it has written none."""
    with contextlib.suppress(OSError, ValueError):
        count = int(_read_report(base / FLEET_DIR / RESTARTS_FILE)[:32])
        if 0 <= count <= MAX_RESTARTS:
            return count
    return 0


def clear(base: Path) -> None:
    """At the supervisor's start: reports of an earlier run describe nobody now."""
    directory = base / FLEET_DIR
    with contextlib.suppress(OSError):  # none yet, or no usable buffer.path: workers say so
        for entry in directory.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
