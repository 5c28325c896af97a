"""The proxy as a real child process: started from a config file, killed for real."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
KEY = "kid0000000000000000000000000000a:SecretPart0000000000000000000zz"
SECRET = KEY.split(":")[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Config overrides laid over a base, section by section, at any depth."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def refused_start(config_path: Path, env: dict[str, str] | None = None) -> str:
    """Start the proxy on a config it must refuse: exit 1, no traceback, and the one log
    line saying why, which is returned."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(config_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin", **(env or {})},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert '"config_invalid"' in lines[0]
    return lines[0]


class ProxyProcess:
    def __init__(self, workdir: Path, upstream_url: str, **overrides: Any) -> None:
        self.workdir = workdir
        self.port = free_port()
        config: dict[str, Any] = {
            # One process unless a test asks for workers: kill() then kills the whole proxy.
            "server": {
                "host": "127.0.0.1",
                "port": self.port,
                "shutdown_timeout_s": 5,
                "workers": 1,
            },
            "upstream": {
                "url": upstream_url,
                "timeout_s": 5,
                "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.3},
            },
            "buffer": {"path": str(workdir / "buffer"), "min_free_bytes": 0},
            "log": {"format": "json", "level": "debug"},
        }
        config = merge(config, overrides)
        self.admin_port = int(config["server"].get("admin_port", 0))
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """Where /readyz and /metrics answer: the admin listener when there is one."""
        return f"http://127.0.0.1:{self.admin_port}" if self.admin_port else self.url

    def start(self, env: dict[str, str] | None = None, program: list[str] | None = None) -> None:
        """`program` (default `python -m proxy`) started with `--config` this config."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
        environ.update(env or {})
        program = program or [sys.executable, "-m", "proxy"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*program, "--config", str(self.config_path)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                # A group of its own, with its workers: kill_group() reaches them all.
                start_new_session=True,
            )

    async def wait_ready(self, timeout: float = 15) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.log_text()
                try:
                    async with session.get(f"{self.admin_url}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"proxy not ready:\n{self.log_text()}")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    async def terminate_async(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit without blocking the loop, so that a fake upstream
        served by this loop keeps answering the proxy's last forwards."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def buffer_db(self) -> Path:
        return self.workdir / "buffer" / "buffer.db"

    @property
    def buffer_dbs(self) -> list[Path]:
        """The buffer files of every worker's shard (with one worker, just buffer_db)."""
        return [self.buffer_db, *sorted((self.workdir / "buffer").glob("shard-*/buffer.db"))]

    def rss_bytes(self) -> int | None:
        """Resident set size from /proc/<pid>/status (VmRSS), None once the process is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return None

    async def readyz(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """The /readyz body (it carries the buffer and upstream state), None if unreachable."""
        try:
            async with session.get(f"{self.admin_url}/readyz") as resp:
                body: dict[str, Any] = await resp.json()
                return body
        except (aiohttp.ClientError, ValueError):
            return None

    async def wait_state(
        self,
        session: aiohttp.ClientSession,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 30,
        what: str = "state",
    ) -> dict[str, Any]:
        """Poll /readyz until `predicate(body)` holds: proxy state has no event to wait on."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()[-4000:]
            state = await self.readyz(session)
            if state is not None and predicate(state):
                return state
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"proxy not in {what} within {timeout} s: {state}")
            await asyncio.sleep(0.05)

    async def wait_upstream_failing(
        self, session: aiohttp.ClientSession, failures: int = 3, timeout: float = 30
    ) -> None:
        """Until the forwarder has seen `failures` consecutive failed attempts."""
        await self.wait_state(
            session,
            lambda s: s.get("upstream", {}).get("consecutive_failures", 0) >= failures,
            timeout,
            f"{failures} consecutive upstream failures",
        )

    def kill_group(self) -> None:
        """SIGKILL to the proxy and all its workers at once."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            # Workers too, even those left draining when the supervisor went first.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "unparsed", "line": line})
        return out


# A fixture that builds a ProxyProcess for the running test, config overrides as keywords.
Spawn = Callable[..., ProxyProcess]


async def post_events(
    session: aiohttp.ClientSession, proxy: ProxyProcess, ids: list[str], concurrency: int = 16
) -> set[str]:
    """Send single events and batches; return the messageIds that got a 2xx."""
    accepted: set[str] = set()
    sem = asyncio.Semaphore(concurrency)

    async def one(chunk: list[str]) -> None:
        async with sem:
            if len(chunk) == 1:
                url, payload = (
                    f"{proxy.url}/api/s/s2s/track",
                    {"type": "track", "event": "e", "messageId": chunk[0]},
                )
            else:
                url, payload = (
                    f"{proxy.url}/v1/batch",
                    {"batch": [{"type": "track", "event": "e", "messageId": m} for m in chunk]},
                )
            try:
                async with session.post(url, json=payload, headers={"X-Write-Key": KEY}) as r:
                    if r.status == 200:
                        accepted.update(chunk)
            except aiohttp.ClientError:
                pass

    chunks, i = [], 0
    while i < len(ids):
        size = 1 if (i // 7) % 2 else 5
        chunks.append(ids[i : i + size])
        i += size
    await asyncio.gather(*(one(c) for c in chunks))
    return accepted


async def dead_letters_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy dead-letters ARGS --config CONFIG`, run to its end."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "dead-letters", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
