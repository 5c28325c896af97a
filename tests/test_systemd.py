"""deploy/systemd: the unit passes systemd's own checks, sets only real config keys, and its
command line, with its environment, serves and drains.

systemd is not PID 1 on our machines, so the unit itself is never started: `systemd-analyze`
checks it offline, and its ExecStart runs as a child process with the unit's environment,
NoNewPrivileges and the kernel's W^X switch (what MemoryDenyWriteExecute= asks for)."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import load_config
from tests.fakejitsu import FakeJitsu
from tests.procs import ROOT, post_events
from tests.test_console_script import CHECKOUT, installed_script

SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "jitsu-edge-proxy.service"
ENV_FILE = SYSTEMD / "jitsu-edge-proxy.env"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")

# NoNewPrivileges=yes and MemoryDenyWriteExecute=yes for what exec's after them. The latter as
# the kernel's PR_SET_MDWE (Linux 6.3+, inherited by forks and kept across execve), which
# systemd itself uses where the kernel has it; "mdwe" as the first argument turns it on.
SANDBOX = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_NO_NEW_PRIVS failed")
if sys.argv[1] == "mdwe" and libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE failed: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[2], sys.argv[2:])
"""


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values in order (Environment= and SystemCallFilter= repeat, which
    configparser refuses). Every line must be a comment, a section header or key=value."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith(("#", ";")):
            continue
        if text.startswith("[") and text.endswith("]"):
            current = sections.setdefault(text[1:-1], {})
            continue
        key, sep, value = text.partition("=")
        assert current is not None and sep and key.strip().isidentifier(), f"line {number}: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file_entries(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, line
            out[key.strip()] = value.strip()
    return out


def unit_environment(state_dir: Path) -> dict[str, str]:
    """What the unit's processes get: Environment= with %S (the state root) resolved, then the
    example EnvironmentFile=, whose values win."""
    env = {}
    for assignment in unit_entries(UNIT)["Service"]["Environment"]:
        key, _, value = assignment.partition("=")
        env[key] = value.replace("%S", str(state_dir))
    return {**env, **env_file_entries(ENV_FILE)}


def test_unit_sets_real_config_keys_and_its_buffer_is_the_state_directory(
    tmp_path: Path,
) -> None:
    service = unit_entries(UNIT)["Service"]
    env = unit_environment(tmp_path)
    assert all(name.startswith("PROXY_") for name in env)
    # Every override names a real config key with a valid value (unknown PROXY_* are refused),
    # over the config.yaml the install steps copy to /etc/jitsu-edge-proxy/.
    config = load_config(ROOT / "config.yaml", env)
    (state,) = service["StateDirectory"]
    assert config.buffer.path == str(tmp_path / state)
    assert service["EnvironmentFile"] == ["-/etc/jitsu-edge-proxy/env"]
    # Room for the two drain phases of a graceful stop, as in the image.
    assert service["KillSignal"] == ["SIGTERM"]
    assert int(service["TimeoutStopSec"][0]) > 2 * config.server.shutdown_timeout_s
    assert service["CapabilityBoundingSet"] == [""]
    assert config.server.port >= 1024, "a privileged port needs CAP_NET_BIND_SERVICE"


@needs_analyze
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: the copy points at the installed script.
    unit = tmp_path / UNIT.name
    (program, *_) = shlex.split(unit_entries(UNIT)["Service"]["ExecStart"][0])
    unit.write_text(UNIT.read_text().replace(program, installed_script()[0]))
    result = subprocess.run(
        [str(ANALYZE), "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    # An unknown key or a bad value is only a warning to systemd: any output fails the test.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The hardening kept: an exposure of at most 2.0 of 10 ("OK"; the threshold is in tenths).
    result = subprocess.run(
        [str(ANALYZE), "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def syscalls(group: str) -> set[str]:
    """The system calls of a @group, nested groups expanded, as systemd lists them."""
    out = subprocess.run(
        [str(ANALYZE), "syscall-filter", "--no-pager", group],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        name = line.strip()
        if name.startswith("@"):
            names |= syscalls(name)
        elif name and not name.startswith("#"):
            names.add(name)
    return names


@needs_analyze
def test_the_syscall_filter_allows_what_the_supervisor_and_buffer_call() -> None:
    allowed: set[str] = set()
    for entry in unit_entries(UNIT)["Service"]["SystemCallFilter"]:
        deny = entry.startswith("~")
        names = set().union(*(syscalls(g) for g in entry.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    # prctl(PR_SET_PDEATHSIG) and SO_REUSEPORT in the workers, the CPU count, sqlite's syncs.
    needed = {"prctl", "setsockopt", "sched_getaffinity", "clone", "fdatasync", "fsync"}
    assert needed <= allowed, needed - allowed


def mdwe_works() -> bool:
    result = subprocess.run([sys.executable, "-c", SANDBOX, "mdwe", "/bin/true"], check=False)
    return result.returncode == 0


@pytest.mark.timeout(90)
async def test_exec_start_with_the_units_environment_serves_and_drains(
    spawn: Any, upstream: FakeJitsu, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (program, *args) = shlex.split(unit_entries(UNIT)["Service"]["ExecStart"][0])
    assert Path(program).name == "jitsu-edge-proxy"
    proxy = spawn()
    # ProxyProcess adds `--config <its file>`: the unit's own config, where install puts it.
    assert args == ["--config", "/etc/jitsu-edge-proxy/config.yaml"]
    shutil.copyfile(ROOT / "config.yaml", proxy.config_path)
    state = tmp_path / "state"
    env = unit_environment(state)
    (state / "jitsu-edge-proxy").mkdir(parents=True, mode=0o750)  # systemd's StateDirectory=
    # Only where it listens and what it forwards to differ from the example env file.
    env |= {
        "PROXY_SERVER_HOST": "127.0.0.1",
        "PROXY_SERVER_PORT": str(proxy.port),
        "PROXY_UPSTREAM_URL": upstream.url,
    }
    sandbox = [sys.executable, "-c", SANDBOX, "mdwe" if mdwe_works() else "-"]
    proxy.start(env={**env, **CHECKOUT}, program=[*sandbox, *installed_script()])
    await proxy.wait_ready(timeout=30)
    async with session.get(f"{proxy.url}/healthz") as resp:
        assert resp.status == 200
    assert await post_events(session, proxy, ["unit-1"]) == {"unit-1"}
    await upstream.wait_for(lambda f: "unit-1" in f.delivered_ids(), timeout=15)
    assert any((state / "jitsu-edge-proxy").iterdir()), "the buffer is in the state directory"
    # KillMode=control-group: SIGTERM to every process of the unit at once.
    assert proxy.proc is not None
    os.killpg(proxy.proc.pid, signal.SIGTERM)
    stop_timeout = int(unit_entries(UNIT)["Service"]["TimeoutStopSec"][0])
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, stop_timeout)
    assert code == 0, proxy.log_text()[-3000:]
    assert proxy.log_lines()[-1]["event"] == "proxy_stopped"
