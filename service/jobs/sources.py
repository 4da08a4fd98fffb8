"""Videos by reference: `POST /v1/jobs` with `{"source": "https://host/video.mp4"}`.

The API fetches the source into the job's staging file, counting bytes as they arrive, and then
admits it exactly as an upload (the same probe, limits and plan). Fetching on behalf of a client
makes the service a proxy into the network it runs in, so nothing is reachable by default:

- the URL's host and port must be listed in `STEMSEG_SOURCE_HOSTS` (as `STEMSEG_WEBHOOK_HOSTS`:
  a host alone allows its scheme's default port only);
- every address the host resolves to is checked, and the connection goes to the address that
  was checked (a second DNS answer cannot point it elsewhere); loopback, private, link-local,
  shared and reserved addresses are refused unless they fall in `STEMSEG_SOURCE_PRIVATE_NETS`;
- redirects are not followed (a 3xx is an answer naming where it points, not a fetch of it);
- the byte limit (`STEMSEG_MAX_UPLOAD_BYTES`) holds while reading, a source that sends nothing
  for `STEMSEG_SOURCE_IDLE_TIMEOUT_S` or takes longer than `STEMSEG_SOURCE_TIMEOUT_S` in all is
  cut off.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from service.errors import ClientError
from service.jobs.webhooks import allowed_target, parse_allowed

_SCHEMES = {"http": 80, "https": 443}
_CHUNK = 1 << 20
_USER_AGENT = "stemseg-serve (source fetch)"


class SourceRefused(ClientError):
    """The source may not or cannot be fetched: the message says why, naming only what the client sent."""


class SourceTooLarge(ClientError):
    """The source is larger than the byte limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the source is larger than the limit of {limit} bytes (STEMSEG_MAX_UPLOAD_BYTES)")
        self.limit = limit

    def __reduce__(self):
        return type(self), (self.limit,)


def parse_nets(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """`STEMSEG_SOURCE_PRIVATE_NETS`: comma-separated CIDRs (or single addresses); ValueError names a bad one."""
    nets = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or a network in CIDR form") from None
    return nets


def check_source(url: str, allowed_hosts: list[str]) -> str | None:
    """Why `url` may not be fetched, from the URL alone (None: it may be, as far as that goes)."""
    if len(url) > 2048:
        return "source is longer than 2048 characters"
    if any(ord(ch) <= 0x20 or ord(ch) >= 0x7F for ch in url):
        return "source must not contain whitespace, control or non-ASCII characters (percent-encode them)"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "source is not a valid URL"
    if parts.scheme == "s3":
        return "s3:// sources are not supported by this service; give an https:// URL (e.g. a presigned one)"
    if parts.scheme not in _SCHEMES or not host:
        return "source must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "source must not carry credentials in the URL"
    shown = allowed_target(host, port if port is not None else _SCHEMES[parts.scheme], _SCHEMES[parts.scheme],
                           parse_allowed(allowed_hosts))
    if shown is not None:
        return f"source's host and port {shown} are not allowed (STEMSEG_SOURCE_HOSTS)"
    return None


def _usable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in nets if net.version == ip.version):
        return True
    return ip.is_global and not ip.is_multicast


def _address(host: str, port: int, nets: list, timeout_s: float) -> str:
    """The first address of `host` that may be connected to; SourceRefused when none may."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        candidates = [literal]
    else:
        result: list = []
        done = threading.Event()

        def resolve() -> None:  # getaddrinfo has no timeout of its own
            try:
                result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except OSError:
                pass
            done.set()

        threading.Thread(target=resolve, daemon=True).start()
        if not done.wait(timeout_s) or not result:
            raise SourceRefused(f"the source's host {host} could not be resolved")
        candidates = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in result]
    for ip in candidates:
        if _usable(ip, nets):
            return str(ip)
    raise SourceRefused(f"the source's host {host} resolves only to private, loopback or reserved addresses, "
                        "which are not allowed (STEMSEG_SOURCE_PRIVATE_NETS)")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the name resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)


def fetch(url: str, out: BinaryIO, *, allowed_hosts: list[str], private_nets: list, max_bytes: int,
          timeout_s: float, idle_s: float) -> str | None:
    """GET `url` into `out` within the rules above; returns the file name its path ends with.
    SourceRefused (the client's to fix or retry) or SourceTooLarge; nothing else escapes."""
    why = check_source(url, allowed_hosts)
    if why:
        raise SourceRefused(why)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or _SCHEMES[parts.scheme]
    deadline = time.monotonic() + timeout_s
    address = _address(host, port, private_nets, min(idle_s, timeout_s))
    cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, port, address, timeout=min(idle_s, timeout_s))
    expired = threading.Event()

    def cut() -> None:  # the whole fetch's deadline: unblocks whatever socket call is under way
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout_s, cut)
    timer.daemon = True
    timer.start()
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept": "*/*",
                                             "Accept-Encoding": "identity"})
        answer = conn.getresponse()
        if 300 <= answer.status < 400:
            raise SourceRefused(f"the source answered {answer.status} (a redirect); redirects are not followed, "
                                "give the final URL")
        if answer.status != 200:
            raise SourceRefused(f"the source answered {answer.status} {answer.reason}".rstrip())
        declared = answer.getheader("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise SourceTooLarge(max_bytes)
        size = 0
        while True:
            chunk = answer.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise SourceTooLarge(max_bytes)
            out.write(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError
        if expired.is_set():  # the deadline's shutdown reads as the end of the body
            raise TimeoutError
        if declared.isdigit() and size < int(declared):
            raise SourceRefused(f"the source ended after {size} of {declared} bytes")
        if size == 0:
            raise SourceRefused("the source is empty")
    except (SourceRefused, SourceTooLarge):
        raise
    except TimeoutError:
        raise SourceRefused(_timed_out(expired.is_set(), timeout_s, idle_s)) from None
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set():
            raise SourceRefused(_timed_out(True, timeout_s, idle_s)) from None
        if isinstance(e, ssl.SSLError):
            raise SourceRefused("the source's TLS connection failed (certificate or protocol)") from None
        raise SourceRefused("the source could not be reached or broke off the connection") from None
    finally:
        timer.cancel()
        conn.close()
    name = unquote(parts.path.rsplit("/", 1)[-1]) if parts.path else ""
    return name or None


def _timed_out(whole: bool, timeout_s: float, idle_s: float) -> str:
    if whole:
        return f"fetching the source took longer than {timeout_s:g} s (STEMSEG_SOURCE_TIMEOUT_S)"
    return f"the source sent nothing for {idle_s:g} s (STEMSEG_SOURCE_IDLE_TIMEOUT_S)"


__all__ = ["SourceRefused", "SourceTooLarge", "check_source", "fetch", "parse_nets"]
