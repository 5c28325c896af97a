"""The proxy as a real process: kill -9 loses nothing acknowledged; SIGTERM drains; bad config
and a taken buffer directory stop it with one clear line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import until
from tests.fakejitsu import Answer, FakeJitsu
from tests.procs import KEY, ROOT, SECRET, ProxyProcess, post_events, refused_start


@pytest.mark.timeout(120)
async def test_kill_9_loses_nothing_acknowledged(
    spawn: Any, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    await upstream.stop()
    proxy = spawn()
    proxy.start()
    await proxy.wait_ready()
    ids = [f"k9-{i:05d}" for i in range(600)]
    accepted = await post_events(session, proxy, ids)
    assert accepted == set(ids)
    proxy.kill()
    assert proxy.proc is not None and proxy.proc.returncode == -9

    await upstream.start()
    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: accepted <= set(f.delivered_ids()), timeout=60)
    # Every copy of an event upstream saw carries the same bytes.
    bodies: dict[str, set[bytes]] = {}
    for rec in upstream.delivered:
        if rec.path == "/v1/batch":
            continue
        bodies.setdefault(rec.message_ids[0], set()).add(rec.body)
    assert all(len(b) == 1 for b in bodies.values())
    assert SECRET not in proxy.log_text()
    assert proxy.terminate() == 0


@pytest.mark.timeout(120)
async def test_kill_9_while_forwarding(
    spawn: Any, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    """Killed mid-drain, with upstream slow: the rest is sent after restart."""
    upstream.script.extend(Answer(200, delay_s=0.05) for _ in range(100))
    proxy = spawn(upstream={"concurrency": 2})
    proxy.start()
    await proxy.wait_ready()
    ids = [f"fw-{i:04d}" for i in range(300)]
    accepted = await post_events(session, proxy, ids)
    assert accepted == set(ids)
    await upstream.wait_for(lambda f: len(f.delivered) >= 10, timeout=20)
    proxy.kill()
    delivered_before = set(upstream.delivered_ids())
    assert delivered_before < accepted, "the kill should land mid-drain"
    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: accepted <= set(f.delivered_ids()), timeout=60)
    assert proxy.terminate() == 0


@pytest.mark.timeout(60)
async def test_sigterm_drains_and_exits_0(
    spawn: Any, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    upstream.script.extend(Answer(200, delay_s=0.3) for _ in range(4))
    proxy = spawn(upstream={"concurrency": 1})
    proxy.start()
    await proxy.wait_ready()
    ids = [f"t-{i}" for i in range(40)]
    accepted = await post_events(session, proxy, ids)
    assert accepted == set(ids)
    await upstream.wait_for(lambda f: f.in_flight >= 1 or len(f.delivered) >= 1, timeout=10)
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.terminate)
    assert code == 0
    events = [line["event"] for line in proxy.log_lines()]
    assert "buffer_closed" in events and events[-1] == "proxy_stopped"
    # What was not delivered before the stop is delivered after the restart.
    proxy.start()
    await proxy.wait_ready()
    await upstream.wait_for(lambda f: accepted <= set(f.delivered_ids()), timeout=30)
    assert proxy.terminate() == 0


async def test_second_process_on_the_same_buffer_exits_1(
    spawn: Any, upstream: FakeJitsu, tmp_path: Path
) -> None:
    first = spawn()
    first.start()
    await first.wait_ready()
    (tmp_path / "second").mkdir()
    second = ProxyProcess(
        tmp_path / "second", upstream.url, buffer={"path": str(first.workdir / "buffer")}
    )
    second.start()
    assert second.proc is not None
    assert second.proc.wait(15) == 1
    lines = [x for x in second.log_lines() if x.get("event") == "buffer_unusable"]
    assert len(lines) == 1 and "in use by another process" in lines[0]["error"]
    async with aiohttp.ClientSession() as s, s.get(f"{first.url}/readyz") as r:
        assert r.status == 200


@pytest.mark.parametrize(
    ("config", "env", "needle"),
    [
        ("server:\n  portt: 1\n", {}, "server.portt"),
        ("server:\n  port: eighty\n", {}, "server.port"),
        ("", {"PROXY_UPSTREAM_TIMEOUT_S": "soon"}, "PROXY_UPSTREAM_TIMEOUT_S"),
    ],
)
def test_bad_config_exits_1_with_one_clear_line(
    tmp_path: Path, config: str, env: dict[str, str], needle: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    assert needle in refused_start(path, env)


def test_config_path_may_come_from_proxy_config(tmp_path: Path) -> None:
    path = tmp_path / "from-env.yaml"
    path.write_text("upstream:\n  retry:\n    sleepy: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin", "PROXY_CONFIG": str(path)},
    )
    assert result.returncode == 1
    assert "upstream.retry.sleepy" in result.stdout, "the file named by PROXY_CONFIG was read"


def children_of(pid: int) -> set[int]:
    """Processes whose parent is `pid`, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(60)
async def test_the_parser_worker_does_not_outlive_a_killed_proxy(
    spawn: Any, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    """Found by the attack pass: after kill -9 of the proxy its parser worker (and the
    resource tracker it holds open) lived on as orphans."""
    proxy = spawn()
    proxy.start()
    await proxy.wait_ready()
    body = json.dumps({"batch": [{"type": "page", "p": "x" * 100}] * 1000}).encode()
    async with session.post(
        f"{proxy.url}/v1/batch",
        data=body,
        headers={"X-Write-Key": KEY, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200  # large enough for the worker process
    workers = children_of(proxy.pid)
    assert workers, "no worker process was started"
    proxy.kill()
    # Times out if the worker outlives the proxy.
    await until(lambda: not any(alive(pid) for pid in workers), timeout=10)
