"""The upstream request's headers: the client's request as Jitsu would have seen it (issue 8).

Every end-to-end header the client sent goes upstream, except the ones that describe the
client's connection or body, carry credentials, or the proxy sets itself from what it resolved.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

from proxy.auth import CLASSIC_HEADER_KEYS, WriteKey
from proxy.errors import IngestError

# Hop-by-hop (RFC 9110 §7.6.1), plus every header the Connection header names: they belong to
# the client's connection to us. Expect (100-continue) is answered by our own server.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
# They describe the body as the client sent it. The proxy sends a body of its own: JSON it
# wrote, never content-coded (a gzip batch is inflated; the pixel's is empty).
BODY_HEADERS = frozenset(
    {"content-length", "content-encoding", "content-md5", "content-digest", "repr-digest", "digest"}
)
# Credentials. The write key goes upstream in X-Write-Key only, whichever header carried it
# (Authorization; the Classic API's X-Auth-Token and api_key, ingest/router_classic_handler.go
# :110, which Jitsu reads only after X-Write-Key). The site's cookies are none of Jitsu's
# business; the pixel adds Jitsu's own itself (routes.pixel).
CREDENTIALS = frozenset(
    {"authorization", "cookie", "x-write-key", *(name.lower() for name in CLASSIC_HEADER_KEYS)}
)
# Set by the proxy from what it resolved: the client IP (through trusted proxies and anonymised
# by privacy.ip_policy, so no header naming the raw address may reach the disk), the Host and
# the scheme the client used. Host itself is upstream.url's, or the client's (preserve_host).
PROXY_SET = frozenset(
    {
        "host",
        "x-real-ip",
        "x-forwarded-for",
        "forwarded",
        "cf-connecting-ip",
        "true-client-ip",
        "x-forwarded-host",
        "x-forwarded-proto",
    }
)
NOT_FORWARDED = HOP_BY_HOP | BODY_HEADERS | CREDENTIALS | PROXY_SET
# Other headers load balancers and CDNs put the raw client address in (X-Client-IP,
# Fastly-Client-IP, X-Original-Forwarded-For, X-Envoy-External-Address, X-Azure-ClientIP,
# CloudFront-Viewer-Address, X-Appengine-User-IP, ...): kept out like X-Real-IP, by name,
# so that privacy.ip_policy holds for them too (attack pass, F4).
CLIENT_ADDRESS = re.compile(
    r"(client|user|viewer|external|connecting|remote|proxyuser|real)[-_]?(ip|addr|address)"
    r"$|forwarded[-_]for",
    re.IGNORECASE,
)
# The client's Accept-Encoding goes upstream (Jitsu keeps it for functions) with only the
# codings the forwarder can read: a browser's `br, zstd` could bring back an answer (from a CDN
# in front of Jitsu) that it cannot decode. Jitsu itself only ever gzips
# (jitsubase/appbase/router_base.go ShouldCompress).
READABLE_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})

# Go's server reads at most MaxHeaderBytes (1 MiB) of header lines, plus 4 KiB of slack for the
# request line, and answers 431 beyond: the most upstream.max_header_bytes can let through
# (routes refuses more with Jitsu's 431, rather than a 2xx for an event that will fail).
MAX_UPSTREAM_HEADER_BYTES = 1 << 20

# Go's httpguts.ValidHostHeader: Jitsu's server answers 400 to a Host with any other byte.
_HOST = re.compile(r"[0-9A-Za-z!$%&'()*+,\-.:;=\[\]_~]*")


@dataclasses.dataclass(frozen=True)
class ClientOrigin:
    """The Host and scheme the client used, as the first proxy in front of us saw them."""

    host: str  # "" when the client sent none
    proto: str  # "http" or "https"


def forward_headers(
    request_headers: Mapping[str, str],
    key: WriteKey | None,
    client_ip: str,
    ip_policy: str = "keep",
    origin: ClientOrigin | None = None,
    *,
    preserve_host: bool = False,
    drop: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Headers of the upstream request: the client's end-to-end headers, the key in
    X-Write-Key only, one clean client IP, X-Forwarded-Host and -Proto from `origin`, and with
    `preserve_host` the client's Host. `drop` (lower-case names) removes more."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for name, value in request_headers.items():
        lowered = name.lower()
        group = groups.get(lowered)
        if group is None:
            groups[lowered] = (name, [value])
        else:
            group[1].append(value)
    connection = groups.get("connection")
    named = (
        {token.strip().lower() for value in connection[1] for token in value.split(",")}
        if connection is not None
        else frozenset()
    )
    headers = {"Content-Type": _content_type(request_headers.get("Content-Type"))}
    if key is not None:
        headers["X-Write-Key"] = key.value
    if client_ip:
        headers["X-Real-IP"] = client_ip
        headers["X-Forwarded-For"] = client_ip
    for lowered, (name, values) in groups.items():
        if not _passed_on(lowered) or lowered in named or lowered in drop:
            continue
        if lowered == "x-ip-policy" and ip_policy == "remove":
            continue
        # Jitsu keeps a repeated header as its values joined by "," (ingest/router.go
        # buildIngestMessage): one line holding exactly that is what it then stores.
        value = values[0] if len(values) == 1 else ",".join(values)
        if lowered == "accept-encoding":
            value = readable_codings(value)
            if not value:
                continue
        headers[name] = header_text(value)
    if origin is not None:
        if origin.host and "x-forwarded-host" not in drop:
            headers["X-Forwarded-Host"] = header_text(origin.host)
        if "x-forwarded-proto" not in drop:
            headers["X-Forwarded-Proto"] = origin.proto
        if preserve_host and origin.host:
            # Jitsu finds a stream by the Host's slug or custom domain and keeps it as the
            # event's domain (ingest/router.go getDataLocator).
            headers["Host"] = checked_host(origin.host)
    if ip_policy == "remove":
        # With no IP header Jitsu would take the proxy's own address; this makes it store none.
        headers["X-IP-Policy"] = "remove"
    return headers


# Header names repeat from request to request: each one's verdict is worked out once (issue 9).
@functools.lru_cache(maxsize=256)
def _passed_on(lowered: str) -> bool:
    """Whether a header (lower-case name) may go upstream as the client sent it: not one of
    those above, not naming a client address, not the Content-Type (the proxy writes that)."""
    return (
        lowered not in NOT_FORWARDED
        and lowered != "content-type"
        and not CLIENT_ADDRESS.search(lowered)
    )


@functools.lru_cache(maxsize=256)
def readable_codings(accept_encoding: str) -> str:
    """An Accept-Encoding with only the codings (q-values kept) the forwarder can decode."""
    kept = [
        token.strip()
        for token in accept_encoding.split(",")
        if token.split(";", 1)[0].strip().lower() in READABLE_CODINGS
    ]
    return ", ".join(kept)


@functools.lru_cache(maxsize=256)
def _content_type(value: str | None) -> str:
    """The client's Content-Type while it still describes the body sent: one Jitsu accepts
    (gin's ContentType(), cut at ' ' or ';', ends with application/json or text/plain, case as
    sent: ingest/router_ingest_handler.go:66), naming no charset but UTF-8. Otherwise
    application/json: the proxy's own check ignores case, and the body is JSON it wrote."""
    if value:
        media = re.split(r"[ ;]", value, maxsplit=1)[0]
        charsets = re.findall(r";\s*charset\s*=\s*\"?([^\";\s]*)", value, flags=re.IGNORECASE)
        utf8 = all(c.lower() in ("utf-8", "utf8") for c in charsets)
        if media.endswith(("application/json", "text/plain")) and utf8:
            return header_text(value)
    return "application/json"


def checked_host(host: str) -> str:
    """The client's Host, to be sent as Host: refused as Jitsu's server would refuse it."""
    if not _HOST.fullmatch(host):
        raise IngestError("malformed Host header", status=400, browser_ok=False)
    return host


def header_bytes(headers: Mapping[str, str]) -> int:
    """What the header lines take on the wire ("Name: value\r\n")."""
    return sum(len(n) + len(v.encode("utf-8", "replace")) + 4 for n, v in headers.items())


def header_text(value: str) -> str:
    """A request header value as something we can store and send: aiohttp hands over invalid
    UTF-8 as lone surrogates (surrogateescape), which SQLite refuses and aiohttp's client sends
    as an empty value. Those bytes become U+FFFD, as Go's JSON encoding stores them in Jitsu."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape" if _escaped_only(value) else "replace")
        return raw.decode("utf-8", "replace")
    return value


def _escaped_only(value: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in value)
