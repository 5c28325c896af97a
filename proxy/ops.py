"""The proxy's own endpoints: /healthz, /readyz and /metrics (with several workers, totals
across all of them: fleet), and Jitsu's /health and /robots.txt."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import structlog
from aiohttp import hdrs, web

from proxy import fleet
from proxy.config import Config
from proxy.metrics import CONTENT_TYPE
from proxy.routes import json_response
from proxy.state import APP_STATE, AppState

log = structlog.get_logger("proxy.ops")


def add_routes(app: web.Application, config: Config) -> None:
    if config.routes.jitsu_paths:
        app.router.add_get("/health", jitsu_health)
        app.router.add_get("/robots.txt", robots)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def _stopped_loops(state: AppState) -> list[str]:
    stopped = []
    if not state.buffer.alive:
        stopped.append("buffer writer")
    if state.forwarder is not None and not state.forwarder.alive:
        stopped.append("forwarder")
    return stopped


async def healthz(request: web.Request) -> web.Response:
    """Alive means the loops that keep events moving run: the buffer's writer and the
    forwarder. If either ended (the log says why), an orchestrator should restart us. With
    several workers this is the answering worker's; the supervisor restarts the others."""
    stopped = _stopped_loops(request.app[APP_STATE])
    if stopped:
        return json_response({"status": "fail", "stopped": stopped}, status=503)
    return json_response({"status": "pass"})


async def jitsu_health(request: web.Request) -> web.Response:
    """GET /health, in Jitsu's shape (ingest's Health handler), for checks written for Jitsu."""
    stopped = _stopped_loops(request.app[APP_STATE])
    if stopped:
        return json_response(
            {"status": "fail", "output": ", ".join(stopped) + " stopped"}, status=503
        )
    return json_response({"status": "pass"})


async def robots(request: web.Request) -> web.Response:
    """GET /robots.txt as Jitsu answers it: nothing here is for crawlers."""
    return web.Response(text="User-agent: *\nDisallow: /\n")


def relative_to_buffer(text: str, buffer_dir: Path) -> str:
    """`text` with the buffer directory's absolute path taken out, so that files in it are
    named relative to buffer.path: an answer must not map the host's filesystem (issue 7,
    finding 11c)."""
    # The directory itself becomes "."; a longer name that merely starts alike is left.
    return re.sub(
        re.escape(os.path.abspath(buffer_dir)) + r"(/|(?![^\s'\":;,)\]]))",
        lambda m: "" if m.group(1) else ".",
        text,
    )


def worker_status(state: AppState) -> dict[str, Any]:
    """This process's part of /readyz: its shard (and the shards it drains for workers that
    are gone), its upstream state. `ready` says whether it can take events."""
    buf = state.buffer
    base = state.buffer_base
    buffers = [buf, *(a.buffer for a in state.adopted)]
    quarantined = [
        {
            "path": str(Path(moved["path"]).relative_to(base)),
            "reason": relative_to_buffer(moved["reason"], base),
        }
        for b in buffers
        for moved in b.quarantined
    ]
    ready = buf.writable and not state.draining
    body: dict[str, Any] = {
        "ready": ready,
        "buffer": {
            "writable": buf.writable,
            "rows": sum(b.rows for b in buffers),
            "events": sum(b.events for b in buffers),
            "bytes": sum(b.bytes for b in buffers),
            "max_bytes": buf.max_bytes,
            "dead_letter_rows": sum(b.dead_rows for b in buffers),
            "fsync": buf.fsync,
            "sqlite": buf.sqlite_settings,
            "last_error": buf.last_error and relative_to_buffer(buf.last_error, base),
            "quarantined": quarantined,
        },
        "draining": state.draining,
    }
    if state.forwarder is not None:
        body["upstream"] = state.forwarder.state()
    return body


def _status_word(ready: bool, quarantined: bool) -> str:
    # "warn": serving, but something needs a person (a corrupt buffer was moved aside).
    return "fail" if not ready else "warn" if quarantined else "pass"


async def readyz(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    own = worker_status(state)
    if state.fleet is None:
        ready = own.pop("ready")
        body = {"status": _status_word(ready, bool(own["buffer"]["quarantined"])), **own}
        return json_response(body, status=200 if ready else 503)
    body = _fleet_status(state.fleet, own)
    return json_response(body, status=200 if body["status"] != "fail" else 503)


def _fleet_status(view: fleet.Fleet, own: dict[str, Any]) -> dict[str, Any]:
    """Every worker's status as one: ready only when every worker reports, fresh, that it
    is; counts are totals, flags hold if they hold anywhere."""
    others = view.others()
    reports: list[tuple[int, int, float, dict[str, Any] | None]] = []
    for i in range(view.worker.count):
        report = others.get(i)
        if i == view.worker.index:
            reports.append((i, os.getpid(), 0.0, own))
        elif report is None:
            reports.append((i, 0, -1.0, None))
        else:
            reports.append((i, report.pid, report.age_s, report.status if report.fresh else None))
    live = [status for *_, status in reports if status is not None]
    ready = len(live) == len(reports) and all(s["ready"] for s in live)
    buffers = [s["buffer"] for s in live]
    total = {
        key: sum(b[key] for b in buffers)
        for key in ("rows", "events", "bytes", "max_bytes", "dead_letter_rows")
    }
    quarantined = [q for b in buffers for q in b["quarantined"]]
    body: dict[str, Any] = {
        "status": _status_word(ready, bool(quarantined)),
        "buffer": {
            **own["buffer"],
            **total,
            "writable": len(live) == len(reports) and all(b["writable"] for b in buffers),
            "last_error": next((b["last_error"] for b in buffers if b["last_error"]), None),
            "quarantined": quarantined,
        },
        "draining": any(s["draining"] for s in live),
        "workers": [
            {
                "index": index,
                "pid": pid,
                "reporting": status is not None,
                "ready": bool(status and status["ready"]),
                "rows": status["buffer"]["rows"] if status else None,
                "report_age_s": round(age, 3) if age >= 0 else None,
            }
            for index, pid, age, status in reports
        ],
    }
    upstreams = [s["upstream"] for s in live if "upstream" in s]
    if upstreams:
        body["upstream"] = _add_up_upstream(upstreams)
    return body


def _add_up_upstream(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Forwarder states as one: true if true anywhere, counts added up, waits the longest."""
    out: dict[str, Any] = {}
    for key in states[0]:
        values = [s.get(key) for s in states]
        if all(isinstance(v, bool) for v in values):
            out[key] = any(values)
        elif key == "next_probe_in_s":
            out[key] = max(v for v in values if isinstance(v, int | float))
        elif all(isinstance(v, int | float) for v in values):
            out[key] = sum(values)
        else:
            out[key] = next((v for v in values if v), values[0])
    return out


def publish_report(state: AppState, live: list[fleet.Family] | None = None) -> bool:
    """Write this worker's report for the others (`live`: its families, when the caller has
    collected them already); False (said once in the log) if it cannot."""
    view = state.fleet
    assert view is not None
    if live is None:
        live = fleet.families(state.metrics.registry)
    try:
        view.publish(worker_status(state), live)
    except OSError as exc:
        if not view.failing:  # a full disk says so elsewhere too
            log.warning(
                "worker_report_failed", error=relative_to_buffer(str(exc), state.buffer_base)
            )
        view.failing = True
        return False
    if view.failing:
        log.info("worker_report_resumed")
    view.failing = False
    return True


async def metrics(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    view = state.fleet
    if view is None:
        body = state.metrics.render()
    else:
        # Totals from the reports alone, this worker's written first: two scrapes answered by
        # two workers a moment apart add up the same files, each only grown since.
        live = fleet.families(state.metrics.registry)
        published = publish_report(state, live)
        reports: list[list[fleet.Family]] = []
        reporting = 0
        for index, report in enumerate(view.everyone()):
            if index == view.worker.index:
                reporting += published
                if report is None:
                    # Never published (buffer.path/workers/ cannot be written): its own figures.
                    reports.append(fleet.add_up([live, view.carried]))
                else:
                    # Its counters as last published, so that totals stay put instead of going
                    # back whichever worker answers (second attack pass of issue 9, F3); its
                    # gauges as they are now, so that a worker that cannot publish still tells
                    # its own state (attack pass 2 of issue 10, F1).
                    reports.append(fleet.cumulative(report.metrics) + fleet.gauges(live))
            elif report is not None:
                # A worker that stopped reporting still counted what it counted; its gauges
                # describe a moment long gone.
                reporting += report.fresh
                reports.append(report.metrics if report.fresh else fleet.cumulative(report.metrics))
        totals = fleet.add_up(reports)
        fleet.set_gauge(totals, "proxy_workers_reporting", reporting)
        body = fleet.render(totals)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})
