"""Decides the real client IP: forwarding headers are believed only from trusted proxies."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


# Every request parses its peer (and often the same proxy hops): remember recent answers.
@functools.lru_cache(maxsize=4096)
def _parse(value: str) -> Address | None:
    text = value.strip().strip('"')
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; Jitsu's stripLastOctet
    # only understands the IPv4 form.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _trusted(addr: Address, networks: tuple[Network, ...]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


def is_trusted(peer: str, trusted: tuple[Network, ...]) -> bool:
    addr = _parse(peer)
    return addr is not None and _trusted(addr, trusted)


def _all_values(headers: Mapping[str, str], name: str) -> str:
    """Every line of a header joined, so a forged first line cannot hide the ones our own
    proxies appended on lines of their own."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return ",".join(getall(name, []))
    return headers.get(name, "")


# Headers a trusted peer may use to name the client, in the order they are tried by default.
DEFAULT_HEADERS = ("X-Forwarded-For", "X-Real-IP")
# Headers naming one address (set by a CDN), as opposed to a chain of hops.
SINGLE_VALUE = frozenset({"x-real-ip", "cf-connecting-ip", "true-client-ip"})


def resolve_client_ip(
    peer: str | None,
    headers: Mapping[str, str],
    trusted: tuple[Network, ...],
    believe: Sequence[str] = DEFAULT_HEADERS,
) -> str:
    """The client IP as text.

    Only a trusted peer's headers are read, and only those named in `believe`, in that order
    (CF-Connecting-IP and True-Client-IP are opt-in: a client could set them itself behind a
    proxy that does not strip them). Chains (X-Forwarded-For, Forwarded) are walked right to
    left, skipping trusted hops; the first untrusted address is the client, since a client
    cannot spoof the entries our own proxies appended. Otherwise: the socket peer.
    """
    peer_addr = _parse(peer) if peer else None
    if peer_addr is None:
        return peer or ""
    if not _trusted(peer_addr, trusted):
        return str(peer_addr)
    for name in believe:
        lowered = name.lower()
        if lowered in SINGLE_VALUE:
            addr = _parse(headers.get(name, ""))
            if addr is not None:
                return str(addr)
            continue
        value = _all_values(headers, name)
        if not value.strip():
            continue
        if lowered == "forwarded":
            hops = [_parse(_forwarded_for(part)) for part in value.split(",")]
        else:
            hops = [_parse(part) for part in value.split(",")]
        found = _walk(hops, trusted)
        if found is not None:
            return str(found)
    return str(peer_addr)


def _walk(hops: list[Address | None], trusted: tuple[Network, ...]) -> Address | None:
    candidate: Address | None = None
    for hop in reversed(hops):
        if hop is None:
            break  # garbage: stop believing anything further left
        candidate = hop
        if not _trusted(hop, trusted):
            return hop
    return candidate


def _forwarded_for(element: str) -> str:
    """The `for=` of one RFC 7239 element (`for=1.2.3.4;proto=https`, `for="[v6]:port"`)."""
    for pair in element.split(";"):
        name, _, value = pair.strip().partition("=")
        if name.lower() == "for":
            return value.strip().strip('"')
    return ""


def anonymize(ip: str, policy: str) -> str:
    """Edge IP anonymisation, applied before anything is written to disk.

    keep: as is. stripLastOctet: a.b.c.0 for IPv4 (Jitsu's own policy), the /48 for IPv6.
    remove: empty.
    """
    if policy == "keep" or not ip:
        return ip
    if policy == "remove":
        return ""
    addr = _parse(ip)
    if addr is None:
        return ""
    prefix = 24 if addr.version == 4 else 48
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    return str(net.network_address)
