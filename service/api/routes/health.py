"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from service.api.deps import Services, services
from service.api.problems import Problem
from service.jobs.worker import live_workers

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unreachable or no live worker"}})
def readyz(svc: Annotated[Services, Depends(services)]) -> dict[str, object]:
    try:
        svc.redis.ping()
        workers = live_workers(svc.redis, svc.settings.redis_prefix)
    except redis.RedisError as e:
        raise Problem(503, f"Redis is unreachable: {e}") from None
    if workers == 0:
        raise Problem(503, "no live worker: start one with `stemseg worker`")
    return {"status": "ready", "workers": workers}


@router.get("/metrics", response_class=Response)
def metrics(svc: Annotated[Services, Depends(services)]) -> Response:
    """Read from Redis on each scrape, so every API replica reports the same numbers."""
    reg = CollectorRegistry()
    jobs = Gauge("stemseg_jobs", "Jobs by state", ["state"], registry=reg)
    for state, n in svc.jobs.counts().items():
        jobs.labels(state).set(n)
    Gauge("stemseg_queue_depth", "Clip tasks waiting or held", registry=reg).set(svc.queue.depth())
    Gauge("stemseg_workers", "Workers with a live heartbeat", registry=reg).set(
        live_workers(svc.redis, svc.settings.redis_prefix))
    raw = svc.redis.hgetall(f"{svc.settings.redis_prefix}:stats:clips")
    count, seconds, frames = (float(raw.get(k, 0)) for k in (b"count", b"seconds", b"frames"))
    Gauge("stemseg_clips_processed", "Clips processed by all workers", registry=reg).set(count)
    Gauge("stemseg_clip_seconds_total", "Seconds workers spent per clip, summed", registry=reg).set(seconds)
    Gauge("stemseg_clip_latency_seconds", "Mean seconds per clip", registry=reg).set(seconds / count if count else 0)
    Gauge("stemseg_frames_per_second", "Frames finished per worker-second", registry=reg).set(
        frames / seconds if seconds else 0)
    return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)
