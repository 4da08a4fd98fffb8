"""`stemseg worker`: takes clip tasks from the queue, runs network and clustering, stitches.

The lifecycle has three verbs, as a Triton Python backend does: `initialize` (load the model
once, connect), `execute` (one task), `finalize` (stop heartbeats, deregister). `run` loops
over tasks until SIGTERM/SIGINT, after which the task in hand is finished and acknowledged
and nothing more is taken.

A task is a run of consecutive clips (`clips_per_task`), not a single clip: a clip's
foreground depends on its neighbours' heads, so a lone clip would recompute the backbone and
heads of both neighbours; grouped, that overhead is paid once per group (with 8 clips of 8
frames at overlap 4, about 1 extra clip's work per 8).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import redis

from service.config import Settings, get_settings
from service.jobs.queue import Task, TaskQueue
from service.jobs.records import JobStore
from service.jobs.results import clip_to_bytes
from service.jobs.stitch import JobStitcher, clip_name
from service.jobs.storage import LocalStorage
from service.model.engines import Engine, engine_from_settings
from service.pipeline.clips import clip_plan, context_range
from service.pipeline.runner import ClipProcessor, SegmenterOptions
from service.video import VideoError, iter_frames, read_frames

log = logging.getLogger("stemseg.worker")


def load_service_engine(settings: Settings) -> Engine:
    # Engine choice, its graphs and caches, and batching all live with the engines (issue 14).
    return engine_from_settings(settings)


class Worker:
    def __init__(self, settings: Settings | None = None, engine: Engine | None = None, name: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.engine = engine
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()
        self._held: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def initialize(self) -> None:
        s = self.settings
        if self.engine is None:
            self.engine = load_service_engine(s)
        self.r = redis.Redis.from_url(s.redis_url)
        self.jobs = JobStore(self.r, s.redis_prefix, s.job_ttl_s)
        self.queue = TaskQueue(self.r, s.redis_prefix, s.visibility_timeout_s)
        self.storage = LocalStorage(s.data_dir)
        self.stitcher = JobStitcher(self.r, self.jobs, self.storage, self.engine.cfg,
                                    overlay_frames=lambda path: (f.image for f in iter_frames(path)))
        self._beat_key = f"{s.redis_prefix}:worker:{self.name}"
        self._heart = threading.Thread(target=self._heartbeat, daemon=True)
        self._heart.start()

    def execute(self, task: Task) -> None:
        s, jobs = self.settings, self.jobs
        job = jobs.get(task.job_id)
        if job is None or job["status"] in ("cancelled", "failed", "succeeded"):
            return  # deleted or finished meanwhile: nothing to do
        if task.deliveries > s.max_deliveries:
            jobs.transition(task.job_id, "failed", error=f"clips {task.start}-{task.stop - 1} failed "
                            f"{task.deliveries - 1} times (worker crashes or timeouts)")
            return
        jobs.transition(task.job_id, "running", started_at=time.time())
        cfg = self.engine.cfg if job.get("min_dim") is None else self.engine.cfg.with_min_dim(job["min_dim"])
        plan = clip_plan(job["num_frames"], cfg.clip_len, cfg.overlap)
        todo = [k for k in range(task.start, task.stop) if not self.storage.exists(task.job_id, clip_name(k))]
        if todo:
            context = context_range(plan, todo[0], todo[-1] + 1)
            wanted = sorted({f for k in context for f in plan[k]})
            video = str(self.storage.path(task.job_id, "video"))
            try:
                frames = {f.index: f for f in read_frames(video, wanted)}
            except VideoError as e:
                jobs.transition(task.job_id, "failed", error=f"video: {e}")
                return
            windows = ((k, [frames[i] for i in plan[k]]) for k in context)
            processor = ClipProcessor(self.engine, options=SegmenterOptions(min_iou=job.get("min_iou")), cfg=cfg)
            started = time.perf_counter()
            for clip in processor.run(windows, plan, job["height"], job["width"],
                                      cluster=range(todo[0], todo[-1] + 1)):
                self.storage.write(task.job_id, clip_name(clip.index), clip_to_bytes(clip))
                jobs.incr(task.job_id, "clips_done")
                self.r.hincrbyfloat(f"{s.redis_prefix}:stats:clips", "seconds", time.perf_counter() - started)
                self.r.hincrby(f"{s.redis_prefix}:stats:clips", "count", 1)
                self.r.hincrby(f"{s.redis_prefix}:stats:clips", "frames", len(clip.owned))
                started = time.perf_counter()
                if jobs.get(task.job_id) is None or jobs.get(task.job_id)["status"] == "cancelled":
                    return
        self.stitcher.advance(task.job_id, wait_for_clip=task.stop - 1)

    def finalize(self) -> None:
        self.stopping.set()
        self.r.delete(self._beat_key)
        self.r.close()

    # -- loop --------------------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        self.initialize()
        log.info("worker %s ready", self.name)
        try:
            while not self.stopping.is_set():
                task = self.queue.take(self.name, block_ms=500)
                if task is None:
                    continue
                self._held = task.id
                try:
                    self.execute(task)
                except Exception:  # left unacknowledged: redelivered, and the deliveries are bounded
                    log.exception("task %s of job %s failed", task.id, task.job_id)
                    self._held = None
                    continue
                self._held = None
                self.queue.done(task.id)
        finally:
            self.finalize()

    def _heartbeat(self) -> None:
        period = max(self.settings.visibility_timeout_s / 4, 0.2)
        while not self.stopping.is_set():
            try:
                self.r.set(self._beat_key, time.time(), ex=max(int(self.settings.visibility_timeout_s), 2))
                if self._held:
                    self.queue.touch(self.name, self._held)
            except redis.RedisError:
                log.warning("heartbeat failed", exc_info=True)
            self.stopping.wait(period)


def live_workers(r: redis.Redis, prefix: str) -> int:
    return sum(1 for _ in r.scan_iter(f"{prefix}:worker:*", count=100))
