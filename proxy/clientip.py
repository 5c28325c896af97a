"""Decides the real client IP: forwarding headers are believed only from trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


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


def _all_values(headers: Mapping[str, str], name: str) -> str:
    """Every line of a header joined, so a forged first line cannot hide the ones our own
    proxies appended on lines of their own."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return ",".join(getall(name, []))
    return headers.get(name, "")


def resolve_client_ip(
    peer: str | None, headers: Mapping[str, str], trusted: tuple[Network, ...]
) -> str:
    """The client IP as text.

    From a trusted peer, X-Forwarded-For is walked right to left, skipping trusted hops; the
    first untrusted address is the client (a client cannot spoof the entries our own proxies
    appended). Without X-Forwarded-For, a trusted peer's X-Real-IP is taken. Anything else is
    the socket peer.
    """
    peer_addr = _parse(peer) if peer else None
    if peer_addr is None:
        return peer or ""
    if not _trusted(peer_addr, trusted):
        return str(peer_addr)
    forwarded = _all_values(headers, "X-Forwarded-For")
    if forwarded.strip():
        hops = [_parse(part) for part in forwarded.split(",")]
        candidate: Address | None = None
        for hop in reversed(hops):
            if hop is None:
                break  # garbage: stop believing anything further left
            candidate = hop
            if not _trusted(hop, trusted):
                return str(hop)
        if candidate is not None:
            return str(candidate)
    real_ip = _parse(headers.get("X-Real-IP", ""))
    if real_ip is not None:
        return str(real_ip)
    return str(peer_addr)
