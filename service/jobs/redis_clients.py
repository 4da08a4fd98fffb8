"""The one place Redis clients are made (API, workers, sweeper, CLI, tests), for the deployment
`STEMSEG_REDIS_URL` names (service.jobs.redis_url): one server, Redis Cluster or Sentinel.

The service's code is the same on all three: every script and transaction touches keys of one
hash slot (service.jobs.keys), which a single server does not mind.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from service.jobs.redis_url import CLUSTER, SINGLE, RedisTarget, parse_redis_url

# What a Redis call may raise when the store is away: redis-py's cluster client raises some
# errors outside RedisError (no node reachable, a slot with no master while one restarts).
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, redis.exceptions.RedisClusterException)
# Of those, the ones that mean "unreachable for now" (not a refused command).
UNREACHABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError,
                                            redis.exceptions.ClusterError, redis.exceptions.RedisClusterException)


def _auth(t: RedisTarget) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if t.username:
        out["username"] = t.username
    if t.password:
        out["password"] = t.password
    if t.tls:
        out["ssl"] = True
    return out


def sync_client(url: str, **kwargs: Any) -> redis.Redis | RedisCluster:
    """A client for `url`; `kwargs` are redis-py's connection options (timeouts, retry,
    max_connections: per node on a cluster)."""
    t = parse_redis_url(url)
    if t.kind == SINGLE:
        return redis.Redis.from_url(url, **kwargs)
    if t.kind == CLUSTER:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in t.nodes], **_auth(t), **kwargs)
    timeouts = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kwargs}
    sentinel = Sentinel(list(t.nodes), sentinel_kwargs={**timeouts, **({"ssl": True} if t.tls else {})})
    return sentinel.master_for(t.service, db=t.db, **_auth(t), **kwargs)


def async_client(url: str, **kwargs: Any) -> aredis.Redis | AsyncRedisCluster:
    """`sync_client` for redis.asyncio."""
    t = parse_redis_url(url)
    if t.kind == SINGLE:
        return aredis.Redis.from_url(url, **kwargs)
    if t.kind == CLUSTER:
        return AsyncRedisCluster(startup_nodes=[AsyncClusterNode(h, p) for h, p in t.nodes], **_auth(t), **kwargs)
    timeouts = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kwargs}
    sentinel = AsyncSentinel(list(t.nodes), sentinel_kwargs={**timeouts, **({"ssl": True} if t.tls else {})})
    return sentinel.master_for(t.service, db=t.db, **_auth(t), **kwargs)
