"""Videos by reference: `POST /v1/jobs` with `{"source": "https://host/video.mp4"}` or
`{"source": "s3://bucket/key"}`.

The API fetches the source into the job's staging file, counting bytes as they arrive, and then
admits it exactly as an upload (the same probe, limits and plan). Fetching on behalf of a client
makes the service a proxy into the network it runs in, so nothing is reachable by default:

- the URL's host and port must be listed in `STEMSEG_SOURCE_HOSTS` (as `STEMSEG_WEBHOOK_HOSTS`:
  a host alone allows its scheme's default port only);
- every address the host resolves to is checked, and the connection goes to the address that
  was checked (a second DNS answer cannot point it elsewhere); loopback, private, link-local,
  shared and reserved addresses are refused unless they fall in `STEMSEG_SOURCE_PRIVATE_NETS`;
- redirects are not followed (a 3xx is an answer naming where it points, not a fetch of it);
- an s3:// source's bucket must be listed in `STEMSEG_SOURCE_BUCKETS`; it is read with GetObject
  from `STEMSEG_S3_ENDPOINT_URL` (AWS when unset) with the standard AWS credential chain, and a
  store that is down or failing is the service's fault (503), not the client's;
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
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from service.config import Settings
from service.errors import ClientError, UserError
from service.jobs.deadline import cut_at
from service.jobs.targets import check_target, split_url, usable_address

_SCHEMES = {"http": 80, "https": 443}
_CHUNK = 1 << 20
_USER_AGENT = "stemseg-serve (source fetch)"


@dataclass(frozen=True)
class SourcePolicy:
    """What may be fetched and how long it may take: the STEMSEG_SOURCE_* settings."""

    hosts: list[str] = field(default_factory=list)  # STEMSEG_SOURCE_HOSTS, parse_allowed's entries
    private_nets: list = field(default_factory=list)  # STEMSEG_SOURCE_PRIVATE_NETS, parsed
    buckets: list[str] = field(default_factory=list)  # STEMSEG_SOURCE_BUCKETS
    s3_endpoint_url: str | None = None  # STEMSEG_S3_ENDPOINT_URL; None: AWS's
    max_bytes: int = 2 * 1024**3
    timeout_s: float = 300.0
    idle_s: float = 15.0

    @classmethod
    def from_settings(cls, s: Settings) -> SourcePolicy:
        return cls(hosts=s.source_host_list, private_nets=parse_nets(s.source_private_nets),
                   buckets=s.source_bucket_list, s3_endpoint_url=s.s3_endpoint_url or None,
                   max_bytes=s.max_upload_bytes, timeout_s=s.source_timeout_s, idle_s=s.source_idle_timeout_s)


class SourceUnavailable(Exception):
    """The object store behind an s3:// source is down or failing: the service's side, retry later."""


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


def check_source(url: str, policy: SourcePolicy) -> str | None:
    """Why `url` may not be fetched, from the URL alone (None: it may be, as far as that goes)."""
    parts = split_url(url, "source")
    if isinstance(parts, str):
        return parts
    if parts.scheme == "s3":
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not bucket or not key or parts.query or parts.fragment:
            return "an s3:// source is s3://BUCKET/KEY"
        if bucket not in policy.buckets:
            return f"source's bucket {bucket} is not allowed (STEMSEG_SOURCE_BUCKETS)"
        return None
    return check_target(parts, "source", _SCHEMES, policy.hosts, "STEMSEG_SOURCE_HOSTS")


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
        if usable_address(ip, nets):
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


def fetch(url: str, out: BinaryIO, policy: SourcePolicy) -> str | None:
    """Fetch `url` into `out` within the policy; returns the file name its path ends with.
    SourceRefused (the client's to fix), SourceTooLarge, or SourceUnavailable (the object
    store's fault); nothing else escapes."""
    why = check_source(url, policy)
    if why:
        raise SourceRefused(why)
    if url.startswith("s3://"):
        return _fetch_s3(url, out, policy)
    timeout_s, idle_s, max_bytes = policy.timeout_s, policy.idle_s, policy.max_bytes
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or _SCHEMES[parts.scheme]
    deadline = time.monotonic() + timeout_s
    address = _address(host, port, policy.private_nets, min(idle_s, timeout_s))
    cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, port, address, timeout=min(idle_s, timeout_s))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        with cut_at(conn, timeout_s) as expired:
            try:
                _get(conn, target, out, max_bytes, deadline, expired)
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
        conn.close()
    return _name(parts.path)


def _name(path: str) -> str | None:
    return unquote(path.rsplit("/", 1)[-1]) or None


def _fetch_s3(url: str, out: BinaryIO, policy: SourcePolicy) -> str | None:
    """GetObject, streamed; credentials from the standard AWS chain (environment, profile, role)."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
        from botocore.exceptions import ClientError as S3Error
    except ImportError:
        raise UserError("s3:// sources need boto3: pip install 'stemseg-serve[s3]'") from None
    parts = urlsplit(url)
    bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
    # A session per fetch: credentials as the chain has them now (rotated keys, refreshed roles).
    client = boto3.session.Session().client("s3", endpoint_url=policy.s3_endpoint_url, config=Config(
        connect_timeout=policy.idle_s, read_timeout=policy.idle_s, retries={"max_attempts": 2, "mode": "standard"}))
    deadline = time.monotonic() + policy.timeout_s
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
        if obj.get("ContentLength", 0) > policy.max_bytes:
            obj["Body"].close()
            raise SourceTooLarge(policy.max_bytes)
        size = 0
        for chunk in obj["Body"].iter_chunks(_CHUNK):
            size += len(chunk)
            if size > policy.max_bytes:
                raise SourceTooLarge(policy.max_bytes)
            out.write(chunk)
            if time.monotonic() > deadline:
                raise SourceRefused(_timed_out(True, policy.timeout_s, policy.idle_s))
        if size == 0:
            raise SourceRefused("the source is empty")
    except S3Error as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            raise SourceRefused(f"the source {url} does not exist") from None
        if status == 403 or code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
            raise SourceRefused(f"the object store refused access to {url} ({code or status})") from None
        raise SourceUnavailable(f"the object store failed ({code or status})") from None
    except (BotoCoreError, OSError) as e:
        if "timeout" in type(e).__name__.lower():
            raise SourceRefused(_timed_out(False, policy.timeout_s, policy.idle_s)) from None
        raise SourceUnavailable(f"the object store could not be reached ({type(e).__name__})") from None
    finally:
        client.close()
    return _name(parts.path)


def _get(conn: http.client.HTTPConnection, target: str, out: BinaryIO, max_bytes: int, deadline: float,
         expired) -> None:
    conn.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"})
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
    while chunk := answer.read1(_CHUNK):
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


def _timed_out(whole: bool, timeout_s: float, idle_s: float) -> str:
    if whole:
        return f"fetching the source took longer than {timeout_s:g} s (STEMSEG_SOURCE_TIMEOUT_S)"
    return f"the source sent nothing for {idle_s:g} s (STEMSEG_SOURCE_IDLE_TIMEOUT_S)"


__all__ = [
    "SourcePolicy",
    "SourceRefused",
    "SourceTooLarge",
    "SourceUnavailable",
    "check_source",
    "fetch",
    "parse_nets",
]
