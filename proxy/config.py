"""Loads and validates `config.yaml`, then applies `PROXY_<SECTION>_<KEY>` environment overrides.

Every key is declared once, in the dataclasses below; their field types drive validation.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.egress import build_egress
from proxy.errors import ConfigError

ENV_PREFIX = "PROXY"
IP_POLICIES = frozenset({"keep", "stripLastOctet", "remove"})
CLIENT_IP_HEADERS = frozenset(
    {"x-forwarded-for", "x-real-ip", "cf-connecting-ip", "true-client-ip", "forwarded"}
)
# RFC 9110 token characters: what a header name is made of.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Headers upstream.drop_headers cannot remove, and what to use instead.
KEPT_HEADERS = {
    "content-type": "Jitsu refuses a body without it",
    "x-write-key": "it carries the write key",
    "x-real-ip": "privacy.ip_policy: remove sends no client IP",
    "x-forwarded-for": "privacy.ip_policy: remove sends no client IP",
    "host": "the client's Host goes upstream only with upstream.preserve_host",
}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    # Peers whose X-Forwarded-For / X-Real-IP are believed (CIDRs). Everyone else is the client.
    trusted_proxies: list[str] = dataclasses.field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"]
    )
    # Which of a trusted peer's headers name the client, tried in order. Add
    # CF-Connecting-IP, True-Client-IP or Forwarded when the trusted proxy sets them.
    client_ip_headers: list[str] = dataclasses.field(
        default_factory=lambda: ["X-Forwarded-For", "X-Real-IP"]
    )
    shutdown_timeout_s: float = 10.0
    # A connection that is idle, or whose request headers have not all arrived, is closed after
    # this long (slowloris). Jitsu's own ingest allows 5 s for headers and 65 s idle.
    idle_timeout_s: float = 15.0
    # The whole request body must arrive within this (slow-body clients get 408).
    body_timeout_s: float = 10.0
    max_headers: int = 100
    # Longest request line or single header field, in bytes (aiohttp answers 400 beyond it).
    max_header_bytes: int = 8190
    # A second listener for /metrics and /readyz (and /healthz), so that they need not face the
    # internet; the public port then answers them 404. 0: off, everything on `port`.
    admin_port: int = 0
    admin_host: str = "127.0.0.1"
    # Without an admin port: the client IPs (CIDRs, resolved through trusted_proxies) that may
    # read /metrics and /readyz on the public port; others get 404. Empty: anyone.
    admin_allow: list[str] = dataclasses.field(default_factory=list)
    # Worker processes serving `port` together (SO_REUSEPORT), each with a buffer shard of its
    # own; 0: one per CPU this process may use. 1: no supervisor, the process serves itself.
    workers: int = 0


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    multiplier: float = 2.0
    # Attempts made inside one forwarding request (aiohttp-retry) before the event goes back to
    # waiting in the buffer, where it is retried for as long as it takes.
    request_attempts: int = 3
    # Upper bound on a Retry-After we obey, so a broken upstream cannot pin us for days.
    max_retry_after_s: float = 900.0
    # Failed deliveries of one row, each while other rows went through, before that row is
    # dead-lettered. Failures during an outage (every row failing) never count.
    max_row_failures: int = 10


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:3049"
    timeout_s: float = 30.0
    concurrency: int = 16
    # A batch is forwarded in pieces of at most this many bytes (each with the batch's
    # context), so that no load balancer's body limit in front of Jitsu refuses it.
    max_batch_bytes: int = 1024 * 1024
    # Browser routes (/api/s/{type}): after the commit, send the event at once and answer the
    # browser with Jitsu's own answer (device destinations included) if it comes within
    # sync_timeout_s; else {"ok":true} and the forwarder delivers it as usual (issue 8).
    sync_browser: bool = True
    sync_timeout_s: float = 1.0
    # Rows sent at once for browser answers, on top of `concurrency`; past it, {"ok":true}.
    sync_max_in_flight: int = 256
    # How long upstream's "stream not found" for a key (per route kind and Host) is
    # remembered and answered at the edge, without buffering; 0 = never remembered.
    key_refusal_ttl_s: float = 60.0
    # What an ingress in front of Jitsu takes (nginx: a request line in 8 KB, 32 KB of
    # headers): a request whose upstream form is larger is refused at the edge (414 / 431)
    # rather than kept as a row no ingress will ever pass on.
    max_url_bytes: int = 8000
    max_header_bytes: int = 32 * 1024
    # Send the client's Host upstream instead of upstream.url's, for installations that find
    # streams by the Host's slug or custom domain (Jitsu's getDataLocator).
    preserve_host: bool = False
    # More request headers (names, any case) that never go upstream nor into the buffer.
    drop_headers: list[str] = dataclasses.field(default_factory=list)
    # Buffered single events that Jitsu would treat alike (same key, route kind, client IP,
    # IP policy, user agent, language and other headers) go upstream together in one batch
    # request (proxy.coalesce); false: one upstream request per buffered request.
    coalesce: bool = True
    # On-prem networks (issue 10), for the forwarder and the script fetches alike. A PEM bundle
    # of a private CA trusted for an https upstream, on top of the system's trust store.
    ca_file: str = ""
    # A client certificate (PEM, chain after it) and its key for upstreams that require mTLS;
    # the password only if the key is encrypted.
    client_cert_file: str = ""
    client_key_file: str = ""
    client_key_password: str = ""
    # Reach upstream through the egress proxy of HTTPS_PROXY / HTTP_PROXY (http:// only),
    # except for hosts in NO_PROXY; read once at start. false: always connect directly.
    trust_env: bool = False
    retry: RetryConfig = dataclasses.field(default_factory=RetryConfig)


@dataclasses.dataclass(frozen=True)
class BufferConfig:
    path: str = "./data"
    max_bytes: int = 1024 * 1024 * 1024
    # true: every 2xx survives power loss (SQLite synchronous=FULL); false: survives kill -9 only.
    fsync: bool = True
    # Answer 503 while the filesystem has less free space than this.
    min_free_bytes: int = 64 * 1024 * 1024
    # Bound of the dead-letter store; beyond it the oldest dead letters are dropped, each drop
    # logged and counted (proxy_dead_letters_dropped_total).
    max_dead_letter_bytes: int = 256 * 1024 * 1024
    # One log warning (buffer_high_water) when the buffer holds this share of max_bytes, one
    # info line when it is back a tenth below; 0: no warning.
    warn_fill_ratio: float = 0.8
    # One log warning (backlog_old) when the oldest waiting event is this old (seconds), one
    # info line when the oldest is back under half of it; 0: no warning.
    warn_age_s: float = 3600.0


@dataclasses.dataclass(frozen=True)
class LimitsConfig:
    # Bytes of a request body as it arrives, whatever its Content-Encoding says.
    max_request_bytes: int = 4 * 1024 * 1024
    # Bytes of a batch body after gzip decompression (bomb guard).
    max_decompressed_bytes: int = 16 * 1024 * 1024
    # Gzip members in one body (a body may be several gzip streams back to back).
    max_gzip_members: int = 100
    # One event, serialised. Jitsu's MAX_INGEST_PAYLOAD_SIZE default is 1 000 000.
    max_event_bytes: int = 1_000_000
    # Events in one batch request; more is refused (413) before they are parsed.
    max_batch_events: int = 10_000
    # Per-event errors listed in a batch answer; the rest are counted in one last line.
    max_batch_errors: int = 100
    # Bodies larger than this (gzip ones: a 64th of it) are parsed in a worker process.
    inline_parse_bytes: int = 64 * 1024
    # Large requests waiting for that worker; more are answered 503 with Retry-After.
    max_parse_queue: int = 8


@dataclasses.dataclass(frozen=True)
class RoutesConfig:
    # Keep Jitsu's own paths (/api/s/..., /v1/batch..., /p.js) so existing snippets work.
    jitsu_paths: bool = True
    # Extra paths serving the tracking script, e.g. /assets/app.js.
    script_paths: list[str] = dataclasses.field(default_factory=list)
    # A neutral prefix for event routes, e.g. /collect: /collect/{type}, /collect/s2s/{type}.
    # The script served by the proxy then sends its events there.
    event_prefix: str = ""
    # Extra batch paths (Segment-style), forwarded upstream as /v1/batch.
    batch_paths: list[str] = dataclasses.field(default_factory=list)
    # Write key per first-party Host, for event requests that carry none. Jitsu finds such
    # streams by Host, which it cannot see behind the proxy (research notes §2.3).
    host_keys: dict[str, str] = dataclasses.field(default_factory=dict)
    # The ITP visitor-id endpoint for jitsu-js's `idEndpoint` option; empty switches it off.
    id_path: str = "/api/id"


@dataclasses.dataclass(frozen=True)
class ScriptConfig:
    # Where /p.js comes from; empty means <upstream.url>/p.js.
    origin: str = ""
    refresh_s: float = 120.0
    cache_control: str = "public, max-age=120"
    # A larger script from the origin is refused (the last good copy stays in service).
    max_bytes: int = 2 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class RateLimitConfig:
    # Requests per second; 0 switches the limit off. Burst 0 means "one second's worth".
    per_ip_rps: float = 0.0
    per_ip_burst: int = 0
    per_key_rps: float = 0.0
    per_key_burst: int = 0


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    # Write-key ids (the part before ':') this proxy relays; empty relays any key. Others are
    # answered as Jitsu answers an unknown key, without reaching upstream.
    allowed_key_ids: list[str] = dataclasses.field(default_factory=list)
    rate_limit: RateLimitConfig = dataclasses.field(default_factory=RateLimitConfig)


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    # keep | stripLastOctet | remove: applied to the client IP before it is written to disk.
    ip_policy: str = "keep"
    # Domain for the visitor cookies the proxy sets (pixel, id endpoint); empty: the
    # registrable domain of the request's Host (www.shop.example.com -> example.com).
    cookie_domain: str = ""


@dataclasses.dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    # json | console | auto (console on a TTY, JSON otherwise)
    format: str = "auto"


@dataclasses.dataclass(frozen=True)
class Config:
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    upstream: UpstreamConfig = dataclasses.field(default_factory=UpstreamConfig)
    buffer: BufferConfig = dataclasses.field(default_factory=BufferConfig)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    routes: RoutesConfig = dataclasses.field(default_factory=RoutesConfig)
    script: ScriptConfig = dataclasses.field(default_factory=ScriptConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)


def load_config(
    path: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    *,
    egress: bool = True,
) -> Config:
    """Read the YAML file (if any), apply environment overrides, validate, return a Config.
    egress=False skips reading the TLS files and the egress proxy: for the offline commands,
    which never talk to upstream and may run where those files are not readable."""
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if raw is None:
            raw = {}
    return build_config(raw, os.environ if environ is None else environ, egress=egress)


def build_config(raw: Any, environ: Mapping[str, str], *, egress: bool = True) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping at the top level")
    config: Config = _build(Config, raw, prefix="")
    _reject_unknown_env(environ)
    config = _apply_env(config, environ, (ENV_PREFIX,), "")
    _check(config)
    # The TLS files and the egress proxy are read now, so that a bad one stops the start.
    if egress:
        build_egress(config.upstream, environ)
    return config


def _env_names(cls: type, parts: tuple[str, ...]) -> set[str]:
    names: set[str] = set()
    for name, tp in _field_types(cls).items():
        here = (*parts, name.upper())
        if dataclasses.is_dataclass(tp):
            names |= _env_names(typing.cast(type, tp), here)
        else:
            names.add("_".join(here))
    return names


def _reject_unknown_env(environ: Mapping[str, str]) -> None:
    """A misspelt override (PROXY_SERVER_PROT) must not be silently ignored."""
    known = _env_names(Config, (ENV_PREFIX,))
    sections = tuple(f"{ENV_PREFIX}_{f.name.upper()}_" for f in dataclasses.fields(Config))
    for name in sorted(environ):
        if name.startswith(sections) and name not in known:
            raise ConfigError(f"unknown environment override {name}: no such config key")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key: {name}")
        values[key] = _convert(hints[key], value, name)
    return cls(**values)


def _convert(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name}: expected a mapping, got {_kind(value)}")
        return _build(typing.cast(type, tp), value, prefix=f"{name}.")
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name}: expected a mapping, got {_kind(value)}")
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ConfigError(f"config key {name}: keys and values must be strings")
        return {k.lower(): v for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {name}: expected a list, got {_kind(value)}")
        return [_convert(item_tp, item, f"{name}[{i}]") for i, item in enumerate(value)]
    if isinstance(origin, type) and issubclass(origin, types.UnionType):  # pragma: no cover
        raise ConfigError(f"config key {name}: unsupported type")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key {name}: expected a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {name}: expected {tp.__name__}, got {_kind(value)}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _apply_env(
    obj: Any, environ: Mapping[str, str], env_parts: tuple[str, ...], prefix: str
) -> Any:
    hints = _field_types(type(obj))
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        tp = hints[field.name]
        parts = (*env_parts, field.name.upper())
        name = f"{prefix}{field.name}"
        current = getattr(obj, field.name)
        if dataclasses.is_dataclass(tp):
            changes[field.name] = _apply_env(current, environ, parts, f"{name}.")
            continue
        env_name = "_".join(parts)
        if env_name in environ:
            changes[field.name] = _from_env(tp, environ[env_name], env_name, name)
    return dataclasses.replace(obj, **changes)


def _from_env(tp: Any, text: str, env_name: str, name: str) -> Any:
    where = f"environment variable {env_name} (config key {name})"
    if typing.get_origin(tp) is dict:
        out: dict[str, str] = {}
        for item in text.split(","):
            if not item.strip():
                continue
            k, sep, v = item.partition("=")
            if not sep or not k.strip() or not v.strip():
                raise ConfigError(f"{where}: expected host=value pairs, got {item.strip()!r}")
            out[k.strip().lower()] = v.strip()
        return out
    if typing.get_origin(tp) is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{where}: expected a boolean, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected int, got {text!r}") from None
    if tp is float:
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {text!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {text!r}")
        return number
    return text


def _check(config: Config) -> None:
    """Value checks that types alone cannot express."""
    problems: list[tuple[str, bool]] = [
        ("server.port", not 0 <= config.server.port <= 65535),
        ("server.shutdown_timeout_s", config.server.shutdown_timeout_s < 0),
        ("server.idle_timeout_s", config.server.idle_timeout_s <= 0),
        ("server.body_timeout_s", config.server.body_timeout_s <= 0),
        ("server.max_headers", config.server.max_headers < 1),
        ("server.max_header_bytes", config.server.max_header_bytes < 256),
        ("server.admin_port", not 0 <= config.server.admin_port <= 65535),
        ("server.admin_host", not config.server.admin_host),
        ("server.workers", not 0 <= config.server.workers <= 256),
        ("upstream.url", not config.upstream.url.startswith(("http://", "https://"))),
        ("upstream.timeout_s", config.upstream.timeout_s <= 0),
        ("upstream.concurrency", config.upstream.concurrency < 1),
        ("upstream.retry.initial_backoff_s", config.upstream.retry.initial_backoff_s <= 0),
        (
            "upstream.retry.max_backoff_s",
            config.upstream.retry.max_backoff_s < config.upstream.retry.initial_backoff_s,
        ),
        ("upstream.retry.multiplier", config.upstream.retry.multiplier < 1),
        ("upstream.retry.request_attempts", config.upstream.retry.request_attempts < 1),
        ("upstream.retry.max_retry_after_s", config.upstream.retry.max_retry_after_s < 0),
        ("upstream.retry.max_row_failures", config.upstream.retry.max_row_failures < 1),
        ("upstream.max_batch_bytes", config.upstream.max_batch_bytes < 1024),
        ("upstream.sync_timeout_s", config.upstream.sync_timeout_s <= 0),
        ("upstream.sync_max_in_flight", config.upstream.sync_max_in_flight < 1),
        ("upstream.key_refusal_ttl_s", config.upstream.key_refusal_ttl_s < 0),
        ("upstream.max_url_bytes", config.upstream.max_url_bytes < 256),
        ("upstream.max_header_bytes", config.upstream.max_header_bytes < 1024),
        ("buffer.path", not config.buffer.path),
        ("buffer.max_bytes", config.buffer.max_bytes <= 0),
        ("buffer.min_free_bytes", config.buffer.min_free_bytes < 0),
        ("buffer.max_dead_letter_bytes", config.buffer.max_dead_letter_bytes <= 0),
        ("buffer.warn_fill_ratio", not 0 <= config.buffer.warn_fill_ratio <= 1),
        ("buffer.warn_age_s", config.buffer.warn_age_s < 0),
        ("limits.max_request_bytes", config.limits.max_request_bytes <= 0),
        ("limits.max_decompressed_bytes", config.limits.max_decompressed_bytes <= 0),
        ("limits.max_event_bytes", config.limits.max_event_bytes <= 0),
        ("limits.max_gzip_members", config.limits.max_gzip_members < 1),
        ("limits.max_batch_events", config.limits.max_batch_events < 1),
        ("limits.max_batch_errors", config.limits.max_batch_errors < 0),
        ("limits.inline_parse_bytes", config.limits.inline_parse_bytes < 0),
        ("limits.max_parse_queue", config.limits.max_parse_queue < 1),
        ("security.rate_limit.per_ip_rps", config.security.rate_limit.per_ip_rps < 0),
        ("security.rate_limit.per_ip_burst", config.security.rate_limit.per_ip_burst < 0),
        ("security.rate_limit.per_key_rps", config.security.rate_limit.per_key_rps < 0),
        ("security.rate_limit.per_key_burst", config.security.rate_limit.per_key_burst < 0),
        ("privacy.ip_policy", config.privacy.ip_policy not in IP_POLICIES),
        ("log.level", config.log.level.lower() not in {"debug", "info", "warning", "error"}),
        ("log.format", config.log.format not in {"json", "console", "auto"}),
    ]
    for key, bad in problems:
        if bad:
            value = functools.reduce(getattr, key.split("."), config)
            raise ConfigError(f"config key {key}: invalid value {value!r}")
    routes = config.routes
    paths = [*routes.script_paths, *routes.batch_paths]
    if routes.id_path:
        paths.append(routes.id_path)
    if routes.event_prefix:
        paths.append(routes.event_prefix)
    for path in paths:
        if not path.startswith("/") or path.endswith("/") or "{" in path or "?" in path:
            raise ConfigError(
                f"config key routes: {path!r} must start with '/' and not end with '/'"
            )
    if not routes.jitsu_paths and not routes.event_prefix:
        raise ConfigError(
            "config key routes.jitsu_paths: false leaves no event route; set routes.event_prefix"
        )
    if config.script.origin and not config.script.origin.startswith(("http://", "https://")):
        raise ConfigError(f"config key script.origin: invalid value {config.script.origin!r}")
    if config.script.max_bytes < 1024:
        raise ConfigError(f"config key script.max_bytes: invalid value {config.script.max_bytes}")
    if config.script.refresh_s <= 0:
        raise ConfigError(f"config key script.refresh_s: invalid value {config.script.refresh_s}")
    for i, name in enumerate(config.server.client_ip_headers):
        if name.lower() not in CLIENT_IP_HEADERS:
            raise ConfigError(
                f"config key server.client_ip_headers[{i}]: {name!r} is not one of "
                + ", ".join(sorted(CLIENT_IP_HEADERS))
            )
    if config.server.admin_port and config.server.admin_port == config.server.port:
        raise ConfigError(
            f"config key server.admin_port: {config.server.admin_port} is server.port too"
        )
    for i, name in enumerate(config.upstream.drop_headers):
        if not HEADER_NAME.fullmatch(name):
            raise ConfigError(f"config key upstream.drop_headers[{i}]: {name!r} is no header name")
        if name.lower() in KEPT_HEADERS:
            raise ConfigError(
                f"config key upstream.drop_headers[{i}]: {name!r} is one the proxy must send"
                f" ({KEPT_HEADERS[name.lower()]})"
            )
    for key in ("trusted_proxies", "admin_allow"):
        for i, cidr in enumerate(getattr(config.server, key)):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(
                    f"config key server.{key}[{i}]: {cidr!r} is not an IP network"
                ) from None
