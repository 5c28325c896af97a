"""The bench's arithmetic, without load: wrk's report read right, responses framed right, events
counted right at the null upstream, and the targets table and its JSON as the issue asks.
No timing is asserted anywhere (speed figures belong in `make bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report, wrk
from bench.events import Bodies
from bench.generator import parse_response
from bench.report import Run, Target, TargetRow
from bench.upstream import Counts

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:40123/api/s/track
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    41.93ms   12.01ms   1.02s    91.20%
    Req/Sec     1.53k   102.11     1.70k    72.00%
  Latency Distribution
     50%  850.00us
     75%   45.10ms
     90%   52.77ms
     99%    1.20s
  7642 requests in 5.01s, 1.20MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   1525.35
Transfer/sec:    245.10KB
"""


def test_wrk_report_read_with_its_units() -> None:
    result = wrk.parse_output(WRK_OUTPUT)
    assert result.requests == 7642
    assert result.seconds == pytest.approx(5.01)
    assert result.non_2xx == 7
    assert result.ok == 7635
    assert result.socket_errors == 5
    assert result.latency_ms == pytest.approx({50: 0.85, 75: 45.1, 90: 52.77, 99: 1200.0})


def test_wrk_report_of_a_clean_run_and_a_long_one() -> None:
    clean = WRK_OUTPUT.replace("  Socket errors: connect 0, read 2, write 0, timeout 3\n", "")
    clean = clean.replace("  Non-2xx or 3xx responses: 7\n", "")
    clean = clean.replace("7642 requests in 5.01s", "90000 requests in 1.00m")
    result = wrk.parse_output(clean)
    assert (result.requests, result.seconds, result.non_2xx, result.socket_errors) == (
        90000,
        60.0,
        0,
        0,
    )


def test_wrk_output_without_a_count_is_an_error() -> None:
    with pytest.raises(wrk.WrkOutputError, match="no request count"):
        wrk.parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_wrk_command_passes_the_event_to_the_script() -> None:
    argv = wrk.command(
        "/usr/bin/wrk",
        "http://127.0.0.1:1/v1/batch",
        seconds=5,
        connections=64,
        threads=1,
        run_id=3,
        events_per_request=50,
        write_key="k:s",
        event_head='{"messageId":"',
        event_tail='"}',
    )
    assert argv[:4] == ["/usr/bin/wrk", "-t1", "-c64", "-d5s"]
    assert argv[argv.index("--") :] == ["--", "3", "50", "k:s", '{"messageId":"', '"}']
    assert Path(argv[argv.index("-s") + 1]).is_file()


def test_responses_framed_by_length_and_by_chunks() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
    assert parse_response(head + b'{"ok":true}') == (200, len(head) + 11)
    assert parse_response(head + b'{"ok":') is None
    assert parse_response(head[:20]) is None
    two = head + b'{"ok":true}' + b"HTTP/1.1 503 x\r\nContent-Length: 0\r\n\r\n"
    assert parse_response(two) == (200, len(head) + 11)
    chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    assert parse_response(chunked) == (201, len(chunked))
    assert parse_response(chunked[:-2]) is None


def test_bodies_give_every_event_its_own_message_id() -> None:
    batches = Bodies(7, 3)
    ids = [e["messageId"] for _ in range(2) for e in json.loads(batches())["batch"]]
    single = Bodies(7, 0, thread=0)  # a wrk thread's numbers: the same run, other ids
    ids += [json.loads(single())["messageId"] for _ in range(2)]
    assert len(ids) == len(set(ids)) == 8
    assert all(i.startswith("b7-") for i in ids)


def test_null_upstream_counts_distinct_events_of_its_run() -> None:
    counts = Counts()
    counts.reset(7)
    bodies = Bodies(7, 3)
    batch = bodies()
    counts.add(batch)
    counts.add(batch)  # a retried forward: duplicates, not more events
    counts.add(Bodies(6, 0)())  # a late one from the run before
    counts.add(json.dumps(json.loads(bodies()), indent=1).encode())  # other spacing
    stats = counts.stats()
    assert (stats["distinct"], stats["events"], stats["duplicates"]) == (6, 9, 3)
    assert (stats["requests"], stats["other"]) == (4, 1)


def _rows() -> list[TargetRow]:
    return [
        TargetRow("sustained", 900.0, "ev/s", Target(">=", 0.6), "raw", 1000.0, "req/s"),
        TargetRow("p99", 30.0, "ms", Target("<=", 2.0), "raw p99", 10.0, "ms"),
        TargetRow("peak RSS", 120.5, "MB", Target("<=", 150), note="20,000 events"),
        TargetRow("drain", 5.0, "ev/s", Target(">=", 1.0), "raw", 10.0, "req/s", void="lost 3"),
        TargetRow("workers", None, "ev/s", Target(">=", 1.5), "workers 1", None, "ev/s"),
    ]


def test_targets_judged_by_ratio_or_by_the_figure() -> None:
    rows = _rows()
    assert [r.ratio for r in rows] == [pytest.approx(0.9), pytest.approx(3.0), None, 0.5, None]
    assert [r.verdict for r in rows] == ["met", "not met", "met", "void: lost 3", "not measured"]


def test_targets_table_has_every_row_and_its_verdict() -> None:
    table = report.format_targets(_rows()).splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == [
        "figure",
        "measured",
        "baseline",
        "ratio",
        "target",
        "verdict",
    ]
    assert len(table) == 2 + 5
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
    assert cells[0] == ["sustained", "900 ev/s", "raw 1,000 req/s", "0.90", ">= 0.60", "met"]
    assert cells[2] == ["peak RSS (20,000 events)", "120 MB", "-", "-", "<= 150", "met"]
    assert cells[3][-1] == "void: lost 3"
    assert cells[4][1:4] == ["-", "workers 1 -", "-"]
    assert len({len(line) for line in table}) == 1  # the columns line up


def test_runs_table_and_json(tmp_path: Path) -> None:
    runs = [
        Run("raw", "raw", "/api/s/track", "1 process", "wrk", 5000, 5000, 2.0, 1.0, 4.0),
        Run(
            "proxy",
            "proxy",
            "/api/s/s2s/track",
            "workers 1",
            "wrk",
            2000,
            2000,
            2.0,
            delivered=2000,
            drain_s=0.5,
            rss_mb=50.0,
            processes=1,
        ),
    ]
    assert runs[0].req_per_s == 2500 and runs[1].sustained == 800
    table = report.format_runs(runs)
    row = [c.strip() for c in table.splitlines()[3].split("|")[1:-1]]
    assert row[9:] == ["2000/2000", "0.50", "800", "50.0", "1"]
    path = tmp_path / "out" / "results.json"
    report.write_json(path, {"cpus": 2}, runs, _rows())
    written = json.loads(path.read_text())
    assert written["machine"] == {"cpus": 2}
    assert [t["verdict"] for t in written["targets"]][:3] == ["met", "not met", "met"]
    assert written["targets"][0]["target"] == ">= 0.60"
    assert written["runs"][1]["sustained"] == 800
