"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from starlette.concurrency import run_in_threadpool

from service.api.deps import ServicesDep
from service.api.problems import Problem, responses
from service.jobs.stream_record import LATENCY_BUCKETS, StreamRecord, StreamStatus

router = APIRouter(tags=["health"])


# Both run on the event loop, never on a thread: a pool held by slow work cannot delay them.
@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers; depends on nothing else (not Redis)."""
    return {"status": "ok"}


@router.get("/readyz", responses=responses(503, s503="No live worker (start one with `stemseg worker`), or Redis "
                                                       "is unreachable; see Retry-After"))
async def readyz(svc: ServicesDep) -> dict[str, object]:
    workers = await svc.jobs.live_workers_async(svc.aredis)  # Redis down: 503 from the handler
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
    Gauge("stemseg_probes_in_flight", "Uploads being probed on this API process (of STEMSEG_MAX_CONCURRENT_PROBES)",
          registry=reg).set(svc.probes.in_use)
    raw = svc.redis.hgetall(svc.jobs.keys.clip_stats)
    count, seconds, frames = (float(raw.get(k, 0)) for k in (b"count", b"seconds", b"frames"))
    Gauge("stemseg_clips_processed", "Clips processed by all workers", registry=reg).set(count)
    Gauge("stemseg_clip_seconds_total", "Seconds workers spent per clip, summed", registry=reg).set(seconds)
    Gauge("stemseg_clip_latency_seconds", "Mean seconds per clip", registry=reg).set(seconds / count if count else 0)
    Gauge("stemseg_frames_per_second", "Frames finished per worker-second", registry=reg).set(
        frames / seconds if seconds else 0)
    Gauge("stemseg_stream_queue_depth", "Live streams waiting for a worker's stream slot or held by one",
          registry=reg).set(svc.streams.queue.depth())
    _stream_metrics(reg, svc.streams.unfinished())
    return generate_latest(reg)


class _LatencyHistograms:
    """Each unfinished stream's latency histogram, as its worker counted it into the record."""

    def __init__(self, streams: list[StreamRecord]) -> None:
        self.streams = streams

    def collect(self):
        family = HistogramMetricFamily("stemseg_stream_latency_seconds", "Live streams: seconds from a frame's "
                                       "arrival at the worker to its frame event", labels=["stream"])
        for rec in self.streams:
            cumulative, buckets = 0, []
            for bound, n in zip(LATENCY_BUCKETS, rec.latency_counts):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([rec.id], buckets, rec.latency_sum_s)
        yield family


def _stream_metrics(reg: CollectorRegistry, streams: list[StreamRecord]) -> None:
    """Live streams not yet ended, by state, and per stream (label `stream`: its id)."""
    states = Gauge("stemseg_streams", "Live streams not yet ended, by state", ["state"], registry=reg)
    for status in StreamStatus:
        if not status.final:
            states.labels(status.value).set(sum(1 for rec in streams if rec.status == status))
    per_stream = {
        "frames_per_second": ("Live streams: frames published per second, recently", "frames_per_second"),
        "frames_seen": ("Live streams: frames published so far", "frames_seen"),
        "frames_dropped": ("Live streams: frames dropped while the model fell behind", "frames_dropped"),
        "clips_dropped": ("Live streams: whole clips dropped while the model fell behind", "clips_dropped"),
    }
    for name, (doc, field) in per_stream.items():
        gauge = Gauge(f"stemseg_stream_{name}", doc, ["stream"], registry=reg)
        for rec in streams:
            gauge.labels(rec.id).set(getattr(rec, field) or 0)
    reg.register(_LatencyHistograms(streams))


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **responses(503)})
async def metrics(svc: ServicesDep) -> Response:
    """Read from Redis on each scrape, so every API replica reports the same numbers; job
    counts are the sizes of the per-state sets the state machine maintains."""
    return Response(await run_in_threadpool(_metrics, svc), media_type=CONTENT_TYPE_LATEST)
