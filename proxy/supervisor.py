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
from typing import Any, NoReturn

import structlog

from proxy import fleet
from proxy.config import Config
from proxy.errors import BufferLockedError
from proxy.fleet import Worker
from proxy.shards import supervisor_lock

log = structlog.get_logger("proxy.supervisor")

# SIGHUP too: a closed terminal or a `kill -HUP` drains like SIGTERM, instead of killing the
# supervisor without a word (second attack pass, F4).
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SIGNALS = {*DRAIN_SIGNALS, signal.SIGCHLD}
# A worker that dies within this long of its start is restarted after a growing delay.
STABLE_AFTER_S = 10.0
FIRST_RESTART_DELAY_S = 0.1
MAX_RESTART_DELAY_S = 30.0
# How long past shutdown_timeout_s the drain may take before stragglers are killed.
DRAIN_MARGIN_S = 10.0
PR_SET_PDEATHSIG = 1
# A ready worker beats every BEAT_EVERY_S; one silent this long is stuck (a blocked event loop,
# a stopped process) and is killed and replaced.
BEAT_EVERY_S = 1.0
HUNG_AFTER_S = 30.0

# What a worker runs after the fork: serves until told to stop, returns the exit code. It
# calls `beat` once it serves, then every BEAT_EVERY_S while its event loop runs.
WorkerMain = Callable[[Worker, list[socket.socket], Callable[[], None]], int]


class StartError(Exception):
    """The supervisor cannot start: `event` names it in the log."""

    def __init__(self, event: str, error: str) -> None:
        super().__init__(error)
        self.event = event


def address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """The family and address a listener on host:port binds."""
    family, _, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, addr


def check_free(host: str, port: int) -> None:
    """SO_REUSEPORT lets another program of this user share the port without a word (a second
    proxy started by mistake would take a share of the connections): bind it alone first."""
    family, address_ = address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Connections of an earlier run in TIME_WAIT are no one's: only a listener counts.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address_)


def listen(host: str, port: int) -> socket.socket:
    """One member of the port's SO_REUSEPORT group."""
    family, address_ = address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address_)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Slot:
    """One worker index: its sockets (while the slot has them), its process (when running),
    its restarts."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sockets: list[socket.socket] = []
        self.pid: int | None = None
        self.started_at = 0.0
        self.ready = False
        self.beat_at = 0.0
        self.restart_at: float | None = None
        self.delay = FIRST_RESTART_DELAY_S

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


class Supervisor:
    def __init__(self, config: Config, count: int, main: WorkerMain) -> None:
        self.config = config
        self.count = count
        server = config.server
        self.addresses = [(server.host, server.port)]
        if server.admin_port:
            self.addresses.append((server.admin_host, server.admin_port))
        self.slots = [_Slot(i) for i in range(count)]
        self.main = main
        self.stopping = False
        self.failed = False
        self.served = False  # some worker got ready at some point
        # Workers restarted since start; the workers export it (proxy_worker_restarts_total).
        self.restarts = 0
        self._lock_fd: int | None = None
        self._beats_r, self._beats_w = os.pipe()
        os.set_blocking(self._beats_r, False)

    def start(self) -> None:
        """Take buffer.path for this supervisor, check the ports are free, bind the sockets;
        StartError if any of it cannot be done."""
        base = Path(self.config.buffer.path).absolute()
        self._lock(base)
        fleet.clear(base)
        try:
            for host, port in self.addresses:
                check_free(host, port)
            for slot in self.slots:
                slot.sockets = [listen(host, port) for host, port in self.addresses]
        except OSError as exc:
            raise StartError("listen_failed", str(exc)) from exc

    def _lock(self, base: Path) -> None:
        """One supervisor per buffer.path; a predecessor still draining is waited for."""
        wait_s = self.config.server.shutdown_timeout_s + DRAIN_MARGIN_S
        try:
            fd = supervisor_lock(base, wait_s)
        except BufferLockedError:
            raise StartError(
                "buffer_unusable", f"buffer directory {base} is in use by another proxy"
            ) from None
        except OSError as exc:
            raise StartError(
                "buffer_unusable", f"cannot use buffer directory {base}: {exc}"
            ) from exc
        self._lock_fd = fd

    def run(self) -> int:
        """Start every worker, keep them running until SIGTERM/SIGINT, drain them."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for slot in self.slots:
            self._spawn(slot)
        deadline: float | None = None
        while True:
            sig = signal.sigtimedwait(SIGNALS, self._wait_s())
            self._read_beats()
            self._reap()
            self._kill_hung()
            if sig is not None and sig.si_signo in DRAIN_SIGNALS:
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
            if not slot.sockets:
                slot.sockets = [listen(host, port) for host, port in self.addresses]
            pid = os.fork()
        except OSError as exc:  # out of processes, memory or ports for now: try again later
            log.error("worker_fork_failed", worker=slot.index, error=str(exc))
            slot.close_sockets()
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
            os.close(self._beats_r)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # the lock is the supervisor's alone
            for other in self.slots:
                if other is not slot:
                    other.close_sockets()
            structlog.contextvars.bind_contextvars(worker=slot.index)
            beats = self._beats_w
            os.set_blocking(beats, False)

            def beat() -> None:
                with contextlib.suppress(BlockingIOError):
                    os.write(beats, bytes([slot.index]))

            code = self.main(Worker(slot.index, self.count), slot.sockets, beat)
        except BaseException:
            log.exception("worker_failed")
        finally:
            os._exit(code)

    def _read_beats(self) -> None:
        now = time.monotonic()
        with contextlib.suppress(BlockingIOError):
            while beats := os.read(self._beats_r, 4096):
                for index in beats:
                    if index < len(self.slots) and self.slots[index].pid is not None:
                        self.slots[index].ready = True
                        self.slots[index].beat_at = now

    def _kill_hung(self) -> None:
        """A worker that served and then went silent does not serve its share any more."""
        if self.stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid is not None and slot.ready and now - slot.beat_at > HUNG_AFTER_S:
                log.error(
                    "worker_hung",
                    worker=slot.index,
                    pid=slot.pid,
                    silent_s=round(now - slot.beat_at),
                )
                _signal(slot.pid, signal.SIGKILL)
                slot.ready = False  # reaped, and restarted, as any worker that died

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
            self._read_beats()
            self.served = self.served or any(s.ready for s in self.slots)
            others = [s for s in self.slots if s is not slot and s.pid is not None]
            if not slot.ready and not self.served and not others:
                # Nothing ever started: a buffer or port that cannot be used. Say so, stop.
                log.error("worker_failed_to_start", worker=slot.index, pid=pid, exit_code=code)
                self.failed = True
                self._stop_all()
                continue
            lived = time.monotonic() - slot.started_at
            stable = slot.ready and lived > STABLE_AFTER_S
            slot.delay = (
                FIRST_RESTART_DELAY_S if stable else min(MAX_RESTART_DELAY_S, slot.delay * 2)
            )
            if not stable:
                # Its successor may not come soon: connections the kernel would queue on this
                # slot's sockets go to the other workers meanwhile (new sockets at the restart).
                slot.close_sockets()
            slot.restart_at = time.monotonic() + slot.delay
            self.restarts += 1
            fleet.write_restarts(Path(self.config.buffer.path).absolute(), self.restarts)
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
