"""Several worker processes on one port: the supervisor binds one listening socket per worker
(SO_REUSEPORT: the kernel spreads connections over them), forks the workers, restarts one that
dies, and passes SIGTERM on for the graceful drain. It holds every socket itself, so
connections queued for a worker that died wait for its successor instead of being refused.

Workers stay in the supervisor's process group (a signal to the group reaches all of them)
and get SIGTERM when the supervisor dies, even by kill -9 (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import structlog

from proxy import fleet
from proxy.config import Config
from proxy.fleet import Worker

log = structlog.get_logger("proxy.supervisor")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
# A worker that dies within this long of its start is restarted after a growing delay.
STABLE_AFTER_S = 10.0
FIRST_RESTART_DELAY_S = 0.1
MAX_RESTART_DELAY_S = 30.0
# How long past shutdown_timeout_s the drain may take before stragglers are killed.
DRAIN_MARGIN_S = 10.0
PR_SET_PDEATHSIG = 1

# What a worker runs after the fork: serves until told to stop, returns the exit code.
WorkerMain = Callable[[Worker, list[socket.socket], Callable[[], None]], int]


def listen(host: str, port: int) -> socket.socket:
    """One member of the port's SO_REUSEPORT group."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Slot:
    """One worker index: its sockets, its process (when running), its restarts."""

    def __init__(self, index: int, sockets: list[socket.socket]) -> None:
        self.index = index
        self.sockets = sockets
        self.pid: int | None = None
        self.started_at = 0.0
        self.ready = False
        self.restart_at: float | None = None
        self.delay = FIRST_RESTART_DELAY_S


class Supervisor:
    def __init__(
        self, config: Config, count: int, sockets: list[list[socket.socket]], main: WorkerMain
    ) -> None:
        self.config = config
        self.count = count
        self.slots = [_Slot(i, socks) for i, socks in enumerate(sockets)]
        self.main = main
        self.stopping = False
        self.failed = False
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)

    def run(self) -> int:
        """Start every worker, keep them running until SIGTERM/SIGINT, drain them."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        fleet.clear(Path(self.config.buffer.path).absolute())
        for slot in self.slots:
            self._spawn(slot)
        deadline: float | None = None
        while True:
            sig = signal.sigtimedwait(SIGNALS, self._wait_s())
            self._read_ready()
            self._reap()
            if sig is not None and sig.si_signo in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    log.info("proxy_draining", signal=signal.Signals(sig.si_signo).name)
                    self._stop_all()
                    deadline = time.monotonic() + self.config.server.shutdown_timeout_s
                    deadline += DRAIN_MARGIN_S
            running = [s for s in self.slots if s.pid is not None]
            if self.stopping:
                if not running:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    for slot in running:
                        log.error("worker_killed", worker=slot.index, pid=slot.pid)
                        _signal(slot.pid, signal.SIGKILL)
                    deadline = None
                continue
            now = time.monotonic()
            for slot in self.slots:
                if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)
        return 1 if self.failed else 0

    def _wait_s(self) -> float:
        """Until the next restart is due, at most half a second."""
        due = [s.restart_at for s in self.slots if s.pid is None and s.restart_at is not None]
        return max(0.01, min([0.5, *(at - time.monotonic() for at in due)]))

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.ready = False
        slot.started_at = time.monotonic()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory for now: try again later
            log.error("worker_fork_failed", worker=slot.index, error=str(exc))
            slot.delay = min(MAX_RESTART_DELAY_S, slot.delay * 2)
            slot.restart_at = time.monotonic() + slot.delay
            return
        if pid == 0:  # pragma: no cover - the child; covered by the process tests
            self._child(slot)
        slot.pid = pid
        log.info("worker_started", worker=slot.index, pid=pid)

    def _child(self, slot: _Slot) -> NoReturn:
        code = 1
        try:
            parent = os.getppid()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            _die_with_parent(parent)
            os.close(self._ready_r)
            for other in self.slots:
                if other is not slot:
                    for sock in other.sockets:
                        sock.close()
            structlog.contextvars.bind_contextvars(worker=slot.index)
            ready_w = self._ready_w

            def ready() -> None:
                os.write(ready_w, bytes([slot.index]))

            code = self.main(Worker(slot.index, self.count), slot.sockets, ready)
        except BaseException:
            log.exception("worker_failed")
        finally:
            os._exit(code)

    def _read_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for index in os.read(self._ready_r, 1024):
                if index < len(self.slots) and self.slots[index].pid is not None:
                    self.slots[index].ready = True

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = None
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code != 0:
                    self.failed = True
                log.info("worker_stopped", worker=slot.index, pid=pid, exit_code=code)
                continue
            self._read_ready()
            if not slot.ready and not any(s.ready for s in self.slots if s is not slot):
                # Nothing ever started: a buffer or port that cannot be used. Say so, stop.
                log.error("worker_failed_to_start", worker=slot.index, pid=pid, exit_code=code)
                self.failed = True
                self._stop_all()
                continue
            lived = time.monotonic() - slot.started_at
            slot.delay = (
                FIRST_RESTART_DELAY_S
                if lived > STABLE_AFTER_S
                else min(MAX_RESTART_DELAY_S, slot.delay * 2)
            )
            slot.restart_at = time.monotonic() + slot.delay
            log.error(
                "worker_exited",
                worker=slot.index,
                pid=pid,
                exit_code=code,
                lived_s=round(lived, 3),
                restart_in_s=round(slot.delay, 3),
            )

    def _stop_all(self) -> None:
        self.stopping = True
        for slot in self.slots:
            if slot.pid is not None:
                _signal(slot.pid, signal.SIGTERM)


def _signal(pid: int | None, sig: signal.Signals) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies (Linux); if it already has, now."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
