"""Which live sources the service may open for a client: `STEMSEG_STREAM_HOSTS`.

As for videos by reference (service.jobs.sources), whose rules these are: a stream URL makes a
worker connect wherever it says, from inside the network it runs in, so nothing is allowed by
default. The URL's host and port must be listed (`host`, `host:port`, `[v6]`, `[v6]:port`; a host
alone: its scheme's default port only), and every address the host resolves to must be public
or inside `STEMSEG_SOURCE_PRIVATE_NETS`: every one, not the first, because FFmpeg resolves the
name again when it connects and may take any of them. A deployment that must not reach its own
network should still restrict the workers' egress (a DNS answer can change in between).
Credentials in the URL (RTSP cameras) are allowed; they are never shown (service.video.live.redact).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from service.jobs.targets import check_target, parse_allowed, split_url, usable_address
from service.video.live import NETWORK_SCHEMES

# Ports a URL without one connects to; a scheme missing here must give its port.
DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "rtmps": 443, "http": 80, "https": 443}
Resolver = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0].split("%")[0] for info in socket.getaddrinfo(host, port)})


def check_stream_url(url: str, hosts: list[str], private_nets: list, resolve: Resolver = _resolve) -> str | None:
    """Why a client may not have the service open `url` (None: it may); names nothing but the URL's host."""
    allowed = parse_allowed(hosts)
    if not allowed:
        return "live streams are not enabled on this service (STEMSEG_STREAM_HOSTS lists no hosts)"
    parts = split_url(url, "url")
    if isinstance(parts, str):
        return parts
    why = check_target(parts, "url", {s: DEFAULT_PORTS.get(s) for s in NETWORK_SCHEMES}, hosts, "STEMSEG_STREAM_HOSTS",
                       credentials=True)
    if why:
        return why
    host = parts.hostname or ""
    port = parts.port if parts.port is not None else DEFAULT_PORTS[parts.scheme.lower()]
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(a) for a in resolve(host, port)]
        except (OSError, ValueError):
            addresses = []
        if not addresses:
            return f"url's host {host} could not be resolved"
    if not all(usable_address(ip, private_nets) for ip in addresses):
        return (f"url's host {host} resolves to a private, loopback or reserved address, which is not allowed "
                "(STEMSEG_SOURCE_PRIVATE_NETS)")
    return None


__all__ = ["DEFAULT_PORTS", "check_stream_url"]
