"""The first-party tracking scripts (`/p.js`, and the classic `/s/lib.js`): fetched from
upstream, cached in memory and on disk, rewritten to the proxy's own event paths, served with
ETag / 304 / gzip.

jitsu-js sends events to the origin it was loaded from (research notes §4.1), so serving the
script from the proxy is what makes a page's events come back here with no other setup.
When the origin cannot be reached the last good copy keeps being served (stale-on-error).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import aiohttp
import structlog
from prometheus_client import Counter

from proxy.auth import strip_url_credentials
from proxy.errors import ProxyError
from proxy.metrics import Metrics

log = structlog.get_logger("proxy.script")

JITSU_EVENT_PATH = b"/api/s/"


class ScriptUnavailableError(ProxyError):
    """No copy of the script has ever been fetched (cold start with upstream unreachable)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """The script as served: rewritten body, its gzip form, and an ETag of these bytes."""

    body: bytes
    gzipped: bytes
    etag: str


def rewrite(raw: bytes, event_prefix: str) -> bytes:
    """Point the script's hard-coded `/api/s/` at the proxy's own event prefix."""
    if not event_prefix or event_prefix.rstrip("/") == "/api/s":
        return raw
    return raw.replace(JITSU_EVENT_PATH, event_prefix.rstrip("/").encode() + b"/")


def make_variant(raw: bytes, event_prefix: str) -> Variant:
    body = rewrite(raw, event_prefix)
    # The ETag names the bytes we serve, so it changes with the rewrite, not only upstream's.
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return Variant(body=body, gzipped=gzip.compress(body, compresslevel=6, mtime=0), etag=etag)


def etag_matches(if_none_match: str, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


class ScriptCache:
    def __init__(
        self,
        origin: str,
        cache_dir: Path,
        event_prefix: str,
        refresh_s: float,
        timeout_s: float = 10.0,
        max_bytes: int = 2 * 1024 * 1024,
        name: str = "p.js",
        proxy: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.origin = origin
        # The egress proxy for the origin (upstream.trust_env), None to connect directly.
        self.proxy = proxy
        # Served from the cache or not, and how fetches went (proxy_script_*_total).
        self._requests = metrics.script_requests if metrics is not None else None
        self._refreshes = metrics.script_refreshes if metrics is not None else None
        # The file name of the disk copy; one cache per script, each with its own.
        self.name = name
        self.log = log.bind(script=name)
        self.max_bytes = max_bytes
        self.cache_dir = cache_dir
        self.event_prefix = event_prefix
        self.refresh_s = refresh_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.variant: Variant | None = None
        self.fetched_at = 0.0
        self.last_error: str | None = None
        self._origin_etag: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        # Set once the first fetch has ended, well or not: a cold start waits for it, no more.
        self._attempted = asyncio.Event()

    @property
    def _file(self) -> Path:
        return self.cache_dir / self.name

    @property
    def _meta(self) -> Path:
        return self.cache_dir / f"{self.name}.json"

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._load_disk_copy()
        self._task = asyncio.create_task(self._refresh_loop(), name=f"script-refresh-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def get(self, wait_s: float = 5.0) -> Variant:
        """The current variant; on a cold start, wait (a little) for the first fetch."""
        result = "hit"
        if self.variant is None:
            result = "miss"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._attempted.wait()
        if self.variant is None:
            result = "unavailable"
        self._count(self._requests, result)
        if self.variant is None:
            raise ScriptUnavailableError(
                "tracking script not available yet: "
                + (self.last_error or "first fetch still running")
            )
        return self.variant

    def _count(self, counter: Counter | None, result: str) -> None:
        if counter is not None:
            counter.labels(self.name, result).inc()

    def _load_disk_copy(self) -> None:
        try:
            raw = self._file.read_bytes()
            meta = json.loads(self._meta.read_text())
        except (OSError, ValueError):
            return
        self._origin_etag = meta.get("etag")
        self._install(raw)
        self.log.info("script_loaded_from_disk", bytes=len(raw))

    def _install(self, raw: bytes) -> None:
        self.variant = make_variant(raw, self.event_prefix)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # whatever upstream answers, the loop goes on
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._count(self._refreshes, "failed")
                self.log.exception("script_refresh_failed")
            finally:
                self._attempted.set()
            delay = self.refresh_s if self.last_error is None else min(self.refresh_s, 5.0)
            await asyncio.sleep(delay)

    async def refresh(self) -> None:
        assert self._session is not None
        headers = {}
        if self._origin_etag and self.variant is not None:
            headers["If-None-Match"] = self._origin_etag
        try:
            async with self._session.get(
                self.origin, headers=headers, timeout=self.timeout, proxy=self.proxy
            ) as resp:
                if resp.status == 304:
                    self.fetched_at = time.time()
                    self.last_error = None
                    self._count(self._refreshes, "unchanged")
                    return
                if resp.status != 200:
                    raise _FetchError(f"script origin answered {resp.status}")
                # A script is tens of kilobytes; an origin sending more is broken or hostile.
                raw = await self._read_capped(resp)
                if not raw.strip():
                    raise _FetchError("script origin answered an empty body")
                etag = resp.headers.get("ETag")
        except (aiohttp.ClientError, TimeoutError, _FetchError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.last_error = strip_url_credentials(error)
            self.log.warning(
                "script_fetch_failed", error=self.last_error, serving_stale=self.variant is not None
            )
            self._count(self._refreshes, "failed")
            return
        # Hashing and gzip release the GIL: off the event loop, they cost ingest nothing.
        variant = await asyncio.to_thread(make_variant, raw, self.event_prefix)
        self._origin_etag = etag
        self.fetched_at = time.time()
        self.last_error = None
        self.variant = variant
        self._count(self._refreshes, "updated")
        await asyncio.to_thread(self._save, raw, etag)
        self.log.info("script_fetched", bytes=len(raw))

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := await resp.content.read(64 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                raise _FetchError(f"script larger than script.max_bytes ({self.max_bytes})")
            chunks.append(chunk)
        return b"".join(chunks)

    def _save(self, raw: bytes, etag: str | None) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # Each worker process keeps its own copy and writes the file: never the same tmp.
            tmp = self._file.with_name(f".{self.name}.{os.getpid()}.tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, self._file)
            self._meta.write_text(json.dumps({"etag": etag, "fetched_at": self.fetched_at}))
        except OSError as exc:
            self.log.warning("script_cache_write_failed", error=str(exc))


class _FetchError(Exception):
    pass
