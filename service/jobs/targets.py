"""Where a client may make the service connect: one owner for the rules that callback URLs
(STEMSEG_WEBHOOK_HOSTS), videos by reference (STEMSEG_SOURCE_HOSTS) and live streams
(STEMSEG_STREAM_HOSTS) share.

A URL a client gives makes the service connect from inside the network it runs in, so the same
checks come first for all three, in one place so that they cannot drift apart: a bounded length,
no whitespace, control or non-ASCII character (they would be stored raw and reach logs and
request lines), a syntax Python parses (the port included), a scheme the caller takes and a host,
and the host and port listed in the caller's allow-list (`host`, `host:port`, `[v6]`,
`[v6]:port`; a host listed alone: its scheme's default port only, so no listed host becomes a
port scanner). `usable_address` is the rule for the addresses a name resolves to.
Standard library only: the settings import `parse_allowed` to check their lists at start-up.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS = 2048
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?")


def _canonical_host(host: str) -> str:
    host = host.strip().lower().removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.rstrip(".")


def _port(text: str, entry: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def parse_allowed(entries: list[str]) -> set[tuple[str, int | None]]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` -> (host, port); port None: the URL's scheme's
    default port only. An entry that is none of these raises ValueError naming it: nothing is
    guessed (a bare `::1:8080` could be an address or an address and a port)."""
    out: set[tuple[str, int | None]] = set()
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        port = None
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"{raw.strip()!r}: write an IPv6 address as [address] or [address]:port")
            if rest:
                port = _port(rest[1:], raw.strip())
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{raw.strip()!r}: {host!r} is not an IPv6 address") from None
        elif ":" in entry:
            host, _, p = entry.partition(":")
            if ":" in p:
                raise ValueError(f"{raw.strip()!r}: write an IPv6 address in brackets, [address] or [address]:port")
            port = _port(p, raw.strip())
        else:
            host = entry
        if not entry.startswith("[") and not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{raw.strip()!r}: {host!r} is not a host name or IPv4 address")
        out.add((_canonical_host(host), port))
    return out


def allowed_target(host: str, port: int, default_port: int, allowed: set[tuple[str, int | None]]) -> str | None:
    """None when `parse_allowed`'s set lets (host, port) be connected to (a host listed alone:
    `default_port` only); otherwise host:port as a message shows it."""
    host = _canonical_host(host)
    if (host, port) in allowed or (port == default_port and (host, None) in allowed):
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_url(url: str, field: str) -> SplitResult | str:
    """`url` split, or why it is no URL the service takes: too long, a character that must be
    percent-encoded, or a syntax (port included) Python cannot parse. `field` names it in the message."""
    if len(url) > MAX_URL_CHARS:
        return f"{field} is longer than {MAX_URL_CHARS} characters"
    if any(ord(ch) <= 0x20 or ord(ch) >= 0x7F for ch in url):
        return f"{field} must not contain whitespace, control or non-ASCII characters (percent-encode them)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return f"{field} is not a valid URL"
    return parts


def _schemes(names: list[str]) -> str:
    shown = [f"{n}://" for n in names]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def check_target(parts: SplitResult, field: str, default_ports: Mapping[str, int | None], allowed: list[str],
                 setting: str, *, credentials: bool = False) -> str | None:
    """Why `split_url`'s `parts` may not be connected to (None: they may, as far as the URL goes):
    a scheme of `default_ports` (None: that scheme's URLs must give their port) with a host, no
    user:password unless `credentials`, and the host and port listed in `allowed` (`setting`, the
    list's name, is shown with a refusal)."""
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in default_ports or not host:
        return f"{field} must be a URL with a host, starting {_schemes(list(default_ports))}"
    if not credentials and (parts.username or parts.password):
        return f"{field} must not carry credentials"
    default = default_ports[scheme]
    if parts.port is None and default is None:
        return f"a {scheme}:// {field} must give its port"
    port = parts.port if parts.port is not None else default
    shown = allowed_target(host, port, default if default is not None else -1, parse_allowed(allowed))
    if shown is not None:
        return f"{field}'s host and port {shown} are not allowed ({setting})"
    return None


def usable_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list) -> bool:
    """Public (and not multicast), or inside one of `nets` (STEMSEG_SOURCE_PRIVATE_NETS)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in nets if net.version == ip.version):
        return True
    return ip.is_global and not ip.is_multicast


__all__ = ["MAX_URL_CHARS", "allowed_target", "check_target", "parse_allowed", "split_url", "usable_address"]
