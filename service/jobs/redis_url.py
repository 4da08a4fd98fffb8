"""`STEMSEG_REDIS_URL`: which Redis deployment it names (service.jobs.redis_clients makes the
clients). Standard library only, so the settings can check the URL without redis-py installed.

Three deployments, told apart by the URL's scheme:

* `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, `rediss://...`, `unix://...`: one server,
  as redis-py's `from_url` reads them.
* `redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]` (`rediss+cluster://` for TLS):
  Redis Cluster, the nodes listed being only where the client starts (it learns the rest). A
  cluster has database 0 only, so a path is refused.
* `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`
  (`rediss+sentinel://`): the master that the Sentinels name SERVICE; the client asks them
  again after a failover. The password is the data servers' (the Sentinels are asked without one).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SINGLE, CLUSTER, SENTINEL = "single", "cluster", "sentinel"
_SCHEMES = {"redis": SINGLE, "rediss": SINGLE, "unix": SINGLE, "redis+cluster": CLUSTER, "rediss+cluster": CLUSTER,
            "redis+sentinel": SENTINEL, "rediss+sentinel": SENTINEL}


@dataclass(frozen=True)
class RedisTarget:
    kind: str  # SINGLE, CLUSTER or SENTINEL
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""  # Sentinel: the master's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def _nodes(netloc: str, url: str) -> tuple[tuple[str, int], ...]:
    hosts = netloc.rpartition("@")[2]
    out = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{redacted_url(url)}: list the nodes as HOST:PORT[,HOST:PORT...]")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def redacted_url(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    creds, at, hosts = rest.rpartition("@")
    return f"{scheme}://{creds.partition(':')[0] + ':***@' if at else ''}{hosts}"


def parse_redis_url(url: str) -> RedisTarget:
    """Which deployment `url` names; ValueError (naming the URL without its password) if none."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    kind = _SCHEMES.get(scheme)
    if kind is None:
        raise ValueError(f"{redacted_url(url)}: the Redis URL must start with one of "
                         f"{', '.join(s + '://' for s in _SCHEMES)}")
    if kind == SINGLE:
        return RedisTarget(SINGLE, url)
    parts = urlsplit(url)
    creds = parts.netloc.rpartition("@")[0]
    user, _, password = creds.partition(":") if creds else ("", "", "")
    common = {"nodes": _nodes(parts.netloc, url), "username": unquote(user) or None,
              "password": unquote(password) or None, "tls": scheme.startswith("rediss")}
    path = [p for p in parts.path.split("/") if p]
    if kind == CLUSTER:
        if path:
            raise ValueError(f"{redacted_url(url)}: a Redis Cluster has database 0 only; give no path")
        return RedisTarget(CLUSTER, url, **common)
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{redacted_url(url)}: a Sentinel URL ends in /SERVICE or /SERVICE/DB")
    return RedisTarget(SENTINEL, url, service=unquote(path[0]), db=int(path[1]) if len(path) == 2 else 0, **common)
