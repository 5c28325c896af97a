"""wrk, the load generator of the maximum-rate runs: found or installed from Debian's packages,
run with bench/post.lua (POST bodies with a messageId of their own each), its output parsed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

LUA = Path(__file__).with_name("post.lua")
INSTALL_TIMEOUT_S = 180.0

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


@dataclasses.dataclass(frozen=True)
class WrkResult:
    requests: int  # answered, whatever the status
    seconds: float
    non_2xx: int  # wrk counts statuses above 399 ("Non-2xx or 3xx responses")
    socket_errors: int  # connect, read, write and timeout errors together
    latency_ms: dict[int, float]  # percentile -> milliseconds (50, 75, 90, 99)

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx


class WrkOutputError(ValueError):
    pass


def _ms(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def parse_output(text: str) -> WrkResult:
    """wrk's text report (run with --latency) as numbers."""
    total = re.search(rf"(\d+) requests in {_DURATION}", text)
    if total is None:
        raise WrkOutputError(f"no request count in wrk's output:\n{text}")
    latency = {
        int(m[1]): _ms(m[2], m[3])
        for m in re.finditer(rf"^\s+(50|75|90|99)(?:\.0+)?%\s+{_DURATION}\s*$", text, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return WrkResult(
        requests=int(total[1]),
        seconds=_ms(total[2], total[3]) / 1e3,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        latency_ms=latency,
    )


def find_or_install() -> tuple[str | None, str]:
    """wrk's path, or None and why not. Installs Debian's package when it is missing and this
    process may (root, apt-get present); the bench then falls back to its own generator."""
    found = shutil.which("wrk")
    if found:
        return found, "wrk found"
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        return None, "wrk missing and not installable here (needs root and apt-get)"
    print("bench: installing wrk (apt-get install -y wrk) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "wrk"]
    try:
        done = subprocess.run(install, env=env, capture_output=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:  # stale package lists, most likely: refresh them once
            subprocess.run([apt, "update"], env=env, capture_output=True, timeout=INSTALL_TIMEOUT_S)
            done = subprocess.run(install, env=env, capture_output=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"apt-get took over {INSTALL_TIMEOUT_S:.0f} s"
    found = shutil.which("wrk")
    if done.returncode != 0 or found is None:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return None, f"apt-get install wrk failed ({done.returncode}): {tail[0]}"
    return found, "wrk installed from Debian's packages"


def command(
    wrk: str,
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    run_id: int,
    events_per_request: int,
    write_key: str,
    event_head: str,
    event_tail: str,
) -> list[str]:
    """The wrk command line; everything after `--` goes to post.lua's init()."""
    return [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA),
        url,
        "--",
        str(run_id),
        str(events_per_request),
        write_key,
        event_head,
        event_tail,
    ]


async def run(argv: list[str], timeout_s: float) -> WrkResult:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise WrkOutputError(f"wrk exited with {proc.returncode}: {err.decode(errors='replace')}")
    return parse_output(text)
