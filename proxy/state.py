"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.clientip import Network
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.offload import Offload
from proxy.ratelimit import TokenBuckets
from proxy.refusals import KeyRefusals

if TYPE_CHECKING:
    from proxy.buffer import Buffer
    from proxy.forwarder import Forwarder
    from proxy.script import ScriptCache


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


APP_STATE = web.AppKey("state", AppState)

# Per-request facts the access-log line reports.
BROWSER_ROUTE = web.RequestKey("browser_route", bool)
KEY_ID = web.RequestKey("key_id", str)
EVENT_COUNT = web.RequestKey("events", int)
