"""Where each worker keeps its events: worker 0 in `buffer.path` itself (so one worker keeps
the layout of a single process), worker N in `buffer.path/shard-N`. A shard whose worker is
gone (fewer workers after a restart) is adopted by a worker and drained, never stranded."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from proxy.buffer import DB_NAME
from proxy.errors import BufferError_, BufferLockedError

SHARD_DIR = re.compile(r"shard-([1-9][0-9]*)")
# In buffer.path: held by the supervisor of several workers for its whole life, and by the
# offline commands (salvage, dead-letters) for theirs.
SUPERVISOR_LOCK = "supervisor.lock"


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def worker_count(configured: int, cpu_max: Path = CPU_MAX) -> int:
    """server.workers, or with 0 one per CPU this process may use: the CPUs it may run on (a
    container's cpuset), fewer under a CPU quota (a container's CPU limit, cgroup v2)."""
    if configured > 0:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cpu_max)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cpu_quota(path: Path = CPU_MAX) -> float | None:
    """CPUs' worth of time the cgroup may use ("max 100000": no limit, None)."""
    try:
        limit, period = path.read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def shard_dir(base: Path, index: int) -> Path:
    return base if index == 0 else base / f"shard-{index}"


def shard_dirs(base: Path) -> list[tuple[int, Path]]:
    """Every shard under `base` that exists, by index: the base itself, then shard-N."""
    found = [(0, base)]
    try:
        entries = list(base.iterdir())
    except OSError:
        return found
    for entry in entries:
        match = SHARD_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def stored_shards(path: str) -> tuple[Path, list[Path]]:
    """buffer.path made absolute, and the shards under it that hold a buffer (the first one
    always: it is where a single process keeps its buffer)."""
    base = Path(path).absolute()
    return base, [shard for n, shard in shard_dirs(base) if n == 0 or (shard / DB_NAME).exists()]


def adopted_by(base: Path, index: int, count: int) -> list[Path]:
    """The shards of workers that no longer exist (index >= count) that worker `index`
    drains: each goes to exactly one worker."""
    return [path for n, path in shard_dirs(base) if n >= count and n % count == index]


def supervisor_lock(base: Path, wait_s: float = 0.0) -> int:
    """The open, locked supervisor.lock of buffer.path (its fd: closing it unlocks), waiting
    up to `wait_s` for a holder to let go. OSError when the directory cannot be used,
    BufferLockedError when another process keeps it."""
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base / SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise BufferLockedError(f"buffer directory {base} is in use") from None
            time.sleep(0.1)


@contextlib.contextmanager
def offline_lock(path: str) -> Iterator[None]:
    """The supervisor's lock on buffer.path, held while an offline command runs: between a
    worker's exit and its restart no shard's own lock is held, and a purge or replay must not
    slip into that gap (issue 10). Never waited for: a running proxy is an error."""
    base = Path(path).absolute()
    try:
        fd = supervisor_lock(base)
    except OSError as exc:
        raise BufferError_(f"cannot use buffer directory {base}: {exc.strerror}") from exc
    except BufferLockedError:
        raise BufferLockedError(
            f"buffer directory {base} is in use by another process: stop the proxy first"
        ) from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock
