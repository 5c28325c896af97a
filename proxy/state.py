"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.clientip import Network
from proxy.config import Config
from proxy.egress import Egress
from proxy.fleet import Fleet
from proxy.metrics import Metrics
from proxy.offload import Offload
from proxy.ratelimit import TokenBuckets
from proxy.refusals import KeyRefusals

if TYPE_CHECKING:
    from proxy.buffer import Buffer
    from proxy.forwarder import Forwarder
    from proxy.script import ScriptCache


@dataclasses.dataclass
class Adoption:
    """A shard of a worker that no longer exists, drained by this one."""

    buffer: Buffer
    forwarder: Forwarder | None = None


@dataclasses.dataclass
class AppState:
    config: Config
    metrics: Metrics
    trusted_proxies: tuple[Network, ...]
    buffer: Buffer
    ip_limits: TokenBuckets
    key_limits: TokenBuckets
    offload: Offload
    # Upstream's "stream not found" per key, answered at the edge (the forwarder fills it).
    refusals: KeyRefusals
    # How upstream is reached: TLS context and egress proxy, built once at start.
    egress: Egress
    forwarder: Forwarder | None = None
    script: ScriptCache | None = None
    # /s/lib.js, the Classic API's script (with routes.jitsu_paths).
    classic_script: ScriptCache | None = None
    # Canonical names of the public routes (ingest and script): CORS and request metrics.
    public_routes: frozenset[str] = frozenset()
    # server.admin_allow, parsed.
    admin_allow: tuple[Network, ...] = ()
    # upstream.drop_headers, lower case.
    drop_headers: frozenset[str] = frozenset()
    draining: bool = False
    # buffer.path: this worker's shard is in it (or is it); relative paths in answers start here.
    buffer_base: Path = Path()
    # With several workers: the others' reports, for /metrics and /readyz totals.
    fleet: Fleet | None = None
    # Shards no worker owns any more that this one found at start, and those it drains now.
    orphans: list[Path] = dataclasses.field(default_factory=list)
    adopted: list[Adoption] = dataclasses.field(default_factory=list)

    def buffers(self) -> list[Buffer]:
        """Every buffer this process sends from: its own, then the adopted ones."""
        return [self.buffer, *(a.buffer for a in self.adopted)]


APP_STATE = web.AppKey("state", AppState)

# Per-request facts the access-log line reports.
BROWSER_ROUTE = web.RequestKey("browser_route", bool)
KEY_ID = web.RequestKey("key_id", str)
EVENT_COUNT = web.RequestKey("events", int)
# Events a request carries once they are read: what a refusal of the whole request refuses.
EVENTS_AT_STAKE = web.RequestKey("events_at_stake", int)
