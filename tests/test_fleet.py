"""How workers add up their reports (pure: files in a temporary directory, no processes), and
which worker drains which shard."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy import fleet, shards
from proxy.fleet import Fleet, Worker


def _registry(accepted: float, rows: float, writable: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("proxy_events_accepted", "accepted", registry=registry).inc(accepted)
    Counter("proxy_requests", "by status", ["status"], registry=registry).labels("200").inc(
        accepted
    )
    Gauge("proxy_buffer_rows", "rows", registry=registry).set(rows)
    Gauge("proxy_buffer_writable", "writable", registry=registry).set(writable)
    return registry


def test_samples_are_added_up_and_flags_must_hold_everywhere() -> None:
    one = fleet.families(_registry(3, 10, 1))
    two = fleet.families(_registry(4, 5, 0))
    text = fleet.render(fleet.add_up([one, two])).decode()
    assert "proxy_events_accepted_total 7.0" in text
    assert 'proxy_requests_total{status="200"} 7.0' in text
    assert "proxy_buffer_rows 15.0" in text
    # One shard that cannot take writes makes the proxy's total 0, not 1.
    assert "proxy_buffer_writable 0.0" in text
    assert "# TYPE proxy_events_accepted_total counter" in text


def test_a_restarted_worker_carries_on_its_predecessors_counters(tmp_path: Path) -> None:
    first = Fleet(tmp_path, Worker(1, 2))
    first.take_over()
    first.publish({"ready": True}, fleet.families(_registry(5, 9, 1)))

    second = Fleet(tmp_path, Worker(1, 2))
    second.take_over()
    # Only what only grows is carried: the gauges describe the old process.
    assert [f["name"] for f in second.carried] == ["proxy_events_accepted", "proxy_requests"]
    second.publish({"ready": True}, fleet.families(_registry(2, 1, 1)))

    report = Fleet(tmp_path, Worker(0, 2)).others()[1]
    assert report is not None and report.fresh and report.pid == os.getpid()
    text = fleet.render(report.metrics).decode()
    assert "proxy_events_accepted_total 7.0" in text
    assert "proxy_buffer_rows 1.0" in text


def test_a_worker_that_never_reported_is_none_and_an_old_run_is_forgotten(
    tmp_path: Path,
) -> None:
    Fleet(tmp_path, Worker(1, 2)).publish({"ready": True}, [])
    assert Fleet(tmp_path, Worker(0, 3)).others()[1] is not None
    assert Fleet(tmp_path, Worker(0, 3)).others()[2] is None
    fleet.clear(tmp_path)
    assert Fleet(tmp_path, Worker(0, 2)).others() == {1: None}


def test_each_orphaned_shard_goes_to_exactly_one_worker(tmp_path: Path) -> None:
    for n in (1, 2, 3, 4, 5):
        (tmp_path / f"shard-{n}").mkdir()
    (tmp_path / "shard-x").mkdir()  # not a shard
    (tmp_path / "shard-01").mkdir()  # nor this: shard-1 is its name
    owners = {i: shards.adopted_by(tmp_path, i, 2) for i in range(2)}
    assert owners == {
        0: [tmp_path / "shard-2", tmp_path / "shard-4"],
        1: [tmp_path / "shard-3", tmp_path / "shard-5"],
    }
    # One worker drains every shard but its own (the base directory).
    assert len(shards.adopted_by(tmp_path, 0, 1)) == 5
    assert shards.adopted_by(tmp_path, 0, 6) == []


def test_workers_zero_means_one_per_usable_cpu(tmp_path: Path) -> None:
    assert shards.worker_count(3) == 3
    quota = shards.cpu_quota()
    cpus = len(os.sched_getaffinity(0))
    assert shards.worker_count(0) == (cpus if quota is None else max(1, min(cpus, -(-quota // 1))))
    # A container limited to 1.5 CPUs on a larger machine: 2 workers, not one per core.
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")
    assert shards.cpu_quota(limit) == 1.5
    limit.write_text("max 100000\n")
    assert shards.cpu_quota(limit) is None
    assert shards.worker_count(0, limit) == cpus
    # Half a CPU: one worker, however many cores the machine has.
    limit.write_text("50000 100000\n")
    assert shards.worker_count(0, limit) == 1
    assert shards.worker_count(4, limit) == 4  # an explicit count stands


def test_what_is_not_a_report_is_not_read(tmp_path: Path) -> None:
    """Attack pass, finding 1: a FIFO hung the reading worker for good, a symlink to
    /dev/zero or a huge file exhausted it. Only a small regular file is read."""
    Fleet(tmp_path, Worker(0, 5)).publish({"ready": True}, [])
    workers = tmp_path / fleet.FLEET_DIR
    os.mkfifo(workers / "worker-1.json")
    (workers / "worker-2.json").symlink_to("/dev/zero")
    with (workers / "worker-3.json").open("wb") as huge:
        huge.truncate(fleet.MAX_REPORT_BYTES + 1)
    (workers / "worker-4.json").mkdir()
    reports = Fleet(tmp_path, Worker(0, 5)).everyone()
    assert reports[0] is not None
    assert reports[1:] == [None, None, None, None]


def test_a_report_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    view = Fleet(tmp_path, Worker(0, 1))
    view.publish({"ready": True}, [])
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    planted = tmp_path / fleet.FLEET_DIR / f".worker-0.json.{os.getpid()}.tmp"
    planted.symlink_to(target)
    view.publish({"ready": False}, [])
    assert target.read_text() == "untouched"
    (report,) = view.everyone()
    assert report is not None and report.status == {"ready": False}


def test_a_report_not_shaped_as_one_is_not_added_up(tmp_path: Path) -> None:
    """Attack pass 2 of issue 10, F6: a report whose sample value was not a number broke
    /metrics and /readyz (500), and 2000 planted series entered the totals; a garbage restart
    count made the counter jump to 1e31 and back. Such files count as unreadable: the last
    good report stands."""
    good = Fleet(tmp_path, Worker(1, 2))
    good.publish({"ready": True}, fleet.families(_registry(5, 9, 1)))
    reader = Fleet(tmp_path, Worker(0, 2))
    assert reader.others()[1] is not None
    path = tmp_path / fleet.FLEET_DIR / "worker-1.json"
    planted = json.loads(path.read_text())
    bad_samples: list[object] = [
        [["proxy_events_accepted_total", {}, "lol"]],
        [["proxy_events_accepted_total", {}, float("nan")]],
        [["proxy_events_accepted_total", {"k": 1}, 1]],
        [["proxy_evil_total", {"k": str(j)}, 1] for j in range(fleet.MAX_SAMPLES + 1)],
        "not a list",
    ]
    for samples in bad_samples:
        planted["metrics"] = [{"name": "x", "type": "counter", "help": "h", "samples": samples}]
        path.write_text(json.dumps(planted))
        report = reader.others()[1]
        assert report is not None
        text = fleet.render(fleet.add_up([report.metrics])).decode()
        assert "proxy_events_accepted_total 5.0" in text and "evil" not in text
    restarts = tmp_path / fleet.FLEET_DIR / fleet.RESTARTS_FILE
    for content in ("9" * 31, "-7", "nan"):
        restarts.write_text(content)
        assert fleet.read_restarts(tmp_path) == 0
    restarts.write_text("3")
    assert fleet.read_restarts(tmp_path) == 3


def test_the_report_of_a_worker_that_no_longer_runs_is_not_fresh(tmp_path: Path) -> None:
    """A worker killed a moment ago left a report a few seconds young: /readyz said "pass"
    naming its pid, and a test that then signalled that pid found no such process."""
    Fleet(tmp_path, Worker(1, 2)).publish({"ready": True}, [])
    reader = Fleet(tmp_path, Worker(0, 2))
    report = reader.others()[1]
    assert report is not None and report.fresh
    gone = subprocess.Popen(["true"])
    gone.wait()
    path = tmp_path / fleet.FLEET_DIR / "worker-1.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": gone.pid}))
    report = reader.others()[1]
    assert report is not None and report.age_s < fleet.STALE_AFTER_S and not report.fresh
