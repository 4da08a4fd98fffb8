"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.concurrency import run_in_threadpool

from service.api.deps import ServicesDep
from service.api.problems import Problem, responses

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers; depends on nothing else (not Redis)."""
    return {"status": "ok"}


@router.get("/readyz", responses=responses(503, s503="No live worker (start one with `stemseg worker`), or Redis "
                                                       "is unreachable; see Retry-After"))
def readyz(svc: ServicesDep) -> dict[str, object]:
    workers = svc.jobs.live_workers()  # Redis down: 503 from the handler
    if workers == 0:
        raise Problem(503, "no live worker: start one with `stemseg worker`",
                      headers={"Retry-After": str(svc.settings.retry_after_s)})
    return {"status": "ready", "workers": workers}


def _metrics(svc) -> bytes:
    reg = CollectorRegistry()
    jobs = Gauge("stemseg_jobs", "Jobs by state (unexpired)", ["state"], registry=reg)
    for state, n in svc.jobs.counts().items():
        jobs.labels(state).set(n)
    Gauge("stemseg_queue_depth", "Clip tasks waiting or held", registry=reg).set(svc.jobs.queue.depth())
    Gauge("stemseg_workers", "Workers with a live heartbeat", registry=reg).set(svc.jobs.live_workers())
    Gauge("stemseg_event_streams", "Event streams open on this API process", registry=reg).set(svc.open_streams)
    raw = svc.redis.hgetall(svc.jobs.keys.clip_stats)
    count, seconds, frames = (float(raw.get(k, 0)) for k in (b"count", b"seconds", b"frames"))
    Gauge("stemseg_clips_processed", "Clips processed by all workers", registry=reg).set(count)
    Gauge("stemseg_clip_seconds_total", "Seconds workers spent per clip, summed", registry=reg).set(seconds)
    Gauge("stemseg_clip_latency_seconds", "Mean seconds per clip", registry=reg).set(seconds / count if count else 0)
    Gauge("stemseg_frames_per_second", "Frames finished per worker-second", registry=reg).set(
        frames / seconds if seconds else 0)
    return generate_latest(reg)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **responses(503)})
async def metrics(svc: ServicesDep) -> Response:
    """Read from Redis on each scrape, so every API replica reports the same numbers; job
    counts are the sizes of the per-state sets the state machine maintains."""
    return Response(await run_in_threadpool(_metrics, svc), media_type=CONTENT_TYPE_LATEST)
