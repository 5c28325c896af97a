"""`python -m bench.load`: a bounded load on 127.0.0.1 against the proxy, run three ways.

Each scenario (single events on /api/s/track, batches on /v1/batch) runs against a bare aiohttp
baseline (`bench.baseline`), the proxy with buffer.fsync true and the proxy with fsync false.
The proxy is a real child process forwarding to a null upstream that lives in this process and
counts the messageIds it got, so a figure only stands if the events really went through.
A load tool, not a test: it prints what it measured and never judges a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import hdrs, web

REPO = Path(__file__).resolve().parents[1]
WRITE_KEY = "bench:secret"
HEADERS = {hdrs.CONTENT_TYPE: "application/json", "X-Write-Key": WRITE_KEY}
OK = b'{"ok":true}'
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    requests: int
    events_per_request: int  # 0: one bare event per request, not a batch

    @property
    def events(self) -> int:
        return self.requests * max(1, self.events_per_request)

    def bodies(self) -> list[bytes]:
        """Request bodies, built before the clock starts; every event has its own messageId."""
        if not self.events_per_request:
            return [_dump(_event(i)) for i in range(self.requests)]
        n = self.events_per_request
        return [
            _dump({"batch": [_event(r * n + i) for i in range(n)], "sentAt": _now()})
            for r in range(self.requests)
        ]


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    fsync: bool | None  # None: the baseline server, no proxy


MODES = (Mode("baseline", None), Mode("fsync=on", True), Mode("fsync=off", False))


@dataclasses.dataclass
class Result:
    scenario: str
    mode: str
    requests: int
    events: int  # events the server said it took
    errors: int  # transport errors, non-2xx, or an answer that did not take every event
    seconds: float
    latencies: list[float]
    delivered: int | None = None  # distinct messageIds the null upstream got
    duplicates: int = 0
    drain_s: float | None = None

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))
        return ordered[rank] * 1000


@dataclasses.dataclass
class ChildReport:
    mode: str
    pid: int
    peak_rss_kib: int | None
    exit_code: int | None
    accepted: float | None = None  # proxy_events_accepted_total
    delivered: float | None = None  # proxy_events_delivered_total
    buffer_rows: float | None = None  # proxy_buffer_rows left at the end


def _event(i: int) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Bench Event",
        "messageId": str(uuid.uuid4()),
        "anonymousId": f"anon-{i % 1000}",
        "timestamp": _now(),
        "properties": {"plan": "pro", "value": i, "currency": "EUR"},
        "context": {
            "library": {"name": "jitsu-bench", "version": "0.1.0"},
            "page": {"url": "https://example.com/pricing", "path": "/pricing", "title": "Pricing"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) bench",
            "locale": "en-US",
        },
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- the null upstream -------------------------------------------------------------------------


class NullUpstream:
    """Answers 200 {"ok":true} to any POST and counts the events and distinct messageIds."""

    def __init__(self) -> None:
        self.events = 0
        self.message_ids: set[str] = set()
        self.changed = asyncio.Event()
        self.url = ""

    def reset(self) -> None:
        self.events = 0
        self.message_ids = set()

    async def accept(self, request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        batch = payload.get("batch") if isinstance(payload, dict) else None
        events = batch if isinstance(batch, list) else [payload]
        self.message_ids.update(str(e.get("messageId")) for e in events if isinstance(e, dict))
        self.events += len(events)
        self.changed.set()
        return web.Response(body=OK, content_type="application/json")

    async def wait_for(self, events: int, timeout_s: float) -> bool:
        """Wait until `events` events have arrived; False if they did not within timeout_s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.events < events:
                    self.changed.clear()
                    await self.changed.wait()
        return self.events >= events

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[NullUpstream]:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self.accept)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


# ---- child processes ---------------------------------------------------------------------------


class Child:
    """A server in a child process: started, waited for on /healthz, stopped with SIGTERM."""

    def __init__(self, mode: str, argv: Sequence[str], port: int, log_path: Path) -> None:
        self.mode = mode
        self.argv = list(argv)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        # Our own PROXY_* variables would override the config file the bench wrote.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=REPO, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(self.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.mode} did not become healthy:\n{self.log_tail()}")

    def peak_rss_kib(self) -> int | None:
        """VmHWM: the high-water mark of the resident set, as the kernel counted it."""
        if self.proc is None:
            return None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return None

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            print(f"warning: {self.mode} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; killed")
            return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def proxy_child(mode: Mode, upstream_url: str, workdir: Path) -> Child:
    workdir.mkdir()
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream_url},
        "buffer": {"path": str(workdir / "buffer"), "fsync": bool(mode.fsync)},
        "log": {"level": "warning", "format": "json"},
    }
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "proxy", "--config", str(config_path)]
    return Child(mode.name, argv, port, workdir / "proxy.log")


def baseline_child(workdir: Path) -> Child:
    workdir.mkdir()
    port = free_port()
    argv = [sys.executable, "-m", "bench.baseline", "--port", str(port)]
    return Child("baseline", argv, port, workdir / "baseline.log")


async def read_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The unlabelled series of the proxy's /metrics, by name."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


# ---- the load ----------------------------------------------------------------------------------


async def fire(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[bytes],
    concurrency: int,
    scenario: Scenario,
    mode: str,
) -> Result:
    """Send every body, `concurrency` at a time, and time each request from send to answer."""
    expected = max(1, scenario.events_per_request)
    result = Result(scenario.name, mode, len(bodies), 0, 0, 0.0, [])
    pending = iter(bodies)

    async def worker() -> None:
        for body in pending:  # one iterator shared by all workers: each body is sent once
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=HEADERS) as resp:
                    status = resp.status
                    answer = await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                result.errors += 1
                continue
            result.latencies.append(time.perf_counter() - started)
            taken = _events_taken(status, answer, expected)
            result.events += taken
            if taken != expected:
                result.errors += 1

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(bodies))):
            group.create_task(worker())
    result.seconds = time.perf_counter() - started
    return result


def _events_taken(status: int, answer: bytes, expected: int) -> int:
    """Events the server said it took. The browser route answers 200 even when it refuses an
    event, so the body decides, not the status alone."""
    if status != 200:
        return 0
    try:
        payload = json.loads(answer)
    except ValueError:
        return 0
    if not isinstance(payload, dict) or payload.get("ok") is not True:
        return 0
    taken = payload.get("okEvents", expected)
    return taken if isinstance(taken, int) else 0


async def run_mode(
    mode: Mode,
    scenarios: Sequence[Scenario],
    concurrency: int,
    upstream: NullUpstream,
    workdir: Path,
) -> tuple[list[Result], ChildReport]:
    child = (
        baseline_child(workdir) if mode.fsync is None else proxy_child(mode, upstream.url, workdir)
    )
    results: list[Result] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            await child.start(session)
            assert child.proc is not None
            report = ChildReport(mode.name, child.proc.pid, None, None)
            accepted_so_far = 0
            for scenario in scenarios:
                bodies = scenario.bodies()
                upstream.reset()
                print(f"  {scenario.name:<7} {mode.name:<10} {len(bodies)} requests ...", end="")
                sys.stdout.flush()
                result = await fire(
                    session, child.url + scenario.path, bodies, concurrency, scenario, mode.name
                )
                del bodies
                if mode.fsync is not None:
                    # The proxy answered once the events were on disk; now wait for it to hand
                    # them all to upstream, so "delivered" is a count and not a hope.
                    drain_started = time.perf_counter()
                    await upstream.wait_for(result.events, DRAIN_TIMEOUT_S)
                    result.drain_s = time.perf_counter() - drain_started
                    result.delivered = len(upstream.message_ids)
                    result.duplicates = upstream.events - len(upstream.message_ids)
                    accepted_so_far += result.events
                print(f" {result.seconds:.1f}s")
                results.append(result)
            if mode.fsync is not None:
                metrics = await _settled_metrics(session, child.url, accepted_so_far)
                report.accepted = metrics.get("proxy_events_accepted_total")
                report.delivered = metrics.get("proxy_events_delivered_total")
                report.buffer_rows = metrics.get("proxy_buffer_rows")
            report.peak_rss_kib = child.peak_rss_kib()
        finally:
            code = await child.stop()
    report.exit_code = code
    if code not in (0, None):
        print(f"warning: {mode.name} exited with {code}:\n{child.log_tail()}")
    return results, report


async def _settled_metrics(
    session: aiohttp.ClientSession, url: str, accepted: int
) -> dict[str, float]:
    """/metrics once the delivered counter caught up (it moves just after upstream answers)."""
    deadline = time.monotonic() + 5.0
    while True:
        metrics = await read_metrics(session, url)
        done = metrics.get("proxy_events_delivered_total", 0) >= accepted
        if done or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.05)


# ---- the report --------------------------------------------------------------------------------

COLUMNS = (
    ("scenario", "<8"),
    ("mode", "<9"),
    ("requests", ">8"),
    ("events", ">7"),
    ("errors", ">6"),
    ("seconds", ">7"),
    ("req/s", ">7"),
    ("events/s", ">8"),
    ("p50 ms", ">7"),
    ("p99 ms", ">7"),
    ("vs base", ">7"),
    ("delivered", ">9"),
    ("drain s", ">7"),
)


LEGEND = """\
  events: events the server said it took; vs base: events/s over the baseline's, same scenario;
  delivered: distinct messageIds the null upstream got from the proxy;
  drain s: from the last answer until upstream had every accepted event (not part of seconds)."""


def format_table(results: Sequence[Result]) -> str:
    base = {r.scenario: r.events / r.seconds for r in results if r.mode == "baseline" and r.seconds}
    rows = [[name for name, _ in COLUMNS]]
    for r in sorted(results, key=lambda r: r.scenario != "single"):
        eps = r.events / r.seconds if r.seconds else 0.0
        ratio = f"{eps / base[r.scenario]:.2f}" if base.get(r.scenario) else "-"
        rows.append(
            [
                r.scenario,
                r.mode,
                str(r.requests),
                str(r.events),
                str(r.errors),
                f"{r.seconds:.2f}",
                f"{r.requests / r.seconds:.0f}" if r.seconds else "-",
                f"{eps:.0f}",
                f"{r.percentile(50):.1f}",
                f"{r.percentile(99):.1f}",
                ratio,
                "-" if r.delivered is None else str(r.delivered),
                "-" if r.drain_s is None else f"{r.drain_s:.2f}",
            ]
        )
    return "\n".join(
        "  ".join(f"{cell:{align}}" for cell, (_, align) in zip(row, COLUMNS, strict=True))
        for row in rows
    )


def format_children(reports: Sequence[ChildReport]) -> str:
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = []
    for c in reports:
        rss = "n/a" if c.peak_rss_kib is None else f"{c.peak_rss_kib / 1024:.1f} MiB"
        line = f"  {c.mode:<9}  pid {c.pid:<7}  peak RSS {rss:>10}  exit {num(c.exit_code)}"
        if c.accepted is not None:
            line += (
                f"  accepted {num(c.accepted)}  proxy_events_delivered_total {num(c.delivered)}"
                f"  buffer rows left {num(c.buffer_rows)}"
            )
        lines.append(line)
    return "\n".join(lines)


def problems(results: Sequence[Result], reports: Sequence[ChildReport]) -> list[str]:
    """What makes a figure dishonest: failed requests, or events the proxy took but lost."""
    found = []
    for r in results:
        if r.errors:
            found.append(f"{r.scenario}/{r.mode}: {r.errors} requests failed or were refused")
        if r.delivered is not None and r.delivered < r.events:
            found.append(
                f"{r.scenario}/{r.mode}: upstream got {r.delivered} of {r.events} events "
                f"within {DRAIN_TIMEOUT_S:.0f}s"
            )
    for c in reports:
        if c.accepted is not None and (c.delivered or 0) < c.accepted:
            found.append(f"{c.mode}: delivered {c.delivered} of {c.accepted} accepted events")
        if c.exit_code not in (0, None):
            found.append(f"{c.mode}: exited with {c.exit_code}")
    return found


async def main_async(args: argparse.Namespace) -> int:
    scenarios = [
        Scenario("single", "/api/s/track", args.requests, 0),
        Scenario("batch", "/v1/batch", args.batch_requests, args.batch_size),
    ]
    scenarios = [s for s in scenarios if s.requests > 0]
    modes = [m for m in MODES if m.name in args.modes]
    print(
        f"bench: concurrency {args.concurrency}; "
        + "; ".join(
            f"{s.name} {s.requests} requests / {s.events} events on {s.path}" for s in scenarios
        )
    )
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C: children stopped, temp dirs removed.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    results: list[Result] = []
    reports: list[ChildReport] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jitsu-proxy-bench-") as tmp:
        async with NullUpstream().running() as upstream:
            for mode in modes:
                workdir = Path(tmp) / mode.name.replace("=", "-")
                mode_results, report = await run_mode(
                    mode, scenarios, args.concurrency, upstream, workdir
                )
                results += mode_results
                reports.append(report)
    print()
    print(format_table(results))
    print(LEGEND)
    print()
    print("child processes (peak RSS = VmHWM from /proc/<pid>/status, read before SIGTERM):")
    print(format_children(reports))
    print()
    print(f"total {time.perf_counter() - began:.0f}s")
    for r in results:
        if r.duplicates:
            # At least once: a retried forward may arrive twice. Worth knowing, not a failure.
            print(f"note: {r.scenario}/{r.mode}: upstream got {r.duplicates} duplicate events")
    found = problems(results, reports)
    for problem in found:
        print(f"PROBLEM: {problem}")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.load", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000, help="single-event requests")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--batch-requests", type=int, default=2_000, help="batch requests")
    parser.add_argument("--batch-size", type=int, default=50, help="events per batch")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=[m.name for m in MODES],
        default=[m.name for m in MODES],
        help="what to run the load against (the ratio needs the baseline)",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.batch_size < 1 or args.requests < 0 or args.batch_requests < 0:
        parser.error("counts must be positive")
    try:
        return asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
