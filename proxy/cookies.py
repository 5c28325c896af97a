"""First-party visitor cookies and the tracking pixel's pieces: the GIF, which cookies may go
upstream, the site's registrable domain, and Set-Cookie lines for __eventn_id.

Jitsu would set __eventn_id on its own host, which the browser rejects behind a proxy
(research notes §3.10, §4.4); the proxy sets it on the site's domain itself.
"""

from __future__ import annotations

import base64
import ipaddress
from urllib.parse import urlsplit

# A transparent 1x1 GIF, 43 bytes, as Jitsu's pixel answers.
GIF = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
NO_CACHE = {
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "Expires": "0",
}
# Only Jitsu's own cookies ever go upstream, and only on the pixel route.
FORWARDED_PREFIXES = ("__eventn_", "__group_")
# Five years, as jitsu-js and Jitsu's ITP endpoint use.
MAX_AGE_S = 157_680_000
# Second-level labels under which registrations happen (co.uk, com.au, ...). Without the
# public suffix list this covers the common cases; `privacy.cookie_domain` overrides it.
_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go"})


def forwarded_cookies(header: str) -> str:
    """The Cookie header reduced to Jitsu's own cookies."""
    kept = []
    for part in header.split(";"):
        name, sep, _value = part.strip().partition("=")
        if sep and name.startswith(FORWARDED_PREFIXES):
            kept.append(part.strip())
    return "; ".join(kept)


def read_cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


def registrable_domain(host: str) -> str:
    """example.com for www.shop.example.com; example.co.uk for a.example.co.uk; an IP or a
    single label stays as it is."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("["):
        return host
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.split(".")
    if len(labels) <= 2:
        return host
    keep = 3 if len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL else 2
    return ".".join(labels[-keep:])


def host_within(host: str, domain: str) -> bool:
    """Whether the hostname `host` is `domain` or below it."""
    host = host.lower()
    domain = domain.lower().lstrip(".")
    return bool(domain) and (host == domain or host.endswith("." + domain))


def set_cookie(name: str, value: str, domain: str, *, secure: bool, http_only: bool = False) -> str:
    parts = [f"{name}={value}", f"Max-Age={MAX_AGE_S}", "Path=/"]
    # A bare IP or a single-label host cannot carry a Domain attribute.
    if "." in domain and not _is_ip(domain):
        parts.append(f"Domain={domain}")
    # SameSite=None is only accepted with Secure; on plain http, Lax is what works.
    parts += ["SameSite=None", "Secure"] if secure else ["SameSite=Lax"]
    if http_only:
        parts.append("HttpOnly")
    return "; ".join(parts)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        return False


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def valid_destination(url: str, request_hostname: str) -> bool:
    """Jitsu's rules for the pixel's redirect (router_pixel_handler.go extractRedirectUrl):
    https, no port in the URL (not even :443), a name (not an IP), and not the pixel's own
    host (no redirect loops)."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return False  # CR/LF/NUL or spaces would end up in the Location header
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or not host or port is not None or _is_ip(host):
        return False
    return host != request_hostname.lower()


def header_safe(text: str) -> str:
    """Printable ASCII for a response header value (errors quote client input)."""
    return "".join(c if 0x20 <= ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in text)
