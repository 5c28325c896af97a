"""How the proxy reaches its upstream through an on-prem network: the TLS context (a private CA,
a client certificate) and the egress proxy named by the standard environment variables.

Built once at start, for the forwarder and the script fetches alike; a file or variable that
cannot be used is a ConfigError naming it (issue 10).
"""

from __future__ import annotations

import dataclasses
import ssl
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from proxy.errors import ConfigError

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig


@dataclasses.dataclass(frozen=True)
class Egress:
    # None: aiohttp's default, the system's trust store and no client certificate.
    tls: ssl.SSLContext | None
    # upstream.trust_env: the egress proxy comes from HTTPS_PROXY / HTTP_PROXY / NO_PROXY.
    proxies: Mapping[str, str]

    @property
    def connector_ssl(self) -> ssl.SSLContext | bool:
        """aiohttp's TCPConnector(ssl=...): True is its default verification."""
        return True if self.tls is None else self.tls

    def proxy_for(self, url: str) -> str | None:
        """The egress proxy for `url`, or None to connect directly."""
        return proxy_for(url, self.proxies)


def build_egress(upstream: UpstreamConfig, environ: Mapping[str, str]) -> Egress:
    proxies = env_proxies(environ) if upstream.trust_env else {}
    return Egress(tls=tls_context(upstream), proxies=proxies)


def tls_context(upstream: UpstreamConfig) -> ssl.SSLContext | None:
    """The context for https upstreams: the system's trust store plus upstream.ca_file, and
    the client certificate for mTLS. None when no TLS key is set (today's behaviour)."""
    cert, key = upstream.client_cert_file, upstream.client_key_file
    if bool(cert) != bool(key):
        have, missing = (
            ("client_cert_file", "client_key_file")
            if cert
            else ("client_key_file", "client_cert_file")
        )
        raise ConfigError(f"config key upstream.{missing}: required with upstream.{have}")
    if upstream.client_key_password and not key:
        raise ConfigError(
            "config key upstream.client_key_password: set without upstream.client_key_file"
        )
    if not (upstream.ca_file or cert):
        return None
    context = ssl.create_default_context()
    if upstream.ca_file:
        # Added to the system's roots, as Vector's tls.ca_file is ("an additional CA"): a
        # script.origin on a public CDN keeps working beside a private upstream.
        _readable("ca_file", upstream.ca_file)
        try:
            context.load_verify_locations(cafile=upstream.ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"config key upstream.ca_file: {upstream.ca_file} holds no PEM certificate"
                f" ({exc.reason or exc})"
            ) from None
    if cert:
        _readable("client_cert_file", cert)
        _readable("client_key_file", key)
        password = upstream.client_key_password.encode()
        try:
            # A callable, so that OpenSSL never prompts on the terminal for an encrypted key.
            context.load_cert_chain(cert, key, password=lambda: password)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"config key upstream.client_cert_file: cannot use {cert} with {key}"
                f" ({exc.reason or exc}): both PEM, the key the certificate's, and"
                " upstream.client_key_password its password if it is encrypted"
            ) from None
    return context


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(
            f"config key upstream.{key}: cannot read {path}: {exc.strerror}"
        ) from None


def env_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """{scheme: proxy URL, "no": NO_PROXY} from the environment, by urllib's rules (which
    aiohttp's trust_env uses too): lower-case names win over upper-case ones. ALL_PROXY is not
    read, as aiohttp does not read it; only http:// proxies are spoken to."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        if value and name[-6:].lower() == "_proxy":
            found[name[:-6].lower()] = value
    # A CGI-style HTTP_PROXY may come from a request's Proxy header (httpoxy): urllib drops it.
    if "REQUEST_METHOD" in environ:
        found.pop("http", None)
    for name, value in environ.items():
        if name[-6:] == "_proxy":
            if value:
                found[name[:-6].lower()] = value
            else:
                found.pop(name[:-6].lower(), None)
    found = {k: v for k, v in found.items() if k in {"http", "https", "no"}}
    for scheme in ("http", "https"):
        if scheme not in found:
            continue
        value = found[scheme]
        if "://" not in value:
            value = found[scheme] = f"http://{value}"  # curl's default scheme for a proxy
        try:
            parts = urlsplit(value)  # raises on an unclosed [IPv6 address
            parts.port  # noqa: B018 - raises on a port that is no number
        except ValueError:
            parts = urlsplit("")
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(
                f"environment variable {scheme.upper()}_PROXY (upstream.trust_env): expected"
                f" http://host:port, got {describe(value)!r}"
            )
    return found


def proxy_for(url: str, proxies: Mapping[str, str]) -> str | None:
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme)
    if proxy is None or not parts.hostname:
        return None
    no_proxy = {"no": proxies["no"]} if "no" in proxies else {}
    # NO_PROXY as aiohttp's trust_env reads it (urllib's rules: names and domain suffixes).
    if urllib.request.proxy_bypass_environment(parts.hostname, no_proxy):  # type: ignore[attr-defined]
        return None
    return proxy


def describe(url: str) -> str:
    """A proxy URL for a log line or an error: scheme, host and port, never its credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable>"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}" if host else "<unparsable>"
