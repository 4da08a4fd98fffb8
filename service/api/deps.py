"""Shared dependencies as `Annotated` aliases: the services, the caller's identity, a job id."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated

import redis
import redis.asyncio as aredis
from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.api.probe_slots import ProbeSlots
from service.api.problems import Problem
from service.config import Settings
from service.jobs.keys import JOB_ID, valid_job_id
from service.jobs.lifecycle import Jobs
from service.jobs.redis_clients import async_client, sync_client
from service.jobs.storage import Storage, open_storage
from service.jobs.streams import Streams
from service.model.presets import ModelConfig

EVENTS_BLOCK_MS = 500


@dataclass
class Services:
    settings: Settings
    model: ModelConfig  # the served model's preset: clip plan of new jobs
    redis: redis.Redis
    aredis: aredis.Redis  # event streams: waiting on Redis without holding a thread
    jobs: Jobs
    storage: Storage
    probes: ProbeSlots  # admission's probes: threads of their own, so they never starve other routes
    streams: Streams  # live streams (service.jobs.streams)
    open_streams: int = field(default=0)  # event streams (SSE) open on this process

    @classmethod
    def connect(cls, settings: Settings, model: ModelConfig) -> Services:
        # No retries and short timeouts: with Redis down a request answers 503 at once.
        # A hung Redis (accepting, never answering) too: every call gives up after the timeout.
        # Pools sized from the settings: every API thread may hold one connection, every event
        # stream one (it sits in XREAD); a full pool raises MaxConnectionsError, answered 503 as such.
        t = settings.redis_timeout_s
        sync_size, async_size = settings.redis_pool_sizes
        r = sync_client(settings.redis_url, socket_connect_timeout=t, socket_timeout=t,
                        retry=Retry(NoBackoff(), 0), max_connections=sync_size)
        # Event streams block in XREAD for EVENTS_BLOCK_MS: their client waits that much longer.
        ar = async_client(settings.redis_url, socket_connect_timeout=t, socket_timeout=t + EVENTS_BLOCK_MS / 1000,
                          retry=AsyncRetry(NoBackoff(), 0), max_connections=async_size)
        storage = open_storage(settings)
        jobs = Jobs(r, settings.redis_prefix, settings.job_ttl_s, storage, settings.visibility_timeout_s)
        probes = ProbeSlots(settings.max_concurrent_probes, settings.max_probes_per_key, settings.retry_after_s,
                            settings.probe_wait_s)
        streams = Streams(r, settings.redis_prefix, settings.job_ttl_s, storage, settings.visibility_timeout_s)
        return cls(settings, model, r, ar, jobs, storage, probes, streams)


async def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


# Declared for OpenAPI (the security schemes /docs offers); the key itself is read below from the
# raw headers, byte for byte.
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="APIKey",
                        description="One of STEMSEG_API_KEYS (needed only when the service sets keys)")
_BEARER = HTTPBearer(auto_error=False, scheme_name="Bearer", description="The same key as a bearer token")


async def caller(request: Request, svc: ServicesDep, _key: Annotated[str | None, Security(_API_KEY)] = None,
                 _bearer: Annotated[object, Security(_BEARER)] = None) -> str:
    """The owner id of the caller: a hash of its API key, or "" when keys are off. Async (no I/O):
    dependencies then take no thread of the shared pool."""
    keys = svc.settings.api_key_list
    if not keys:
        return ""
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip(" \t")  # HTTP whitespace only: str.strip() would also drop \x85 (NEL)
    # Headers arrive as latin-1 text: compare their raw bytes, so any byte is just a wrong key.
    raw = given.encode("latin-1", "replace")
    if not any(hmac.compare_digest(raw, k.encode()) for k in keys):
        raise Problem(401, "a valid API key is required (header X-API-Key or Authorization: Bearer)",
                      headers={"WWW-Authenticate": "Bearer"})
    return hashlib.sha256(raw).hexdigest()[:24]


OwnerDep = Annotated[str, Depends(caller)]
async def job_id(job_id: Annotated[str, Path(description="the job's id, 32 hex digits",
                                       json_schema_extra={"pattern": JOB_ID.pattern})]) -> str:
    """Checked by format before any Redis call: a malformed id is simply no job (404)."""
    if not valid_job_id(job_id):
        raise Problem(404, "no such job (a job id is 32 hex digits)")
    return job_id


JobIdPath = Annotated[str, Depends(job_id)]


async def stream_id(stream_id: Annotated[str, Path(description="the live stream's id, 32 hex digits",
                                             json_schema_extra={"pattern": JOB_ID.pattern})]) -> str:
    """Checked by format before any Redis call: a malformed id is simply no stream (404)."""
    if not valid_job_id(stream_id):
        raise Problem(404, "no such stream (a stream id is 32 hex digits)")
    return stream_id


StreamIdPath = Annotated[str, Depends(stream_id)]
