"""Which live sources the service may open for a client (`STEMSEG_STREAM_SOURCES`).

A stream URL makes a worker connect wherever it says, from inside the network it runs in, so
nothing is allowed by default, as for webhooks. Entries are `host`, `host:port`, `[v6]`,
`[v6]:port` (a host alone: its scheme's default port only) or a network `a.b.c.d/n` (any host
in it, any port). Every address a host name resolves to must be public (`ipaddress`'s
`is_global`) unless a listed network or the address itself (listed as the host) names it:
listing a name never opens a private range, since whoever controls its DNS could point it
anywhere. FFmpeg resolves the name again when it connects, so a deployment that must not
reach its own network should also restrict the workers' egress.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.jobs.webhooks import _canonical_host, parse_allowed
from service.video.live import NETWORK_SCHEMES

# Ports a URL without one connects to; a scheme missing here needs an explicit port.
DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "rtmps": 443, "http": 80, "https": 443}
Resolver = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


@dataclass(frozen=True)
class StreamSources:
    hosts: frozenset[tuple[str, int | None]]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, value: str) -> StreamSources:
        """The setting's entries; ValueError naming the first that is none of the forms."""
        hosts, networks = [], []
        for raw in value.split(","):
            entry = raw.strip()
            if "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"{entry!r}: not a network (a.b.c.d/n or v6/n)") from None
            elif entry:
                hosts.append(entry)
        return cls(frozenset(parse_allowed(hosts)), tuple(networks))

    @property
    def empty(self) -> bool:
        return not self.hosts and not self.networks

    def _in_networks(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.networks)

    def check(self, url: str, resolve: Resolver = _resolve) -> str | None:
        """Why a client may not have the service open `url` (None: it may); names nothing but the URL's host."""
        if self.empty:
            return "live streams are not enabled on this service (STEMSEG_STREAM_SOURCES lists no sources)"
        if len(url) > 2048:
            return "url is longer than 2048 characters"
        if any(ord(ch) <= 0x20 or ord(ch) >= 0x7F for ch in url):
            return "url must not contain whitespace, control or non-ASCII characters (percent-encode them)"
        try:
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port
        except ValueError:
            return "url is not a valid URL"
        scheme = parts.scheme.lower()
        if scheme not in NETWORK_SCHEMES:
            return f"url's scheme must be one of {', '.join(NETWORK_SCHEMES)}"
        if not host:
            return "url must name a host"
        if port is None and scheme not in DEFAULT_PORTS:
            return f"a {scheme}:// url must give its port"
        host = _canonical_host(host)
        default = DEFAULT_PORTS.get(scheme)
        port = port if port is not None else default
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        listed = (host, port) in self.hosts or (port == default and (host, None) in self.hosts)
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            # An address: listed as itself (any range), or inside a listed network.
            if listed or self._in_networks(host):
                return None
            return f"url's host and port {shown} are not allowed (STEMSEG_STREAM_SOURCES)"
        if not listed and not self.networks:
            return f"url's host and port {shown} are not allowed (STEMSEG_STREAM_SOURCES)"
        try:
            addresses = resolve(host, port)
        except OSError:
            return f"url's host {host} does not resolve"
        if not addresses:
            return f"url's host {host} does not resolve"
        for address in addresses:
            inside = self._in_networks(address)
            if not inside and not (listed and ipaddress.ip_address(address).is_global):
                why = "a private or reserved address" if not ipaddress.ip_address(address).is_global else "an address"
                return (f"url's host {host} resolves to {why} that STEMSEG_STREAM_SOURCES does not list "
                        "(list its network to allow it)")
        return None


__all__ = ["DEFAULT_PORTS", "StreamSources"]
