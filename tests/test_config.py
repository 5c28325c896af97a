"""Config loading: YAML file, PROXY_<SECTION>_<KEY> overrides, validation (proxy/config.py).

Every test passes an explicit `environ`, so the real process environment never leaks in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    BufferConfig,
    Config,
    LimitsConfig,
    LogConfig,
    RetryConfig,
    ServerConfig,
    UpstreamConfig,
    build_config,
    load_config,
)
from proxy.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(raw: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw, environ or {})
    return str(info.value)


# ---- defaults and files ------------------------------------------------------------------


def test_defaults_without_file() -> None:
    config = load_config(None, environ={})

    assert config == Config()
    assert config.server == ServerConfig(
        host="0.0.0.0",
        port=8080,
        trusted_proxies=["127.0.0.1/32", "::1/128"],
        shutdown_timeout_s=10.0,
    )
    assert config.upstream == UpstreamConfig(
        url="http://127.0.0.1:3049",
        timeout_s=30.0,
        concurrency=16,
        retry=RetryConfig(
            initial_backoff_s=1.0,
            max_backoff_s=30.0,
            multiplier=2.0,
            request_attempts=3,
            max_retry_after_s=900.0,
        ),
    )
    assert config.buffer == BufferConfig(
        path="./data", max_bytes=1024**3, fsync=True, min_free_bytes=64 * 1024**2
    )
    assert config.limits == LimitsConfig(
        max_request_bytes=4 * 1024**2,
        max_decompressed_bytes=16 * 1024**2,
        max_event_bytes=1_000_000,
    )
    assert config.log == LogConfig(level="info", format="auto")


def test_build_config_empty_mapping_is_defaults() -> None:
    assert build_config({}, {}) == Config()


def test_yaml_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
server:
  host: 127.0.0.1
  port: 9000
  trusted_proxies: ["10.0.0.0/8", "fd00::/8"]
upstream:
  url: https://ingest.example.com
  concurrency: 2
  retry:
    initial_backoff_s: 2      # an int is fine for a float
    max_backoff_s: 60.5
buffer:
  path: /var/lib/proxy
  fsync: false
limits:
  max_event_bytes: 500000
log:
  level: debug
  format: json
""",
    )

    config = load_config(path, environ={})

    assert config.server == ServerConfig(
        host="127.0.0.1",
        port=9000,
        trusted_proxies=["10.0.0.0/8", "fd00::/8"],
        shutdown_timeout_s=10.0,
    )
    assert config.upstream.url == "https://ingest.example.com"
    assert config.upstream.concurrency == 2
    assert config.upstream.timeout_s == 30.0
    assert config.upstream.retry == RetryConfig(initial_backoff_s=2.0, max_backoff_s=60.5)
    assert type(config.upstream.retry.initial_backoff_s) is float
    assert config.buffer == BufferConfig(path="/var/lib/proxy", fsync=False)
    assert config.limits == LimitsConfig(max_event_bytes=500_000)
    assert config.log == LogConfig(level="debug", format="json")


def test_load_config_accepts_a_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9001\n")
    assert load_config(str(path), environ={}).server.port == 9001


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_is_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text), environ={}) == Config()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"cannot read config file {path}: No such file or directory"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "server: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"config file {path} is not valid YAML: ")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert str(info.value) == "config: expected a mapping at the top level"


# ---- unknown keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "dotted"),
    [
        ({"foo": 1}, "foo"),
        ({"server": {"prot": 8080}}, "server.prot"),
        ({"upstream": {"retry": {"foo": 1}}}, "upstream.retry.foo"),
        ({"upstream": {"retry": {"initial_backoff": 1}}}, "upstream.retry.initial_backoff"),
        ({"buffer": {"fsync": True, "sync": True}}, "buffer.sync"),
    ],
)
def test_unknown_key_is_named(raw: dict[str, Any], dotted: str) -> None:
    assert config_error(raw) == f"unknown config key: {dotted}"


def test_unknown_nested_key_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream:\n  retry:\n    foo: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == "unknown config key: upstream.retry.foo"


# ---- wrong types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"server": {"port": "8080"}}, "config key server.port: expected int, got str"),
        ({"server": {"port": True}}, "config key server.port: expected int, got bool"),
        ({"server": {"port": 80.5}}, "config key server.port: expected int, got float"),
        ({"server": {"port": None}}, "config key server.port: expected int, got null"),
        ({"server": {"port": {"a": 1}}}, "config key server.port: expected int, got mapping"),
        ({"upstream": ["url"]}, "config key upstream: expected a mapping, got list"),
        ({"upstream": {"retry": "fast"}}, "config key upstream.retry: expected a mapping, got str"),
        ({"server": None}, "config key server: expected a mapping, got null"),
        ({"buffer": {"fsync": "false"}}, "config key buffer.fsync: expected bool, got str"),
        ({"buffer": {"fsync": 1}}, "config key buffer.fsync: expected bool, got int"),
        (
            {"upstream": {"retry": {"initial_backoff_s": True}}},
            "config key upstream.retry.initial_backoff_s: expected float, got bool",
        ),
        (
            {"upstream": {"retry": {"initial_backoff_s": "1s"}}},
            "config key upstream.retry.initial_backoff_s: expected float, got str",
        ),
        (
            {"server": {"trusted_proxies": "10.0.0.0/8"}},
            "config key server.trusted_proxies: expected a list, got str",
        ),
        (
            {"server": {"trusted_proxies": ["10.0.0.0/8", 5]}},
            "config key server.trusted_proxies[1]: expected str, got int",
        ),
        ({"log": {"level": 3}}, "config key log.level: expected str, got int"),
        ({"upstream": {"url": ["http://a"]}}, "config key upstream.url: expected str, got list"),
    ],
)
def test_wrong_type_names_the_key(raw: dict[str, Any], message: str) -> None:
    assert config_error(raw) == message


def test_wrong_type_from_yaml_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'server:\n  port: "8080"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == "config key server.port: expected int, got str"


def test_yaml_bool_for_int_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream:\n  concurrency: yes\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == "config key upstream.concurrency: expected int, got bool"


# ---- environment overrides ---------------------------------------------------------------


def test_env_server_port() -> None:
    config = build_config({}, {"PROXY_SERVER_PORT": "9090"})
    assert config.server.port == 9090
    assert config == Config(server=ServerConfig(port=9090))


def test_env_upstream_url() -> None:
    config = build_config({}, {"PROXY_UPSTREAM_URL": "https://ingest.example.com:8443/x"})
    assert config.upstream.url == "https://ingest.example.com:8443/x"


def test_env_nested_retry_field() -> None:
    config = build_config({}, {"PROXY_UPSTREAM_RETRY_INITIAL_BACKOFF_S": "0.25"})
    assert config.upstream.retry.initial_backoff_s == 0.25
    assert config.upstream.retry == RetryConfig(initial_backoff_s=0.25)


@pytest.mark.parametrize("text", ["false", "False", "FALSE", "0", "no", "off", " false "])
def test_env_bool_false(text: str) -> None:
    assert build_config({}, {"PROXY_BUFFER_FSYNC": text}).buffer.fsync is False


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "on", " ON "])
def test_env_bool_true(text: str) -> None:
    raw = {"buffer": {"fsync": False}}
    assert build_config(raw, {"PROXY_BUFFER_FSYNC": text}).buffer.fsync is True


@pytest.mark.parametrize(
    "text", ["10.0.0.0/8,::1/128", " 10.0.0.0/8 , ::1/128 ", "10.0.0.0/8,,::1/128,"]
)
def test_env_list(text: str) -> None:
    config = build_config({}, {"PROXY_SERVER_TRUSTED_PROXIES": text})
    assert config.server.trusted_proxies == ["10.0.0.0/8", "::1/128"]


def test_env_empty_list_clears_the_default() -> None:
    config = build_config({}, {"PROXY_SERVER_TRUSTED_PROXIES": ""})
    assert config.server.trusted_proxies == []


def test_env_overrides_the_file_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: 127.0.0.1\n  port: 7000\nbuffer:\n  fsync: true\n")
    environ = {"PROXY_SERVER_PORT": "9090", "PROXY_BUFFER_FSYNC": "false"}

    config = load_config(path, environ=environ)

    assert config.server.port == 9090
    assert config.server.host == "127.0.0.1"
    assert config.buffer.fsync is False


def test_env_without_prefix_or_unrelated_is_ignored() -> None:
    environ = {"SERVER_PORT": "1", "PORT": "2", "PROXY_PORT": "3", "HOME": "/root"}
    assert build_config({}, environ) == Config()


def test_env_string_int_float() -> None:
    environ = {
        "PROXY_LOG_LEVEL": "warning",
        "PROXY_UPSTREAM_CONCURRENCY": "16",
        "PROXY_UPSTREAM_TIMEOUT_S": "2.5",
        "PROXY_LIMITS_MAX_EVENT_BYTES": "1234",
        "PROXY_UPSTREAM_RETRY_REQUEST_ATTEMPTS": "5",
    }
    config = build_config({}, environ)
    assert config.log.level == "warning"
    assert config.upstream.concurrency == 16
    assert config.upstream.timeout_s == 2.5
    assert config.limits.max_event_bytes == 1234
    assert config.upstream.retry.request_attempts == 5


@pytest.mark.parametrize(
    ("env_name", "text", "message"),
    [
        (
            "PROXY_SERVER_PORT",
            "abc",
            "environment variable PROXY_SERVER_PORT (config key server.port): "
            "expected int, got 'abc'",
        ),
        (
            "PROXY_SERVER_PORT",
            "8080.0",
            "environment variable PROXY_SERVER_PORT (config key server.port): "
            "expected int, got '8080.0'",
        ),
        (
            "PROXY_BUFFER_FSYNC",
            "maybe",
            "environment variable PROXY_BUFFER_FSYNC (config key buffer.fsync): "
            "expected a boolean, got 'maybe'",
        ),
        (
            "PROXY_UPSTREAM_RETRY_INITIAL_BACKOFF_S",
            "1s",
            "environment variable PROXY_UPSTREAM_RETRY_INITIAL_BACKOFF_S "
            "(config key upstream.retry.initial_backoff_s): expected float, got '1s'",
        ),
        (
            "PROXY_LIMITS_MAX_REQUEST_BYTES",
            "4MB",
            "environment variable PROXY_LIMITS_MAX_REQUEST_BYTES "
            "(config key limits.max_request_bytes): expected int, got '4MB'",
        ),
    ],
)
def test_bad_env_value_names_the_env_var(env_name: str, text: str, message: str) -> None:
    assert config_error({}, {env_name: text}) == message


# ---- value checks ------------------------------------------------------------------------


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_in_range(port: int) -> None:
    assert build_config({"server": {"port": port}}, {}).server.port == port


@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_port_out_of_range(port: int) -> None:
    assert config_error({"server": {"port": port}}) == (
        f"config key server.port: invalid value {port!r}"
    )


def test_port_out_of_range_from_env() -> None:
    message = config_error({}, {"PROXY_SERVER_PORT": "70000"})
    assert message.startswith("config key server.port: invalid value")


@pytest.mark.parametrize(
    ("cidrs", "index", "bad"),
    [
        (["10.0.0.0/33"], 0, "10.0.0.0/33"),
        (["10.0.0.0/8", "not-a-network"], 1, "not-a-network"),
        (["::1/129"], 0, "::1/129"),
        (["10.0.0.0/8", "::1/128", "300.0.0.1"], 2, "300.0.0.1"),
    ],
)
def test_bad_cidr(cidrs: list[str], index: int, bad: str) -> None:
    message = config_error({"server": {"trusted_proxies": cidrs}})
    assert message == f"config key server.trusted_proxies[{index}]: {bad!r} is not an IP network"


def test_bad_cidr_from_env() -> None:
    message = config_error({}, {"PROXY_SERVER_TRUSTED_PROXIES": "10.0.0.0/8,nope"})
    assert message == "config key server.trusted_proxies[1]: 'nope' is not an IP network"


def test_host_bits_set_cidr_is_accepted() -> None:
    config = build_config({"server": {"trusted_proxies": ["10.1.2.3/8", "192.0.2.7"]}}, {})
    assert config.server.trusted_proxies == ["10.1.2.3/8", "192.0.2.7"]


def test_admin_keys_default_to_everything_on_the_public_port() -> None:
    server = build_config({}, {}).server
    assert (server.admin_port, server.admin_host, server.admin_allow) == (0, "127.0.0.1", [])


def test_admin_keys_from_env() -> None:
    server = build_config(
        {},
        {
            "PROXY_SERVER_ADMIN_PORT": "9100",
            "PROXY_SERVER_ADMIN_HOST": "0.0.0.0",
            "PROXY_SERVER_ADMIN_ALLOW": "10.0.0.0/8, 192.168.0.0/16",
        },
    ).server
    assert server.admin_port == 9100 and server.admin_host == "0.0.0.0"
    assert server.admin_allow == ["10.0.0.0/8", "192.168.0.0/16"]


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"admin_port": -1}, "config key server.admin_port: invalid value -1"),
        ({"admin_port": 65536}, "config key server.admin_port: invalid value 65536"),
        ({"admin_port": 8080}, "config key server.admin_port: 8080 is server.port too"),
        ({"admin_host": ""}, "config key server.admin_host: invalid value ''"),
        ({"workers": -1}, "config key server.workers: invalid value -1"),
        ({"workers": 257}, "config key server.workers: invalid value 257"),
        (
            {"admin_allow": ["10.0.0.0/8", "everyone"]},
            "config key server.admin_allow[1]: 'everyone' is not an IP network",
        ),
    ],
)
def test_bad_admin_keys(server: dict[str, Any], message: str) -> None:
    assert config_error({"server": server}) == message


@pytest.mark.parametrize(
    "url", ["ftp://ingest.example.com", "ingest.example.com", "127.0.0.1:3049", "", "ws://x"]
)
def test_non_http_upstream_url(url: str) -> None:
    assert config_error({"upstream": {"url": url}}) == (
        f"config key upstream.url: invalid value {url!r}"
    )


@pytest.mark.parametrize("url", ["http://127.0.0.1:3049", "https://ingest.example.com/"])
def test_http_upstream_url(url: str) -> None:
    assert build_config({"upstream": {"url": url}}, {}).upstream.url == url


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"server": {"shutdown_timeout_s": -1}}, "server.shutdown_timeout_s"),
        ({"upstream": {"timeout_s": 0}}, "upstream.timeout_s"),
        ({"upstream": {"concurrency": 0}}, "upstream.concurrency"),
        ({"upstream": {"retry": {"initial_backoff_s": 0}}}, "upstream.retry.initial_backoff_s"),
        (
            {"upstream": {"retry": {"initial_backoff_s": 5, "max_backoff_s": 4}}},
            "upstream.retry.max_backoff_s",
        ),
        ({"upstream": {"retry": {"multiplier": 0.5}}}, "upstream.retry.multiplier"),
        ({"upstream": {"retry": {"request_attempts": 0}}}, "upstream.retry.request_attempts"),
        ({"upstream": {"retry": {"max_retry_after_s": -1}}}, "upstream.retry.max_retry_after_s"),
        ({"buffer": {"path": ""}}, "buffer.path"),
        ({"buffer": {"max_bytes": 0}}, "buffer.max_bytes"),
        ({"buffer": {"min_free_bytes": -1}}, "buffer.min_free_bytes"),
        ({"limits": {"max_request_bytes": 0}}, "limits.max_request_bytes"),
        ({"limits": {"max_decompressed_bytes": -5}}, "limits.max_decompressed_bytes"),
        ({"limits": {"max_event_bytes": 0}}, "limits.max_event_bytes"),
        ({"log": {"level": "verbose"}}, "log.level"),
        ({"log": {"format": "xml"}}, "log.format"),
    ],
)
def test_value_checks_name_the_key(raw: dict[str, Any], key: str) -> None:
    assert config_error(raw).startswith(f"config key {key}: invalid value ")


def test_log_level_is_case_insensitive() -> None:
    assert build_config({"log": {"level": "DEBUG"}}, {}).log.level == "DEBUG"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"PROXY_UPSTREAM_TIMEOUT_S": "nan"}, "upstream.timeout_s"),
        ({"PROXY_SERVER_SHUTDOWN_TIMEOUT_S": "nan"}, "server.shutdown_timeout_s"),
        ({"PROXY_UPSTREAM_RETRY_MULTIPLIER": "nan"}, "upstream.retry.multiplier"),
    ],
)
def test_nan_is_rejected(environ: dict[str, str], key: str) -> None:
    message = config_error({}, environ)
    assert f"config key {key}" in message
    assert "expected a finite number" in message
    assert next(iter(environ)) in message


def test_shipped_config_yaml_loads_and_matches_the_defaults() -> None:
    shipped = Path(__file__).resolve().parent.parent / "config.yaml"
    assert load_config(shipped, environ={}) == build_config({}, {})


def test_header_keys_default_to_todays_behaviour_and_come_from_env() -> None:
    upstream = build_config({}, {}).upstream
    assert (upstream.preserve_host, upstream.drop_headers) == (False, [])
    upstream = build_config(
        {},
        {"PROXY_UPSTREAM_PRESERVE_HOST": "true", "PROXY_UPSTREAM_DROP_HEADERS": "X-A, x-b"},
    ).upstream
    assert (upstream.preserve_host, upstream.drop_headers) == (True, ["X-A", "x-b"])
    assert config_error({"upstream": {"preserve_host": "yes"}}) == (
        "config key upstream.preserve_host: expected bool, got str"
    )


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["X-Ok", "X Bad"], "config key upstream.drop_headers[1]: 'X Bad' is no header name"),
        ([""], "config key upstream.drop_headers[0]: '' is no header name"),
        (
            ["x-write-key"],
            "config key upstream.drop_headers[0]: 'x-write-key' is one the proxy must send"
            " (it carries the write key)",
        ),
        (
            ["X-Forwarded-For"],
            "config key upstream.drop_headers[0]: 'X-Forwarded-For' is one the proxy must send"
            " (privacy.ip_policy: remove sends no client IP)",
        ),
        (
            ["Host"],
            "config key upstream.drop_headers[0]: 'Host' is one the proxy must send"
            " (the client's Host goes upstream only with upstream.preserve_host)",
        ),
    ],
)
def test_bad_drop_headers(names: list[str], message: str) -> None:
    assert config_error({"upstream": {"drop_headers": names}}) == message


def test_sync_refusal_and_size_keys_default_and_come_from_env() -> None:
    upstream = build_config({}, {}).upstream
    assert (
        upstream.sync_browser,
        upstream.sync_timeout_s,
        upstream.sync_max_in_flight,
        upstream.key_refusal_ttl_s,
        upstream.max_url_bytes,
        upstream.max_header_bytes,
    ) == (True, 1.0, 256, 60.0, 8000, 32768)
    upstream = build_config(
        {},
        {
            "PROXY_UPSTREAM_SYNC_BROWSER": "false",
            "PROXY_UPSTREAM_SYNC_TIMEOUT_S": "0.25",
            "PROXY_UPSTREAM_KEY_REFUSAL_TTL_S": "0",
            "PROXY_UPSTREAM_MAX_HEADER_BYTES": "65536",
        },
    ).upstream
    assert (upstream.sync_browser, upstream.sync_timeout_s) == (False, 0.25)
    assert (upstream.key_refusal_ttl_s, upstream.max_header_bytes) == (0.0, 65536)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("sync_timeout_s", 0),
        ("sync_max_in_flight", 0),
        ("key_refusal_ttl_s", -1),
        ("max_url_bytes", 10),
        ("max_header_bytes", 10),
    ],
)
def test_bad_sync_refusal_and_size_values(key: str, value: float) -> None:
    assert config_error({"upstream": {key: value}}).startswith(
        f"config key upstream.{key}: invalid value"
    )


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ({"limits": {"max_gzip_members": 0}}, "limits.max_gzip_members"),
        ({"limits": {"max_batch_events": 0}}, "limits.max_batch_events"),
        ({"limits": {"max_batch_errors": -1}}, "limits.max_batch_errors"),
        ({"limits": {"inline_parse_bytes": -1}}, "limits.inline_parse_bytes"),
        ({"limits": {"max_parse_queue": 0}}, "limits.max_parse_queue"),
        ({"buffer": {"max_dead_letter_bytes": 0}}, "buffer.max_dead_letter_bytes"),
        ({"buffer": {"warn_fill_ratio": 1.5}}, "buffer.warn_fill_ratio"),
        ({"buffer": {"warn_fill_ratio": -0.1}}, "buffer.warn_fill_ratio"),
        ({"buffer": {"warn_age_s": -1}}, "buffer.warn_age_s"),
        ({"upstream": {"max_batch_bytes": 10}}, "upstream.max_batch_bytes"),
        ({"upstream": {"retry": {"max_row_failures": 0}}}, "upstream.retry.max_row_failures"),
        ({"script": {"max_bytes": 10}}, "script.max_bytes"),
    ],
)
def test_bad_bounds_are_refused(raw: dict[str, Any], name: str) -> None:
    """Issue 7's bounds: a value that would switch one off is a config error, not a surprise."""
    assert config_error(raw).startswith(f"config key {name}: invalid value")
