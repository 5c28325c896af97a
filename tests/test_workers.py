"""server.workers: several processes on one port, each with its own buffer shard, under a
supervisor that restarts one that dies and drains them all on SIGTERM. Real processes,
killed for real; the fake Jitsu counts what arrives."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.fleet import PUBLISH_EVERY_S
from tests.fakejitsu import FakeJitsu
from tests.procs import KEY, ROOT, SECRET, ProxyProcess, Spawn, free_port, post_events

TWO = {"server": {"workers": 2}}


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


async def _metric(session: aiohttp.ClientSession, proxy: ProxyProcess, name: str) -> float:
    async with session.get(f"{proxy.admin_url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


async def _wait_metric(
    session: aiohttp.ClientSession, proxy: ProxyProcess, name: str, value: float
) -> None:
    """Workers report every second: poll until the total is there."""
    for _ in range(200):
        if await _metric(session, proxy, name) == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never reached {value}: {await _metric(session, proxy, name)}")


async def _workers(session: aiohttp.ClientSession, proxy: ProxyProcess) -> list[dict[str, Any]]:
    state = await proxy.readyz(session)
    assert state is not None
    workers: list[dict[str, Any]] = state["workers"]
    return workers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return status != "Z"


async def _gone(pids: list[int], timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if not any(_alive(p) for p in pids):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still running: {[p for p in pids if _alive(p)]}")


async def _buffered(
    spawn: Spawn,
    upstream: FakeJitsu,
    session: aiohttp.ClientSession,
    prefix: str,
    n: int,
    workers: int = 2,
) -> tuple[ProxyProcess, list[str]]:
    """A proxy with `workers` workers, upstream down, holding `n` acknowledged events."""
    await upstream.stop()
    proxy = spawn(server={"workers": workers})
    proxy.start()
    await proxy.wait_ready()
    ids = _ids(prefix, n)
    assert await post_events(session, proxy, ids) == set(ids)
    return proxy, ids


@pytest.mark.timeout(90)
async def test_two_workers_share_the_port_and_report_totals(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await upstream.stop()
    proxy = spawn(**TWO)
    # As the image runs it: print()'s two writes per line interleaved between workers then.
    proxy.start(env={"PYTHONUNBUFFERED": "1"})
    await proxy.wait_ready()
    workers = await _workers(session, proxy)
    assert [w["index"] for w in workers] == [0, 1]
    assert all(w["ready"] and w["reporting"] for w in workers)
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == 2 and proxy.pid not in pids

    ids = _ids("two", 300)
    accepted = await post_events(session, proxy, ids)
    assert accepted == set(ids)
    # Totals across both workers, as one proxy.
    await _wait_metric(session, proxy, "proxy_events_accepted_total", 300)
    await _wait_metric(session, proxy, "proxy_buffer_events", 300)
    state = await proxy.wait_state(
        session, lambda s: s["buffer"]["events"] == 300, what="300 events buffered"
    )
    # The kernel spread the connections: both shards hold events.
    assert all(w["rows"] > 0 for w in state["workers"]), state["workers"]
    assert (tmp_path / "buffer" / "shard-1" / "buffer.db").exists()

    await upstream.start()
    await upstream.wait_for(lambda f: set(ids) <= set(f.delivered_ids()), timeout=30)
    await _wait_metric(session, proxy, "proxy_events_delivered_total", 300)
    assert await proxy.terminate_async() == 0
    await _gone(pids)
    events = [line["event"] for line in proxy.log_lines()]
    assert "unparsed" not in events, [x for x in proxy.log_lines() if x["event"] == "unparsed"][:3]
    assert len(events) > 250  # a request line per request, from both workers at once
    assert events.count("worker_drained") == 2
    assert "proxy_stopped" in events
    assert SECRET not in proxy.log_text()


@pytest.mark.timeout(90)
async def test_a_worker_killed_by_kill_9_is_restarted_and_nothing_is_lost(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    proxy, ids = await _buffered(spawn, upstream, session, "w9", 200)
    await _wait_metric(session, proxy, "proxy_events_accepted_total", 200)
    before = await _workers(session, proxy)
    victim = before[1]["pid"]
    os.kill(victim, signal.SIGKILL)

    state = await proxy.wait_state(
        session,
        lambda s: s["status"] == "pass" and s["workers"][1]["pid"] not in (0, victim),
        what="worker 1 restarted",
    )
    assert state["workers"][0]["pid"] == before[0]["pid"]  # the other one served on
    # The counters of the killed worker are not forgotten.
    assert await _metric(session, proxy, "proxy_events_accepted_total") == 200
    exited = [line for line in proxy.log_lines() if line["event"] == "worker_exited"]
    assert exited and exited[0]["worker"] == 1 and exited[0]["exit_code"] == -9

    # More events while the new worker serves, then everything goes through.
    more = _ids("w9b", 50)
    assert await post_events(session, proxy, more) == set(more)
    await upstream.start()
    await upstream.wait_for(lambda f: set(ids + more) <= set(f.delivered_ids()), timeout=30)
    assert await proxy.terminate_async() == 0


@pytest.mark.timeout(90)
async def test_kill_9_of_the_whole_group_loses_nothing_acknowledged(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    proxy, ids = await _buffered(spawn, upstream, session, "g9", 400)
    accepted = set(ids)
    pids = [w["pid"] for w in await _workers(session, proxy)]
    proxy.kill_group()
    await _gone(pids, timeout=5)

    await upstream.start()
    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: accepted <= set(f.delivered_ids()), timeout=30)
    await proxy.wait_state(session, lambda s: s["buffer"]["rows"] == 0, what="buffer empty")
    assert await proxy.terminate_async() == 0


@pytest.mark.timeout(90)
async def test_kill_9_of_the_supervisor_drains_the_workers_and_a_restart_takes_over(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    proxy, ids = await _buffered(spawn, upstream, session, "s9", 200)
    pids = [w["pid"] for w in await _workers(session, proxy)]
    proxy.kill()  # the supervisor only
    # Orphaned workers are told to stop (PR_SET_PDEATHSIG) and drain; none lingers.
    await _gone(pids)

    await upstream.start()
    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: set(ids) <= set(f.delivered_ids()), timeout=30)
    assert await proxy.terminate_async() == 0


@pytest.mark.timeout(90)
async def test_fewer_workers_after_a_restart_drain_the_shards_left_behind(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    three, ids = await _buffered(spawn, upstream, session, "adopt", 300, workers=3)
    state = await three.wait_state(
        session, lambda s: s["buffer"]["events"] == 300, what="300 events buffered"
    )
    assert all(w["rows"] > 0 for w in state["workers"]), state["workers"]
    assert await three.terminate_async() == 0

    await upstream.start()
    one = spawn(server={"workers": 1})
    one.start()
    await one.wait_ready()
    await upstream.wait_for(lambda f: set(ids) <= set(f.delivered_ids()), timeout=30)
    await one.wait_state(session, lambda s: s["buffer"]["rows"] == 0, what="every shard empty")
    lines = one.log_lines()
    adopted = {line["shard"] for line in lines if line["event"] == "shard_adopted"}
    assert adopted == {"shard-1", "shard-2"}
    await _until_logged(one, "shard_drained", 2)
    assert await one.terminate_async() == 0


async def _until_logged(proxy: ProxyProcess, event: str, count: int) -> None:
    for _ in range(200):
        if sum(1 for line in proxy.log_lines() if line["event"] == event) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{event} not logged {count} times")


@pytest.mark.timeout(60)
async def test_readyz_fails_while_a_worker_stops_reporting(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    proxy = spawn(**TWO)
    proxy.start()
    await proxy.wait_ready()
    stuck = (await _workers(session, proxy))[1]["pid"]
    os.kill(stuck, signal.SIGSTOP)
    try:
        # Connections the kernel hands to the stopped worker hang: ask until the other answers.
        quick = aiohttp.ClientTimeout(total=0.5)
        async with aiohttp.ClientSession(timeout=quick) as impatient:
            for _ in range(200):
                try:
                    async with impatient.get(f"{proxy.url}/readyz", timeout=quick) as resp:
                        state = await resp.json()
                    if resp.status == 503:
                        break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("/readyz never failed while a worker was stopped")
        assert state["status"] == "fail"
        assert state["workers"][1]["reporting"] is False
        assert state["workers"][0]["ready"] is True
    finally:
        os.kill(stuck, signal.SIGCONT)
    await proxy.wait_ready()
    assert await proxy.terminate_async() == 0


@pytest.mark.timeout(90)
async def test_dead_letter_tool_lists_and_replays_every_shard(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    ids = _ids("dead", 120)
    upstream.reject = set(ids)
    proxy = spawn(**TWO)
    proxy.start()
    await proxy.wait_ready()
    assert await post_events(session, proxy, ids) == set(ids)
    await proxy.wait_state(
        session,
        lambda s: s["buffer"]["rows"] == 0 and s["buffer"]["dead_letter_rows"] > 0,
        what="everything dead-lettered",
    )
    assert await proxy.terminate_async() == 0

    def tool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "dead-letters",
                "--config",
                str(proxy.config_path),
                *args,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )

    listed = tool()
    assert listed.returncode == 0, listed.stdout + listed.stderr
    # Log lines (JSON too) and rows share stdout; rows are the ones without an "event".
    lines = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    parsed = [line for line in lines if "event" not in line]
    assert {row["shard"] for row in parsed} == {".", "shard-1"}
    assert sum(row["events"] for row in parsed) == len(ids)

    replayed = tool("--replay")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    upstream.reject = set()
    before = len(upstream.delivered_ids())
    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: set(ids) <= set(f.delivered_ids()[before:]), timeout=30)
    assert await proxy.terminate_async() == 0


@pytest.mark.timeout(60)
async def test_port_taken_by_another_program_stops_the_start(
    spawn: Spawn, upstream: FakeJitsu
) -> None:
    proxy = spawn(**TWO)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", proxy.port))
        taken.listen()
        proxy.start()
        assert proxy.proc is not None
        code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 30)
    assert code == 1
    assert any(line["event"] == "listen_failed" for line in proxy.log_lines())


@pytest.mark.timeout(60)
async def test_an_unusable_buffer_stops_every_worker_with_one_clear_line(
    spawn: Spawn, upstream: FakeJitsu, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the buffer directory should be")
    proxy = spawn(server={"workers": 2}, buffer={"path": str(blocker)})
    proxy.start()
    assert proxy.proc is not None
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 30)
    assert code == 1
    events = [line["event"] for line in proxy.log_lines()]
    assert events.count("buffer_unusable") == 1  # the supervisor's, before any worker
    assert "worker_started" not in events


@pytest.mark.timeout(60)
async def test_when_no_worker_can_start_the_proxy_stops(
    spawn: Spawn, upstream: FakeJitsu, tmp_path: Path
) -> None:
    base = tmp_path / "buffer"
    (base / "buffer.db").mkdir(parents=True)  # worker 0 cannot open its database
    (base / "shard-1").write_text("nor can worker 1 make its directory")
    proxy = spawn(server={"workers": 2})
    proxy.start()
    assert proxy.proc is not None
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 30)
    assert code == 1
    events = [line["event"] for line in proxy.log_lines()]
    assert "buffer_unusable" in events
    assert "worker_failed_to_start" in events


@pytest.mark.timeout(90)
async def test_totals_in_metrics_never_go_back_whichever_worker_answers(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    """Attack pass, finding 2: a worker added its live figures to the others' reports of up to
    a second ago, so scrapes answered by different workers went 214 -> 148."""
    proxy = spawn(**TWO)
    proxy.start()
    await proxy.wait_ready()
    load = asyncio.ensure_future(post_events(session, proxy, _ids("mono", 3000), concurrency=8))
    seen: list[tuple[float, float]] = []
    # A new connection each time: the kernel hands them to either worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        while not load.done() or len(seen) < 50:
            async with fresh.get(f"{proxy.url}/metrics") as resp:
                text = await resp.text()
            values = dict(
                line.split(" ", 1) for line in text.splitlines() if line.startswith("proxy_")
            )
            seen.append(
                (
                    float(values["proxy_events_accepted_total"]),
                    float(values["proxy_events_delivered_total"]),
                )
            )
            await asyncio.sleep(0.01)
    assert len(await load) == 3000
    backwards = [(a, b) for a, b in itertools.pairwise(seen) if b[0] < a[0] or b[1] < a[1]]
    assert not backwards, backwards[:5]
    assert seen[-1][0] > seen[0][0]
    assert await proxy.terminate_async() == 0


@pytest.mark.timeout(90)
async def test_a_worker_that_cannot_start_leaves_its_share_to_the_others(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Attack pass, finding 3: the supervisor kept a failing worker's sockets, and the kernel
    went on queueing about half the connections where no one would ever accept them."""
    (tmp_path / "buffer" / "shard-1").parent.mkdir(parents=True)
    (tmp_path / "buffer" / "shard-1").write_text("a file where worker 1's shard should be")
    proxy = spawn(**TWO)
    proxy.start()
    # Worker 0 serves, worker 1 fails and is retried later and later.
    await _until_logged(proxy, "worker_exited", 4)
    quick = aiohttp.ClientTimeout(total=3)
    statuses = []
    for i in range(30):
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=quick
        ) as fresh:
            try:
                async with fresh.post(
                    f"{proxy.url}/api/s/s2s/track",
                    json={"type": "track", "event": "e", "messageId": f"lone-{i}"},
                    headers={"X-Write-Key": KEY},
                ) as resp:
                    statuses.append(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses.append(type(exc).__name__)
    assert statuses == [200] * 30
    state = await proxy.readyz(session)
    assert state is not None and state["status"] == "fail"  # not every worker serves
    await upstream.wait_for(lambda f: {f"lone-{i}" for i in range(30)} <= f.delivered_set)
    assert await proxy.terminate_async() == 0


@pytest.mark.timeout(90)
async def test_a_second_proxy_on_the_same_port_or_buffer_does_not_start(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Attack pass, finding 4: SO_REUSEPORT let a second proxy take a share of the port's
    connections, and its start cleared the first one's reports."""
    first = spawn(**TWO)
    first.start()
    await first.wait_ready()
    # Same port, a buffer of its own: the port is taken.
    other = tmp_path / "other"
    other.mkdir()
    same_port = ProxyProcess(
        other, upstream.url, server={"workers": 2, "port": first.port}, buffer={"path": str(other)}
    )
    same_port.port = first.port
    same_port.start()
    # Same buffer, a port of its own: the buffer is taken (after waiting for a drain).
    same_buffer = spawn(server={"workers": 2, "shutdown_timeout_s": 0.1})
    same_buffer.start()
    try:
        loop = asyncio.get_running_loop()
        for second, event in ((same_port, "listen_failed"), (same_buffer, "buffer_unusable")):
            assert second.proc is not None
            assert await loop.run_in_executor(None, second.proc.wait, 30) == 1
            assert event in [line["event"] for line in second.log_lines()]
    finally:
        same_port.stop()
    ids = _ids("first", 100)
    assert await post_events(session, first, ids) == set(ids)
    state = await first.readyz(session)
    assert state is not None and state["status"] == "pass"
    assert await first.terminate_async() == 0


@pytest.mark.timeout(90)
async def test_log_lines_of_all_workers_stay_whole(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    """Attack pass 2, finding 1: with stdout unbuffered (as the image runs it), print() wrote
    a line and its newline apart, and two workers' lines ran together (42 in 6,019)."""
    proxy = spawn(**TWO)
    proxy.start(env={"PYTHONUNBUFFERED": "1"})
    await proxy.wait_ready()
    ids = _ids("lines", 2500)
    assert await post_events(session, proxy, ids, concurrency=32) == set(ids)
    await upstream.wait_for(lambda f: set(ids) <= f.delivered_set, timeout=30)
    assert await proxy.terminate_async() == 0
    lines = proxy.log_lines()
    assert len(lines) > 2000
    broken = [line["line"][:120] for line in lines if line["event"] == "unparsed"]
    assert not broken, broken[:3]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_drains_like_sigterm(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, workers: int
) -> None:
    """Second attack pass, F4: SIGHUP (a closed terminal) killed the proxy at once, without
    a drain or a line in the log."""
    proxy = spawn(server={"workers": workers})
    proxy.start()
    await proxy.wait_ready()
    ids = _ids(f"hup{workers}", 60)
    assert await post_events(session, proxy, ids) == set(ids)
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 30)
    assert code == 0
    events = [line["event"] for line in proxy.log_lines()]
    assert events[-1] == "proxy_stopped" and "buffer_closed" in events


@pytest.mark.timeout(60)
async def test_totals_stay_put_while_reports_cannot_be_written(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Second attack pass, F3: with buffer.path/workers/ unwritable each worker added its live
    figures to the other's last report, and the totals went 252 -> 248."""
    proxy = spawn(**TWO)
    proxy.start()
    await proxy.wait_ready()
    ids = _ids("put", 200)
    assert await post_events(session, proxy, ids) == set(ids)
    await _wait_metric(session, proxy, "proxy_events_accepted_total", 200)
    await asyncio.sleep(3 * PUBLISH_EVERY_S)  # each worker has read the other's last report
    reports = tmp_path / "buffer" / "workers"
    for entry in reports.iterdir():
        entry.unlink()
    reports.rmdir()
    reports.write_text("not a directory: no report can be written")
    more = _ids("put2", 200)
    assert await post_events(session, proxy, more) == set(more)
    seen = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for _ in range(40):
            async with fresh.get(f"{proxy.url}/metrics") as resp:
                text = await resp.text()
            line = next(x for x in text.splitlines() if x.startswith("proxy_events_accepted_total"))
            seen.append(float(line.split()[1]))
    assert seen == sorted(seen), seen
    reports.unlink()  # writable again: the totals catch up
    await _wait_metric(session, proxy, "proxy_events_accepted_total", 400)
    assert await proxy.terminate_async() == 0


@pytest.mark.timeout(60)
async def test_the_admin_listener_is_served_by_every_worker(
    spawn: Spawn, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    """server.admin_port with workers: each worker has a socket of its own on it too, the
    totals are there, and the public port answers /metrics with 404."""
    proxy = spawn(server={"workers": 2, "admin_port": free_port()})
    proxy.start()
    await proxy.wait_ready()  # on the admin port
    ids = _ids("admin", 100)
    assert await post_events(session, proxy, ids) == set(ids)
    await _wait_metric(session, proxy, "proxy_events_accepted_total", 100)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for _ in range(6):  # new connections: either worker answers
            async with fresh.get(f"{proxy.url}/metrics") as resp:
                assert resp.status == 404
            async with fresh.get(f"{proxy.admin_url}/readyz") as resp:
                assert resp.status == 200
                assert len((await resp.json())["workers"]) == 2
    assert await proxy.terminate_async() == 0
