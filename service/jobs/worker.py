"""`stemseg worker`: takes tasks from the queue: clip tasks (network, clustering, stitching) and
output tasks (one range of frames of a job's outputs; service.jobs.coordinator says how a job
moves from one to the other and finishes).

The lifecycle has three verbs, as a Triton Python backend does: `initialize` (load the model
once, connect), `execute` (one task, one explicit `Outcome`: done, retry or fail with a
reason), `finalize` (stop heartbeats, deregister). `run` loops over tasks until SIGTERM/SIGINT,
after which the task in hand is finished and acknowledged and nothing more is taken.

Redis outages: every Redis error in the loop is caught, the worker waits (exponential backoff
up to 10 s) and carries on; a task it held stays pending in Redis and is taken over after the
visibility timeout, by this worker or another, and its clip results already on disk are
reused. The worker also runs the sweeper (`Jobs.sweep`) every `sweep_interval_s`, one worker
at a time under a Redis lease: workers are the processes that always reach the job store.

Job store outages (service.jobs.storage.StoreUnavailable, an S3 store down or refusing): a task
that meets one is left for redelivery (a store that is down comes back) or, when the store
refuses (access denied, quota), fails its job with the reason; the worker itself carries on.
With an object store a job's video is read through this worker's FileCache: downloaded once,
decoded locally by every task of the job this worker takes.

A task is a run of consecutive clips (`clips_per_task`), not a single clip: a clip's
foreground depends on its neighbours' heads, so a lone clip would recompute the backbone and
heads of both neighbours; grouped, that overhead is paid once per group (with 8 clips of 8
frames at overlap 4, about 1 extra clip's work per 8).

Every task leaves an entry in its job's timeline (`Jobs.timeline`): when it was queued, taken and
done, and its seconds per stage, which is how `bench/workers.py` shows where a job's time goes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Literal

import redis

from service.config import Settings, get_settings
from service.jobs import files
from service.jobs.coordinator import JobCoordinator
from service.jobs.encoding import clip_to_bytes
from service.jobs.file_cache import FileCache
from service.jobs.lifecycle import Jobs
from service.jobs.queue import OUTPUTS, Task
from service.jobs.record import JobPlan, JobRecord
from service.jobs.redis_clients import REDIS_ERRORS, UNREACHABLE, sync_client
from service.jobs.storage import NoSpace, StoreUnavailable, is_no_space, open_storage
from service.jobs.stream_record import StreamStatus
from service.jobs.stream_worker import StreamRunner
from service.jobs.streams import Streams
from service.jobs.webhooks import Notifier, payload
from service.model.engine_spec import EngineSpec
from service.model.engines import Engine, build_engine
from service.pipeline.clips import clip_plan, context_range
from service.pipeline.runner import ClipProcessor, PipelineOptions, SegmenterOptions
from service.pipeline.timing import StageTimer
from service.video import VideoError, read_frames
from service.video.decode import configure_cache as configure_video_cache
from service.video.decode import release_reader

log = logging.getLogger("stemseg.worker")


def load_service_engine(settings: Settings) -> Engine:
    """The engine the settings name, exactly: a worker that fell back to another engine or the CPU
    would serve at a fraction of the expected speed with nothing to show why."""
    return build_engine(EngineSpec.from_settings(settings))


@dataclass(frozen=True)
class Outcome:
    """What became of one task: `done` (acknowledge), `retry` (leave it pending: it is
    redelivered after the visibility timeout, up to `max_deliveries`), `fail` (fail the job with
    `reason`, acknowledge)."""

    kind: Literal["done", "retry", "fail"]
    reason: str = ""


NO_SPACE = "no space left on device"


def redis_client(settings: Settings, **kwargs) -> redis.Redis:
    """Short timeouts: a dead Redis is noticed within about `redis_timeout_s`, not minutes."""
    return sync_client(settings.redis_url, socket_connect_timeout=settings.redis_timeout_s,
                       socket_timeout=settings.redis_timeout_s + 2, **kwargs)


class Worker:
    def __init__(self, settings: Settings | None = None, engine: Engine | None = None, name: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.engine = engine
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()
        # Task id -> the consumer (one per task slot) holding it; the heartbeat refreshes them.
        self._held: dict[str, str] = {}
        self._held_streams: dict[str, str] = {}  # stream task id -> its slot's consumer (for finalize)
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        n = max(self.settings.worker_concurrency, 1)
        self.consumers = [self.name] if n == 1 else [f"{self.name}/{i}" for i in range(n)]
        # Live streams: one slot per stream this worker may run at once, on the streams' queue.
        self.stream_consumers = [f"{self.name}/stream-{i}" for i in range(self.settings.worker_streams)]

    # -- lifecycle ---------------------------------------------------------------------------
    def initialize(self) -> None:
        s = self.settings
        if self.engine is None:
            self.engine = load_service_engine(s)
        self.r = redis_client(s)
        configure_video_cache(s.probe_cache_bytes)
        self.storage = open_storage(s)
        # With an object store, this worker's copies of job videos (downloaded once per job, not per task).
        self.cache = FileCache.of(self.storage, s.cache_bytes)
        self.jobs = Jobs(self.r, s.redis_prefix, s.job_ttl_s, self.storage, s.visibility_timeout_s)
        self.jobs.on_end = self._job_ended
        self.queue = self.jobs.queue
        self.notifier = Notifier(s.webhook_secret, s.webhook_attempts, s.webhook_backoff_s, s.webhook_timeout_s,
                                 s.webhook_host_list)
        self.coordinator = JobCoordinator(self.r, self.jobs, self.storage, self.engine.cfg,
                                          render_frames=s.render_frames_per_task, lock_ttl_s=s.lock_ttl_s,
                                          max_pixels=s.max_frame_pixels, record=self.jobs.record,
                                          videos=self.cache)
        self.streams = Streams(self.r, s.redis_prefix, s.job_ttl_s, self.storage, s.visibility_timeout_s)
        self.stream_runner = StreamRunner(s, self.engine, self.streams, self.storage, self.name, self.stopping)
        self._beat_key = self.jobs.keys.worker(self.name)
        self._heart = threading.Thread(target=self._heartbeat, daemon=True)
        self._heart.start()

    def execute(self, task: Task) -> Outcome:
        """Run one task. Redis errors propagate (the loop waits for Redis; the task stays pending)."""
        job = self.jobs.get(task.job_id)
        if job is None or job.final:
            return Outcome("done", "the job was deleted or has ended")
        if task.deliveries > self.settings.max_deliveries:
            what = "output frames" if task.kind == OUTPUTS else "clips"
            why = f"; the last error: {job.retry_reason}" if job.retry_reason else " (worker crashes or timeouts)"
            return Outcome("fail", f"{what} {task.start}-{task.stop - 1} failed {task.deliveries - 1} times{why}")
        plan = job.plan
        if plan.preset != self.engine.cfg.name:
            return Outcome("fail", f"the job was planned for the {plan.preset!r} model; the workers run "
                                   f"{self.engine.cfg.name!r}")
        self.jobs.start(task.job_id)
        try:
            if task.kind == OUTPUTS:
                return self._run_outputs(task, job)
            return self._run_clips(task, job, plan)
        except VideoError as e:  # the user knows the file as "the video", not by our path
            return Outcome("fail", f"video: {e.about('the video')}")
        except NoSpace:
            return Outcome("fail", NO_SPACE)
        except StoreUnavailable as e:
            # Down or failing: the task is redelivered (the job completes once the store is back,
            # or fails after max_deliveries); refused (403, quota): no retry helps.
            return Outcome("fail" if e.lasting else "retry", f"job store: {e}")
        except FileNotFoundError as e:
            if not self.storage.shared_paths and self.jobs.get(task.job_id) is not None:
                return Outcome("fail", f"job store: the job's {e} is missing from the store")
            return Outcome("retry", f"{type(e).__name__}: {e}")
        except OSError as e:
            if is_no_space(e):
                return Outcome("fail", NO_SPACE)
            return Outcome("retry", f"{type(e).__name__}: {e}")
        except UNREACHABLE:
            raise
        except Exception as e:  # a bug or a transient fault: redelivered, and the deliveries are bounded
            if self.jobs.get(task.job_id) is None:  # not a bug: a DELETE took the files (see settle)
                return Outcome("done", "the job was deleted while running")
            log.exception("task %s of job %s", task.id, task.job_id)
            return Outcome("retry", f"{type(e).__name__}: {e}")

    def _run_clips(self, task: Task, job: JobRecord, plan: JobPlan) -> Outcome:
        jobs, job_id = self.jobs, task.job_id
        # The plan fixed at creation: the clip cut and resize the job was accepted with.
        cfg = replace(self.engine.cfg, clip_len=plan.clip_len, overlap=plan.overlap)
        if plan.min_dim is not None:
            cfg = cfg.with_min_dim(plan.min_dim)
        clips = clip_plan(job.num_frames, plan.clip_len, plan.overlap)
        todo = [k for k in range(task.start, task.stop) if not self.storage.exists(job_id, files.clip_file(k))]
        timer = StageTimer()
        if todo:
            context = context_range(clips, todo[0], todo[-1] + 1)
            wanted = sorted({f for k in context for f in clips[k]})
            with timer("decode"), self.cache.local(job_id, files.VIDEO) as video:
                frames = {f.index: f for f in read_frames(str(video), wanted)}
            windows = ((k, [frames[i] for i in clips[k]]) for k in context)
            processor = ClipProcessor(self.engine, options=SegmenterOptions(min_iou=job.min_iou), cfg=cfg,
                                      pipeline=PipelineOptions.for_worker(self.settings), timer=timer)
            started = time.perf_counter()
            for clip in processor.run(windows, clips, job.height, job.width,
                                      cluster=range(todo[0], todo[-1] + 1)):
                if jobs.get(job_id) is None:
                    return Outcome("done", "the job was deleted while running")
                with timer("write"):
                    self.storage.write(job_id, files.clip_file(clip.index), clip_to_bytes(clip))
                jobs.incr(job_id, "clips_done")
                pipe = self.r.pipeline()
                pipe.hincrbyfloat(jobs.keys.clip_stats, "seconds", time.perf_counter() - started)
                pipe.hincrby(jobs.keys.clip_stats, "count", 1)
                pipe.hincrby(jobs.keys.clip_stats, "frames", len(clip.owned))
                pipe.execute()
                started = time.perf_counter()
        with timer("stitch"):
            self.coordinator.clips_written(job_id)
        self._record(task, timer)
        return Outcome("done")

    def _run_outputs(self, task: Task, job: JobRecord) -> Outcome:
        timer = StageTimer()
        with timer("render"):
            self.coordinator.render(task.job_id, job, task.start, task.stop)
        with timer("finish"):
            self.coordinator.range_rendered(task.job_id)
        self._record(task, timer)
        return Outcome("done")

    def _record(self, task: Task, timer: StageTimer) -> None:
        self.jobs.record(task.job_id, {
            "kind": task.kind, "worker": self.name, "start": task.start, "stop": task.stop,
            "queued": task.queued_at, "taken": task.taken_at, "end": time.time(), "deliveries": task.deliveries,
            "seconds": {k: round(v, 4) for k, v in timer.seconds.items()}, **self._store_reads()})

    def _store_reads(self) -> dict[str, int]:
        """What this task read from an object store: every byte, and those of video copies."""
        if self.storage.shared_paths:
            return {}
        return {"store_bytes_read": self.storage.bytes_read.take(), "video_bytes_fetched": self.cache.take_fetched()}

    def settle(self, task: Task, outcome: Outcome) -> None:
        """Act on a task's outcome; then, if its job is gone, delete what this task wrote."""
        if outcome.kind != "done" and self.jobs.get(task.job_id) is None:
            # A DELETE while the task ran took the record and the files: what that broke (the
            # video or a clip vanishing mid-read) is no failure, and there is nothing to retry.
            outcome = Outcome("done", "the job was deleted while running")
        if outcome.kind == "fail":
            self.jobs.fail(task.job_id, outcome.reason)
        if outcome.kind == "retry":
            log.warning("task %s of job %s will be retried: %s", task.id, task.job_id, outcome.reason)
            self.jobs.update(task.job_id, retry_reason=outcome.reason)  # named if the retries run out
        else:
            self.queue.done(task.id)
        if self.jobs.get(task.job_id) is None:
            self.storage.delete_job(task.job_id)
            self.cache.forget(task.job_id)

    def finalize(self) -> None:
        self.stopping.set()
        self.cache.close()
        try:
            self.r.delete(self._beat_key)
            for consumer in self.consumers:
                if consumer not in self._held.values():
                    self.queue.forget_consumer(consumer)
            for consumer in self.stream_consumers:
                if consumer not in self._held_streams.values():
                    self.streams.queue.forget_consumer(consumer)
        except REDIS_ERRORS:
            log.warning("could not deregister from Redis (the sweeper removes idle consumers)")
        self.r.close()

    # -- loop --------------------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        self.initialize()
        log.info("worker %s ready (%d task slots)", self.name, len(self.consumers))
        # worker_concurrency > 1: one thread per slot, all sharing the engine (torch and ONNX
        # Runtime allow concurrent inference calls), so one slot's decoding, clustering and
        # stitching overlap another's network time.
        slots = [threading.Thread(target=self._loop, args=(c,), daemon=True, name=f"slot-{c}")
                 for c in self.consumers[1:]]
        slots += [threading.Thread(target=self._loop, args=(c, self.stream_step), daemon=True, name=f"slot-{c}")
                  for c in self.stream_consumers]
        for t in slots:
            t.start()
        try:
            self._loop(self.consumers[0])
        finally:
            self.stopping.set()
            for t in slots:
                t.join()
            self.finalize()

    def _loop(self, consumer: str, step=None) -> None:
        step = step or self.step
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                step(consumer)
                backoff = 0.5
            except REDIS_ERRORS as e:
                log.warning("Redis error (%s); retrying in %.1f s", e, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # a bug outside execute (settle, the sweeper): the slot lives on, the task
                # stays pending and is redelivered, and execute's delivery count bounds the retries
                log.exception("worker slot %s", consumer)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def step(self, consumer: str | None = None) -> None:
        """Sweep when due, then take one task (if any), execute and settle it."""
        consumer = consumer or self.consumers[0]
        self._maybe_sweep()
        if self.stream_runner.running and not self.settings.worker_streams_take_files:
            self.stopping.wait(0.5)  # a live stream has this worker's engine (STEMSEG_WORKER_STREAMS_TAKE_FILES)
            return
        task = self.queue.take(consumer, block_ms=500)
        if task is None:
            release_reader()  # idle: the decoder kept for the next task gives its file back
            return
        with self._lock:
            self._held[task.id] = consumer
        self._store_reads()  # counted from here: this task's reads only
        try:
            self.settle(task, self.execute(task))
        finally:
            with self._lock:
                self._held.pop(task.id, None)

    def stream_step(self, consumer: str) -> None:
        """Take one live stream (if any) and run it until it ends (service.jobs.stream_worker);
        its queue entry's lease is renewed by the runner while it runs, not by the heartbeat."""
        task = self.streams.queue.take(consumer, block_ms=500)
        if task is None:
            return
        with self._lock:
            self._held_streams[task.id] = consumer
        try:
            done = self.stream_runner.execute(task, consumer)
        except UNREACHABLE:
            raise
        except Exception as e:  # a bug: the stream fails with it, rather than crash every worker in turn
            log.exception("stream %s", task.job_id)
            self.streams.transition(task.job_id, StreamStatus.FAILED, ended_by="failed",
                                    error=f"{type(e).__name__}: {e}")
            done = True
        if done:
            self.streams.queue.done(task.id)
            with self._lock:
                self._held_streams.pop(task.id, None)
        # Not done (this worker is stopping): the entry stays pending under this slot's consumer,
        # which finalize therefore keeps, for the next worker to take after the visibility timeout.

    def _maybe_sweep(self) -> None:
        s = self.settings
        with self._lock:
            if time.monotonic() < self._next_sweep:
                return
            self._next_sweep = time.monotonic() + s.sweep_interval_s
        if self.r.set(self.jobs.keys.sweep, self.name, nx=True, ex=max(int(s.sweep_interval_s), 1)):
            gone = self.jobs.sweep(s.sweep_grace_s, consumer_idle_s=max(10 * s.visibility_timeout_s, 60))
            gone.update(self.streams.sweep(s.sweep_grace_s))
            if any(gone.values()):
                log.info("sweeper removed %s", gone)

    def _job_ended(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or not job.callback_url:
            return

        def record(state: dict) -> None:
            try:
                self.jobs.update(job_id, webhook=state)
            except REDIS_ERRORS:
                log.warning("could not record a webhook attempt of job %s", job_id)

        self.notifier.deliver_in_background(job.callback_url, payload(job), record)

    def _heartbeat(self) -> None:
        period = max(self.settings.visibility_timeout_s / 4, 0.2)
        while not self.stopping.is_set():
            try:
                self.r.set(self._beat_key, time.time(), ex=max(int(self.settings.visibility_timeout_s), 2))
                with self._lock:
                    held = list(self._held.items())
                for task_id, consumer in held:
                    self.queue.touch(consumer, task_id)
            except REDIS_ERRORS:
                log.warning("heartbeat failed", exc_info=True)
            self.stopping.wait(period)
