"""Client IP resolution: forwarding headers only from trusted proxies (proxy/clientip.py).

Jitsu itself trusts X-Real-IP / the leftmost X-Forwarded-For from anyone (research notes §3.3),
so the proxy must hand it one clean address it decided on.
"""

from __future__ import annotations

import ipaddress

import pytest
from multidict import CIMultiDict

from proxy.clientip import parse_networks, resolve_client_ip

TRUSTED = parse_networks(["10.0.0.0/8", "127.0.0.1/32", "::1/128", "fd00::/8"])

CLIENT = "203.0.113.7"
SPOOF = "6.6.6.6"


def test_parse_networks() -> None:
    networks = parse_networks(["10.1.2.3/8", "::1/128", "192.0.2.1"])
    assert networks == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
        ipaddress.IPv4Network("192.0.2.1/32"),
    )
    assert parse_networks([]) == ()


def test_parse_networks_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_networks(["not-a-network"])


# ---- untrusted peers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Forwarded-For": SPOOF},
        {"X-Real-IP": SPOOF},
        {"X-Forwarded-For": f"{SPOOF}, 10.0.0.1", "X-Real-IP": SPOOF},
        {"X-Forwarded-For": "10.0.0.1"},
    ],
)
def test_untrusted_peer_ignores_forwarding_headers(headers: dict[str, str]) -> None:
    assert resolve_client_ip(CLIENT, headers, TRUSTED) == CLIENT


def test_nothing_trusted_means_the_peer() -> None:
    headers = {"X-Forwarded-For": SPOOF, "X-Real-IP": SPOOF}
    assert resolve_client_ip("127.0.0.1", headers, ()) == "127.0.0.1"


def test_untrusted_ipv6_peer() -> None:
    headers = {"X-Forwarded-For": SPOOF}
    assert resolve_client_ip("2001:db8::9", headers, TRUSTED) == "2001:db8::9"


def test_peer_is_normalised() -> None:
    assert resolve_client_ip("2001:0db8:0000:0000::0009", {}, TRUSTED) == "2001:db8::9"


@pytest.mark.parametrize("peer", [None, ""])
def test_no_peer_is_empty(peer: str | None) -> None:
    assert resolve_client_ip(peer, {"X-Forwarded-For": SPOOF}, TRUSTED) == ""


def test_unparseable_peer_is_returned_as_is_and_headers_ignored() -> None:
    assert resolve_client_ip("unix-socket", {"X-Forwarded-For": SPOOF}, TRUSTED) == "unix-socket"


# ---- trusted peers: X-Forwarded-For ------------------------------------------------------


def test_trusted_peer_single_hop() -> None:
    assert resolve_client_ip("10.0.0.1", {"X-Forwarded-For": CLIENT}, TRUSTED) == CLIENT


def test_trusted_peer_takes_rightmost_untrusted_hop() -> None:
    """The leftmost entries were written by the client and can be anything."""
    headers = {"X-Forwarded-For": f"{SPOOF}, 198.51.100.1, {CLIENT}"}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


def test_trusted_hops_are_skipped() -> None:
    headers = {"X-Forwarded-For": f"{SPOOF}, {CLIENT}, 10.0.0.2, 10.20.30.40, 127.0.0.1"}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


def test_all_hops_trusted_gives_the_furthest_hop() -> None:
    headers = {"X-Forwarded-For": "10.0.0.3, 10.0.0.2"}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == "10.0.0.3"


def test_xff_preferred_over_x_real_ip() -> None:
    headers = {"X-Forwarded-For": CLIENT, "X-Real-IP": "198.51.100.1"}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


@pytest.mark.parametrize(
    "xff",
    [
        f"{CLIENT},10.0.0.2",
        f"  {CLIENT}  ,   10.0.0.2  ",
        f'"{CLIENT}", 10.0.0.2',
        f"{CLIENT}:51234, 10.0.0.2:443",
    ],
)
def test_xff_whitespace_quotes_and_ports(xff: str) -> None:
    assert resolve_client_ip("10.0.0.1", {"X-Forwarded-For": xff}, TRUSTED) == CLIENT


def test_header_lookup_is_case_insensitive() -> None:
    headers = CIMultiDict({"x-forwarded-for": CLIENT})
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


def test_repeated_xff_fields_are_one_list() -> None:
    """RFC 9110 §5.3: repeated fields are equivalent to one comma-joined field."""
    headers = CIMultiDict([("X-Forwarded-For", SPOOF), ("X-Forwarded-For", CLIENT)])
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


# ---- trusted peers: X-Real-IP fallback ---------------------------------------------------


def test_trusted_peer_falls_back_to_x_real_ip() -> None:
    assert resolve_client_ip("10.0.0.1", {"X-Real-IP": CLIENT}, TRUSTED) == CLIENT


@pytest.mark.parametrize("xff", ["", "   "])
def test_blank_xff_falls_back_to_x_real_ip(xff: str) -> None:
    headers = {"X-Forwarded-For": xff, "X-Real-IP": CLIENT}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


def test_x_real_ip_with_port() -> None:
    headers = {"X-Real-IP": f"{CLIENT}:8080"}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


def test_trusted_peer_without_headers_is_the_peer() -> None:
    assert resolve_client_ip("10.0.0.1", {}, TRUSTED) == "10.0.0.1"


@pytest.mark.parametrize("real_ip", ["garbage", "", "1.2.3", f"{CLIENT}, {SPOOF}"])
def test_garbage_x_real_ip_is_the_peer(real_ip: str) -> None:
    assert resolve_client_ip("10.0.0.1", {"X-Real-IP": real_ip}, TRUSTED) == "10.0.0.1"


# ---- garbage in X-Forwarded-For ----------------------------------------------------------


@pytest.mark.parametrize("xff", ["unknown", "garbage, also-garbage", "_hidden", "1.2.3.4.5"])
def test_all_garbage_xff_is_the_peer(xff: str) -> None:
    assert resolve_client_ip("10.0.0.1", {"X-Forwarded-For": xff}, TRUSTED) == "10.0.0.1"


def test_garbage_left_of_the_client_does_not_matter() -> None:
    headers = {"X-Forwarded-For": f"unknown, {CLIENT}, 10.0.0.2"}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


def test_nothing_left_of_garbage_is_believed() -> None:
    headers = {"X-Forwarded-For": f"{SPOOF}, garbage, 10.0.0.2"}
    result = resolve_client_ip("10.0.0.1", headers, TRUSTED)
    assert result != SPOOF
    assert result == "10.0.0.2"


def test_garbage_rightmost_stops_the_walk() -> None:
    headers = {"X-Forwarded-For": f"{SPOOF}, {CLIENT}, unknown"}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == "10.0.0.1"


# ---- IPv6 --------------------------------------------------------------------------------


def test_trusted_ipv6_peer_with_ipv6_client() -> None:
    headers = {"X-Forwarded-For": "2001:db8::5"}
    assert resolve_client_ip("::1", headers, TRUSTED) == "2001:db8::5"


def test_ipv6_entry_in_brackets_with_port() -> None:
    headers = {"X-Forwarded-For": "[2001:db8::5]:4711, [fd00::2]:443"}
    assert resolve_client_ip("fd00::1", headers, TRUSTED) == "2001:db8::5"


def test_ipv6_hops_are_skipped_when_trusted() -> None:
    headers = {"X-Forwarded-For": f"2001:db8::66, {CLIENT}, fd00::7"}
    assert resolve_client_ip("::1", headers, TRUSTED) == CLIENT


def test_ipv4_network_does_not_trust_ipv6_peer() -> None:
    trusted = parse_networks(["0.0.0.0/0"])
    headers = {"X-Forwarded-For": SPOOF}
    assert resolve_client_ip("2001:db8::9", headers, trusted) == "2001:db8::9"


# ---- IPv4-mapped IPv6 (dual-stack listeners) ---------------------------------------------


@pytest.mark.parametrize("peer", ["::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:a00:1"])
def test_ipv4_mapped_peer_is_trusted_by_its_ipv4_network(peer: str) -> None:
    assert resolve_client_ip(peer, {"X-Forwarded-For": CLIENT}, TRUSTED) == CLIENT


def test_ipv4_mapped_hop_is_skipped_when_trusted() -> None:
    headers = {"X-Forwarded-For": f"{CLIENT}, ::ffff:10.0.0.9"}
    assert resolve_client_ip("10.0.0.1", headers, TRUSTED) == CLIENT


def test_ipv4_mapped_untrusted_peer_ignores_headers() -> None:
    result = resolve_client_ip("::ffff:198.51.100.1", {"X-Forwarded-For": SPOOF}, TRUSTED)
    assert result == "198.51.100.1"


def test_ipv4_mapped_client_is_reported_as_ipv4() -> None:
    assert resolve_client_ip("::ffff:198.51.100.1", {}, TRUSTED) == "198.51.100.1"
