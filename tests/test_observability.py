"""What an operator sees (issue 10, "Seeing it"): the metrics of an outage and its recovery,
refusals by reason, dead letters by status, the script cache, one log line per backlog
warning, totals across workers, and deploy/observability's dashboard and alert rules."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from proxy import fleet
from proxy.backlog import BacklogWatch
from tests.conftest import ProxyFactory, state, until
from tests.fakejitsu import Answer, FakeJitsu, reset
from tests.procs import KEY, ROOT, SECRET, ProxyProcess, Spawn

OBSERVABILITY = ROOT / "deploy" / "observability"
HEADERS = {"X-Write-Key": KEY}
# Every attempt's answer class; they add up to the latency histogram's count.
CLASSES = ("2xx", "3xx", "4xx", "5xx", "other", "error", "timeout")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def values(samples: Samples, *names: str) -> dict[str, float]:
    """Unlabelled series by name, to compare several at once."""
    return {name: value(samples, name) for name in names}


def answers(samples: Samples) -> dict[str, float]:
    return {c: value(samples, "proxy_upstream_responses_total", **{"class": c}) for c in CLASSES}


async def scrape(session: aiohttp.ClientSession, proxy: ProxyProcess) -> Samples:
    async with session.get(f"{proxy.admin_url}/metrics") as resp:
        text = await resp.text()
    assert SECRET not in text
    return parse(text)


async def scrape_app(proxy: TestClient[Any, Any]) -> Samples:
    resp = await proxy.get("/metrics")
    text = await resp.text()
    assert SECRET not in text
    return parse(text)


def event(message_id: str) -> dict[str, Any]:
    return {"type": "track", "event": "e", "messageId": message_id}


async def post(session: aiohttp.ClientSession, proxy: ProxyProcess, message_id: str) -> int:
    async with session.post(
        f"{proxy.url}/api/s/s2s/track", json=event(message_id), headers=HEADERS
    ) as resp:
        return resp.status


# ---- (a) an outage and its recovery, in a real proxy process ---------------------------------


@pytest.mark.timeout(60)
async def test_an_outage_and_its_recovery_as_the_metrics_show_them(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    proxy = spawn(upstream={"coalesce": False, "retry": {"request_attempts": 2}})
    proxy.start()
    await proxy.wait_ready()
    for i in range(3):
        assert await post(session, proxy, f"ok-{i}") == 200
    await upstream.wait_delivered(3)
    await proxy.wait_state(session, lambda s: s["buffer"]["rows"] == 0)
    calm = await scrape(session, proxy)
    assert answers(calm)["2xx"] == 3
    assert value(calm, "proxy_upstream_up") == 1
    assert value(calm, "proxy_buffer_oldest_event_age_seconds") == 0

    upstream.fault = lambda rec: Answer(503, {"error": "down"})
    started = time.time()
    for i in range(2):
        assert await post(session, proxy, f"held-{i}") == 200
    await proxy.wait_upstream_failing(session, failures=3)
    await asyncio.sleep(0.2)  # the oldest event ages while upstream is down
    down = await scrape(session, proxy)
    assert value(down, "proxy_upstream_up") == 0
    seen = answers(down)
    assert seen["5xx"] >= 3 and seen["2xx"] == 3
    # Each HTTP attempt once: the in-request retries of aiohttp-retry too.
    count = value(down, "proxy_upstream_request_duration_seconds_count")
    assert count == sum(seen.values())
    assert value(down, "proxy_upstream_request_duration_seconds_bucket", le="+Inf") == count
    assert value(down, "proxy_upstream_retries_total") >= 2
    assert value(down, "proxy_upstream_consecutive_failures") >= 3
    # initial_backoff_s 0.05, max_backoff_s 0.3 (tests/procs.py): a jittered draw within them.
    assert 0.025 <= value(down, "proxy_upstream_backoff_seconds") <= 0.3
    assert 0 <= value(down, "proxy_upstream_next_attempt_seconds") <= 0.3
    age = value(down, "proxy_buffer_oldest_event_age_seconds")
    assert 0.2 <= age <= time.time() - started + 0.5
    assert value(down, "proxy_buffer_rows") == 2

    upstream.fault = None
    await upstream.wait_delivered(5)
    await proxy.wait_state(
        session, lambda s: s["buffer"]["rows"] == 0 and not s["upstream"]["failing"]
    )
    back = await scrape(session, proxy)
    calm = {
        "proxy_upstream_up": 1,
        "proxy_upstream_backoff_seconds": 0,
        "proxy_upstream_next_attempt_seconds": 0,
        "proxy_upstream_consecutive_failures": 0,
        "proxy_buffer_oldest_event_age_seconds": 0,
    }
    assert values(back, *calm) == calm
    assert answers(back)["2xx"] == 5
    assert value(back, "proxy_upstream_request_duration_seconds_count") == len(upstream.received)
    assert await proxy.terminate_async() == 0


async def test_no_answer_is_an_error_and_a_slow_one_a_timeout(
    make_proxy: ProxyFactory, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"timeout_s": 0.3, "retry": {"request_attempts": 1}})
    upstream.script.extend([reset(), Answer(delay_s=1.0)])
    resp = await proxy.post("/api/s/s2s/track", json=event("a"), headers=HEADERS)
    assert resp.status == 200
    await upstream.wait_delivered(1)
    samples = await scrape_app(proxy)
    seen = answers(samples)
    assert seen["error"] == 1 and seen["timeout"] == 1 and seen["2xx"] == 1
    assert value(samples, "proxy_upstream_request_duration_seconds_count") == 3

    # The timed-out attempt took the whole upstream.timeout_s: in the 0.5 s bucket, not 0.25.
    def bucket(le: str) -> float:
        return value(samples, "proxy_upstream_request_duration_seconds_bucket", le=le)

    assert bucket("0.5") - bucket("0.25") >= 1


# ---- refusals, dead letters, the script cache --------------------------------------------------


async def test_every_refusal_at_the_edge_is_counted_by_its_reason(
    make_proxy: ProxyFactory, upstream: FakeJitsu
) -> None:
    upstream.hang = True  # nothing leaves the buffer: it fills
    proxy = await make_proxy(
        limits={"max_request_bytes": 4096},
        buffer={"max_bytes": 20_000},
        security={"rate_limit": {"per_key_rps": 0.01, "per_key_burst": 3}},
    )
    url = "/api/s/s2s/track"
    as_json = {**HEADERS, "Content-Type": "application/json"}
    statuses = [
        (await proxy.post(url, data=b"{not json", headers=as_json)).status,
        (await proxy.post(url, data=b"x" * 5000, headers=as_json)).status,
        (await proxy.post(url, json=event("no-key"))).status,
        (await proxy.post(url, data=b"{}", headers={**HEADERS, "Content-Type": "text/xml"})).status,
    ]
    assert statuses == [400, 413, 401, 400]
    big = {**event("big"), "pad": "p" * 3000}
    answered = [
        (await proxy.post(url, json=big, headers={"X-Write-Key": f"k{i}:s"})).status
        for i in range(8)
    ]
    assert answered.count(503) >= 1, answered
    limited = [(await proxy.post(url, json=event("r"), headers=HEADERS)).status for _ in range(5)]
    assert 429 in limited
    # The pixel answers with its GIF whatever happens; the refusal is counted all the same.
    pixel = await proxy.get("/api/px/track", headers=HEADERS)
    assert pixel.status == 200 and "rate limit" in pixel.headers["X-Jitsu-Error"]
    samples = await scrape_app(proxy)

    def refused(reason: str) -> float:
        return value(samples, "proxy_events_refused_total", reason=reason)

    assert refused("invalid_event") == 2  # bad JSON, bad content type
    assert refused("too_large") == 1
    assert refused("no_key") == 1
    assert refused("buffer_full") == answered.count(503)
    assert refused("rate_limited") == limited.count(429) + 1
    assert refused("unknown_key") == 0 and refused("body_timeout") == 0
    upstream.hang = False


async def test_a_batch_refused_as_a_whole_counts_each_of_its_events(
    make_proxy: ProxyFactory, upstream: FakeJitsu
) -> None:
    """proxy_events_refused_total counts events, as proxy_events_accepted_total does: a batch
    refused whole (no key, a key not relayed, no room) counted as one (attack pass 2, F2)."""
    upstream.hang = True
    proxy = await make_proxy(
        buffer={"max_bytes": 20_000}, security={"allowed_key_ids": [KEY.split(":")[0]]}
    )

    def batch(n: int, bad: int = 0, pad: int = 0) -> dict[str, Any]:
        events = [{**event(f"b{i}"), "pad": "p" * pad} for i in range(n)]
        return {"batch": events + [{"type": "track"}] * bad}  # a track without its name

    assert (await proxy.post("/v1/batch", json=batch(5))).status == 401
    in_body = {**batch(4), "writeKey": "other:secret"}
    assert (await proxy.post("/v1/batch", json=in_body)).status == 401
    # A key in a header is refused before the body is read: its events are never counted.
    other = {"X-Write-Key": "other:secret"}
    assert (await proxy.post("/v1/batch", json=batch(7), headers=other)).status == 401
    full = 0
    for _ in range(6):
        resp = await proxy.post("/v1/batch", json=batch(3, bad=2, pad=2000), headers=HEADERS)
        full += resp.status == 503
    assert full >= 1
    samples = await scrape_app(proxy)

    def refused(reason: str) -> float:
        return value(samples, "proxy_events_refused_total", reason=reason)

    assert refused("no_key") == 5
    assert refused("unknown_key") == 4 + 1
    assert refused("buffer_full") == 3 * full
    assert refused("invalid_event") == 2 * 6


async def test_dead_letters_are_counted_by_upstream_status(
    make_proxy: ProxyFactory, upstream: FakeJitsu
) -> None:
    proxy = await make_proxy(upstream={"coalesce": False})
    upstream.reject = {"bad-1", "bad-2"}
    for mid in ("bad-1", "good", "bad-2"):
        resp = await proxy.post("/api/s/s2s/track", json=event(mid), headers=HEADERS)
        assert resp.status == 200
    await until(lambda: state(proxy).buffer.dead_rows == 2)
    samples = await scrape_app(proxy)
    assert value(samples, "proxy_events_dead_lettered_by_status_total", status="400") == 2
    assert value(samples, "proxy_events_dead_lettered_total") == 2


async def test_a_status_http_has_no_class_for_is_counted_as_other(
    make_proxy: ProxyFactory, upstream: FakeJitsu
) -> None:
    """Attack pass 2, F5: status 600 made a "6xx" class the docs do not know of."""
    proxy = await make_proxy(upstream={"coalesce": False})
    upstream.fault = lambda rec: Answer(600, {"error": "event error: odd"})
    resp = await proxy.post("/api/s/s2s/track", json=event("odd"), headers=HEADERS)
    assert resp.status == 200
    await until(lambda: state(proxy).buffer.dead_rows == 1)
    samples = await scrape_app(proxy)
    assert answers(samples) == {**dict.fromkeys(CLASSES, 0.0), "other": 1.0}
    assert value(samples, "proxy_events_dead_lettered_by_status_total", status="600") == 1
    assert not [
        k
        for k in samples
        if k[0] == "proxy_upstream_responses_total"
        and len(k[1])
        and dict(k[1]).get("class") == "6xx"
    ]


async def test_script_cache_hits_misses_and_refreshes(
    make_proxy: ProxyFactory, upstream: FakeJitsu
) -> None:
    upstream.script_status = 503
    proxy = await make_proxy()
    script = state(proxy).script
    assert script is not None
    assert (await proxy.get("/p.js")).status == 503
    upstream.script_status = 200
    await script.refresh()
    for _ in range(3):
        assert (await proxy.get("/p.js")).status == 200
    await script.refresh()  # the origin's ETag matches: 304
    samples = await scrape_app(proxy)

    def requests(result: str) -> float:
        return value(samples, "proxy_script_requests_total", script="p.js", result=result)

    def refreshes(result: str) -> float:
        return value(samples, "proxy_script_refreshes_total", script="p.js", result=result)

    assert requests("unavailable") == 1 and requests("hit") == 3
    assert refreshes("failed") >= 1
    assert refreshes("updated") == 1 and refreshes("unchanged") == 1


# ---- (d) log warnings once, and the all-clear once ---------------------------------------------


def _lines(logs: io.StringIO, event_name: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in logs.getvalue().splitlines() if x.startswith("{")]
    return [line for line in lines if line.get("event") == event_name]


@pytest.mark.timeout(60)
async def test_backlog_warnings_are_logged_once_and_cleared_once(
    make_proxy: ProxyFactory, upstream: FakeJitsu, logs: io.StringIO
) -> None:
    upstream.fault = lambda rec: Answer(503, {"error": "down"})
    proxy = await make_proxy(
        buffer={"max_bytes": 40_000, "warn_fill_ratio": 0.5, "warn_age_s": 1.5},
        upstream={"retry": {"request_attempts": 1}},
    )
    buffer = state(proxy).buffer
    pad = "p" * 1500
    sent = 0
    while buffer.bytes < 30_000:  # past the mark at 20 000, and more events on top of it
        body = {**event(f"e-{sent}"), "pad": pad}
        assert (await proxy.post("/api/s/s2s/track", json=body, headers=HEADERS)).status == 200
        sent += 1
        await asyncio.sleep(0.05)
    await until(lambda: bool(_lines(logs, "buffer_high_water")))
    await until(lambda: bool(_lines(logs, "backlog_old")), timeout=10)
    await asyncio.sleep(1.5)  # more checks of the marks, every second: no more lines
    (full,) = _lines(logs, "buffer_high_water")
    (old,) = _lines(logs, "backlog_old")
    assert full["level"] == "warning" and full["max_bytes"] == 40_000
    assert full["warn_fill_ratio"] == 0.5 and full["bytes"] >= 20_000
    assert old["level"] == "warning" and old["oldest_event_age_s"] >= 1.5

    upstream.fault = None
    await upstream.wait_delivered(sent, timeout=20)
    await until(lambda: bool(_lines(logs, "backlog_old_cleared")), timeout=10)
    await until(lambda: bool(_lines(logs, "buffer_high_water_cleared")), timeout=10)
    await asyncio.sleep(1.5)
    assert [x["level"] for x in _lines(logs, "buffer_high_water_cleared")] == ["info"]
    assert [x["level"] for x in _lines(logs, "backlog_old_cleared")] == ["info"]
    assert len(_lines(logs, "buffer_high_water")) == len(_lines(logs, "backlog_old")) == 1


# ---- (e) several workers: totals, and the largest for the gauges that must not add up ----------


@pytest.mark.timeout(90)
async def test_workers_that_cannot_publish_still_show_their_gauges_and_say_so(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With buffer.path/workers/ unwritable (here: a file in its place; a full disk does the
    same), every gauge vanished from /metrics once the reports went stale, so no alert on
    proxy_buffer_writable or proxy_upstream_up could fire (attack pass 2, F1). The answering
    worker's own gauges stay, and proxy_workers_reporting says how many reports are fresh."""
    proxy = spawn(server={"workers": 2})
    proxy.start()
    await proxy.wait_ready()
    calm = await scrape(session, proxy)
    assert value(calm, "proxy_workers_reporting") == 2
    workers = tmp_path / "buffer" / fleet.FLEET_DIR
    shutil.rmtree(workers)
    workers.write_text("not a directory")
    await asyncio.sleep(fleet.STALE_AFTER_S + 1)
    stale = await scrape(session, proxy)
    own_gauges = {
        "proxy_workers_reporting": 0,
        "proxy_workers": 2,
        "proxy_buffer_writable": 1,
        "proxy_upstream_up": 1,
        "proxy_buffer_fill_ratio": 0,
    }
    assert values(stale, *own_gauges) == own_gauges


async def test_workers_add_up_the_histogram_and_take_the_largest_age_and_backoff(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    proxy = spawn(server={"workers": 2}, upstream={"coalesce": False})
    proxy.start()
    await proxy.wait_ready()
    upstream.fault = lambda rec: Answer(503, {"error": "down"})
    started = time.time()
    # A new connection each: the kernel hands them to either worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for i in range(40):
            assert await post(fresh, proxy, f"w-{i}") == 200
    # Both hold a backlog (as their reports, twice a second, show it).
    ready = await proxy.wait_state(
        session, lambda s: all(w["rows"] for w in s["workers"]), what="a backlog in each worker"
    )
    await proxy.wait_upstream_failing(session, failures=4)
    await asyncio.sleep(1.0)  # both workers report (twice a second) while failing
    down = await scrape(session, proxy)
    assert value(down, "proxy_workers") == 2
    assert value(down, "proxy_workers_ready") == 2
    # The largest of the two, not their sum (which would be older than the first event).
    assert 1.0 <= value(down, "proxy_buffer_oldest_event_age_seconds") <= time.time() - started
    assert 0 < value(down, "proxy_upstream_backoff_seconds") <= 0.3
    assert value(down, "proxy_upstream_next_attempt_seconds") <= 0.3

    upstream.fault = None
    await upstream.wait_delivered(40, timeout=30)
    # The histogram of both workers, added up bucket by bucket, is every request upstream saw.
    for _ in range(100):
        back = await scrape(session, proxy)
        count = value(back, "proxy_upstream_request_duration_seconds_count")
        if count == len(upstream.received):
            break
        await asyncio.sleep(0.1)
    assert count == len(upstream.received) == sum(answers(back).values())
    assert value(back, "proxy_upstream_request_duration_seconds_bucket", le="+Inf") == count
    assert answers(back)["2xx"] >= 40 and answers(back)["5xx"] >= 4
    assert value(back, "proxy_buffer_oldest_event_age_seconds") == 0

    # A worker killed is restarted by the supervisor: one restart, whichever worker answers.
    assert value(back, "proxy_worker_restarts_total") == 0
    victim = ready["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    await proxy.wait_state(
        session,
        lambda s: all(w["ready"] and w["pid"] != victim for w in s["workers"]),
        what="the worker restarted",
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for _ in range(10):
            assert value(await scrape(fresh, proxy), "proxy_worker_restarts_total") == 1
    assert await proxy.terminate_async() == 0


# ---- (b) the dashboard and the rules name only metrics the proxy exports -----------------------

HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def _expressions() -> dict[str, list[str]]:
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = {"dashboard.json": [t["expr"] for p in panels for t in p["targets"]]}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs["dashboard.json"].append(var["definition"])
    rules = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
    exprs["alerts.yml"] = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return exprs


def _exported(text: str) -> set[str]:
    """Every series name a scrape can show: the samples', and for a family with no sample yet
    (a labelled counter nothing counted) the names its TYPE line promises."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + part for part in HISTOGRAM_PARTS)
        else:
            names.add(family.name)
    return names


async def test_every_metric_in_the_dashboard_and_the_rules_is_exported(
    proxy: TestClient[Any, Any], upstream: FakeJitsu
) -> None:
    resp = await proxy.post("/api/s/s2s/track", json=event("one"), headers=HEADERS)
    assert resp.status == 200
    await upstream.wait_delivered(1)
    exported = _exported(await (await proxy.get("/metrics")).text())
    used: dict[str, set[str]] = {}
    for where, exprs in _expressions().items():
        assert exprs, where
        for expr in exprs:
            for name in re.findall(r"\bproxy_[a-z_]+", expr):
                used.setdefault(name, set()).add(where)
    assert len(used) >= 25, sorted(used)
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not missing, missing


def test_the_dashboard_takes_its_datasource_as_an_input() -> None:
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


# ---- (c) promtool, where Debian's prometheus package provides it ---------------------------


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize(
    "args", [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]]
)
def test_the_alert_rules_pass_promtool(args: list[str]) -> None:
    done = subprocess.run(
        ["promtool", *args], cwd=OBSERVABILITY, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_promtool_test_that_fires_it() -> None:
    rules = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((OBSERVABILITY / "alerts.test.yml").read_text())["tests"]
    cases = [case for t in tests for case in t["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == alerts
    assert quiet <= alerts and quiet


def test_a_backlog_hovering_at_a_mark_makes_no_line_per_event() -> None:
    watch = BacklogWatch(fill_ratio=0.8, age_s=100)
    said = [
        [(n.level, n.event) for n in watch.observe(used, 1000, age)]
        for used, age in [(790, 0), (800, 99), (790, 100), (810, 60), (705, 51), (699, 49)]
    ]
    assert said == [
        [],
        [("warning", "buffer_high_water")],
        [("warning", "backlog_old")],
        [],
        [],
        [("info", "buffer_high_water_cleared"), ("info", "backlog_old_cleared")],
    ]
    assert BacklogWatch(fill_ratio=0, age_s=0).observe(1000, 1000, 1e9) == []
