"""The `jitsu-edge-proxy` console script as pip installs it: the same program as
`python -m proxy`, and main()'s return value is the process's exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakejitsu import FakeJitsu
from tests.procs import ROOT, post_events

# pip puts it beside the venv's python (`make install`: pyproject.toml's [project.scripts]).
SCRIPT = Path(sys.executable).parent / "jitsu-edge-proxy"
# The script imports `proxy` from wherever the venv was installed from; this checkout's, here.
CHECKOUT = {"PYTHONPATH": str(ROOT)}


def installed_script() -> list[str]:
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is missing: `make install` creates it"
    return [str(SCRIPT)]


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    return subprocess.run(
        [*installed_script(), *args],
        env={**environ, **CHECKOUT, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_help_names_the_script_and_its_options() -> None:
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: jitsu-edge-proxy ")
    assert "--config" in result.stdout


@pytest.mark.timeout(60)
async def test_serves_relays_and_drains_on_sigterm(
    spawn: Any, upstream: FakeJitsu, session: aiohttp.ClientSession
) -> None:
    proxy = spawn()
    proxy.start(env=CHECKOUT, program=installed_script())
    await proxy.wait_ready()
    async with session.get(f"{proxy.url}/healthz") as resp:
        assert resp.status == 200
    accepted = await post_events(session, proxy, ["script-1"])
    assert accepted == {"script-1"}
    await upstream.wait_for(lambda f: "script-1" in f.delivered_ids(), timeout=15)
    assert await proxy.terminate_async() == 0
    assert proxy.log_lines()[-1]["event"] == "proxy_stopped"


def test_bad_config_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  port: eighty\n")
    result = run_script("--config", str(config))
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert '"config_invalid"' in line and "server.port" in line
