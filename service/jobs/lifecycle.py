"""The owner of a job's life: creation, the state machine, cancel, finish, fail, expiry.

Everything that changes a job's state goes through `Jobs`, so each invariant has one place:

* A state change is one Lua script: it checks the transition against `JobStatus`'s table,
  writes the status, moves the id between the per-state sets the gauges count (so they can
  neither drift nor go negative), and when the job ends removes it from its owner's quota set
  and restarts its keys' TTL (a job expires `job_ttl_s` after it ends, not after creation).
* A job is created with its plan (`JobPlan`: preset, clip length, overlap, min_dim) and its
  tasks in one transaction that also enforces the owner's quota; workers read the plan and
  never re-plan.
* Files: a job's directory belongs to its record. Whoever deletes the record deletes the
  files; a worker whose in-flight task ends on a deleted job deletes what it wrote; the
  sweeper (`sweep`) deletes every directory without a record, as a backstop.

Imports neither the worker nor torch: the API process uses this module.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import redis

from service.config import Settings
from service.jobs.keys import Keys, valid_job_id
from service.jobs.probing import probe_upload
from service.jobs.queue import GROUP, OUTPUTS, TaskQueue
from service.jobs.storage import LocalStorage
from service.model.presets import ModelConfig
from service.pipeline.clips import clip_plan
from service.video import VideoError, VideoInfo
from service.video.decode import OverLimit

log = logging.getLogger("stemseg.jobs")

_EVENTS_MAXLEN = 2000


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


# Target state -> the states it may be entered from. Final states are never left.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
}


@dataclass(frozen=True)
class JobPlan:
    """How a job's video is cut into clips, fixed at creation. Workers run exactly this."""

    preset: str
    clip_len: int
    overlap: int
    min_dim: int | None  # None: the model's own
    num_clips: int
    clips_per_task: int

    def task_ranges(self) -> list[tuple[int, int]]:
        step = self.clips_per_task
        return [(s, min(s + step, self.num_clips)) for s in range(0, self.num_clips, step)]


@dataclass(frozen=True)
class Limits:
    """What one job may ask for (each a setting: STEMSEG_MAX_FRAME_PIXELS, _MAX_FRAMES, _MAX_DURATION_S,
    _PROBE_BUDGET_S, _MAX_CONTAINER_SAMPLES, _MAX_UPLOAD_BYTES)."""

    max_pixels: int
    max_frames: int
    max_duration_s: float
    # Unset: the settings' defaults (service/config.py), so a caller naming only the first three
    # still gets every bound.
    probe_budget_s: float = Settings.model_fields["probe_budget_s"].default
    max_samples: int = Settings.model_fields["max_container_samples"].default
    max_bytes: int = Settings.model_fields["max_upload_bytes"].default

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.max_frame_pixels, s.max_frames, s.max_duration_s, s.probe_budget_s, s.max_container_samples,
                   s.max_upload_bytes)


_OVER = {"frames": ("the video has more than {limit} frames", "STEMSEG_MAX_FRAMES"),
         "samples": ("the file's tracks list more than {limit} samples", "STEMSEG_MAX_CONTAINER_SAMPLES"),
         "time": ("reading the video took longer than {limit:g} s", "STEMSEG_PROBE_BUDGET_S"),
         "bytes": ("the video remuxed to be seekable is larger than {limit} bytes", "STEMSEG_MAX_UPLOAD_BYTES")}


class Refused(Exception):
    """An upload that cannot become a job; `status` is the HTTP status that says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class QuotaExceeded(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"this API key already has {limit} unfinished jobs, the most allowed")
        self.limit = limit


class RateLimited(Exception):
    def __init__(self, limit: int, window_s: int, retry_after_s: int) -> None:
        super().__init__(f"more than {limit} uploads in {window_s} s with this API key (STEMSEG_RATE_LIMIT_JOBS)")
        self.retry_after_s = retry_after_s


# KEYS: job hash, events stream, and optionally a lock whose holder alone may make the change
# (a fencing token). ARGV: new status, prefix, job id, TTL to restart (0: the job has not ended),
# now, events to append when the change is made (a JSON list of [type, data]; the status event
# first), events TTL, events max length, the lock's token ('' without a lock), allowed-from
# count, allowed-from states..., then field/value pairs (JSON-encoded values) to write with the
# status. The events go in with the change or not at all, so a reader that sees the job ended
# has every event it announced (a finished job's tracks). Key names built from the prefix here:
# fine on one Redis, not on Redis Cluster.
_TRANSITION = """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return 0 end
if KEYS[3] and redis.call('GET', KEYS[3]) ~= ARGV[9] then return 0 end
local cur = cjson.decode(raw)
local n = tonumber(ARGV[10])
local ok = false
for i = 11, 10 + n do if ARGV[i] == cur then ok = true end end
if not ok then return 0 end
redis.call('HSET', KEYS[1], 'status', cjson.encode(ARGV[1]), 'updated_at', ARGV[5])
for i = 11 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SREM', ARGV[2] .. ':state:' .. cur, ARGV[3])
redis.call('SADD', ARGV[2] .. ':state:' .. ARGV[1], ARGV[3])
for _, ev in ipairs(cjson.decode(ARGV[6])) do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'type', ev[1], 'data', ev[2])
end
redis.call('EXPIRE', KEYS[2], ARGV[7])
if tonumber(ARGV[4]) > 0 then
  local owner = cjson.decode(redis.call('HGET', KEYS[1], 'owner'))
  if owner == '' then owner = '-' end
  redis.call('SREM', ARGV[2] .. ':active:' .. owner, ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', ARGV[2] .. ':jobs:' .. owner, ARGV[4])
end
return 1
"""


# KEYS: job hash. ARGV: "set" then field/value pairs, or "incr", field, amount. Writes only while
# the record exists, in one step: a DELETE between a check and a write would otherwise leave a
# record with no status, owner or TTL behind.
_WRITE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == 'incr' then return redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3]) end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def _decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return {k.decode(): json.loads(v) for k, v in raw.items()}


class Jobs:
    def __init__(self, r: redis.Redis, prefix: str, ttl_s: int, storage: LocalStorage,
                 visibility_timeout_s: float = 60.0) -> None:
        self.r, self.ttl, self.storage = r, ttl_s, storage
        self.keys = Keys(prefix)
        self.queue = TaskQueue(r, self.keys, visibility_timeout_s)
        self._transition = r.register_script(_TRANSITION)
        self._write = r.register_script(_WRITE_IF_EXISTS)
        # Called with the job id after it succeeded or failed here (workers send webhooks).
        self.on_end: Callable[[str], None] | None = None

    # -- reading -----------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        if not valid_job_id(job_id):
            return None
        raw = self.r.hgetall(self.keys.job(job_id))
        return _decode(raw) if raw else None

    def plan(self, job: dict[str, Any]) -> JobPlan:
        return JobPlan(**job["plan"])

    def list(self, owner: str, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        index = self.keys.owner_jobs(owner)
        ids = [i.decode() for i in self.r.zrevrange(index, offset, offset + limit - 1)]
        pipe = self.r.pipeline()
        for i in ids:
            pipe.hgetall(self.keys.job(i))
        jobs, gone = [], []
        for i, raw in zip(ids, pipe.execute()):
            if raw:
                jobs.append(_decode(raw))
            else:
                gone.append(i)
        if gone:  # expired records: drop them from the listing
            self.r.zrem(index, *gone)
        return self.r.zcard(index), jobs

    def counts(self) -> dict[str, int]:
        """Jobs per state: the sizes of the per-state sets. Unfinished jobs are few, so their
        sets are checked member by member (a job that expired unfinished is not counted); ended
        jobs' sets may still hold ids that expired since the last sweep (`sweep_interval_s`)."""
        pipe = self.r.pipeline()
        for s in JobStatus:
            (pipe.smembers if not s.final else pipe.scard)(self.keys.state(s))
        out = {}
        for s, v in zip(JobStatus, pipe.execute()):
            if isinstance(v, int):
                out[s.value] = v
                continue
            check = self.r.pipeline()
            for m in v:
                check.exists(self.keys.job(m.decode()))
            out[s.value] = sum(check.execute()) if v else 0
        return out

    # -- creation ----------------------------------------------------------------------------
    def check_rate(self, owner: str, limit: int, window_s: int) -> None:
        """Fixed window per API key; raises RateLimited with the seconds to the next window."""
        if limit <= 0:
            return
        now = time.time()
        window = int(now // window_s)
        key = self.keys.rate(owner, window)
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, window_s + 1)
        n, _ = pipe.execute()
        if n > limit:
            raise RateLimited(limit, window_s, max(1, int((window + 1) * window_s - now + 0.999)))

    def check_quota(self, owner: str, limit: int) -> None:
        if limit > 0 and self.r.scard(self.keys.active(owner)) >= limit:
            raise QuotaExceeded(limit)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def create(self, job_id: str, owner: str, plan: JobPlan, fields: dict[str, Any], quota: int = 0) -> dict:
        """Record the job and enqueue its tasks in one transaction that also holds the owner's
        quota (WATCH on the owner's set of unfinished jobs). The job's files must already be in
        place: a worker may take the first task at once."""
        now = time.time()
        record = {"id": job_id, "owner": owner, "status": JobStatus.QUEUED.value, "created_at": now,
                  "updated_at": now, "clips_done": 0, "frames_done": 0, "stitched": 0,
                  "num_clips": plan.num_clips, "plan": asdict(plan), **fields}
        k = self.keys
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(k.active(owner))
                    if quota > 0 and pipe.scard(k.active(owner)) >= quota:
                        raise QuotaExceeded(quota)
                    pipe.multi()
                    # A TTL from creation too: bounds the life of a job that never ends.
                    pipe.hset(k.job(job_id), mapping={f: json.dumps(v) for f, v in record.items()})
                    pipe.expire(k.job(job_id), self.ttl)
                    pipe.zadd(k.owner_jobs(owner), {job_id: now})
                    pipe.expire(k.owner_jobs(owner), self.ttl)
                    pipe.sadd(k.active(owner), job_id)
                    pipe.expire(k.active(owner), self.ttl)
                    pipe.sadd(k.state(JobStatus.QUEUED), job_id)
                    pipe.xadd(k.events(job_id), {"type": "status", "data": json.dumps({"status": "queued"})})
                    pipe.expire(k.events(job_id), self.ttl)
                    for start, stop in plan.task_ranges():
                        self.queue.put(job_id, start, stop, pipe=pipe)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def admit(self, staging: str, owner: str, *, model: ModelConfig, min_dim: int | None, clips_per_task: int,
              limits: Limits, quota: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Make a job of a received upload (in storage under `staging`): probe it, hold it to
        the limits, plan it, move its files under the job id, record and enqueue it. On any
        failure nothing is left on disk."""
        job_id = self.new_id()
        try:
            try:
                info = self._readable(staging, limits)
            except OverLimit as e:
                what, setting = _OVER[e.kind]
                raise Refused(413, f"{what.format(limit=e.limit)}, over the limit ({setting})") from None
            except VideoError as e:  # the user knows the file as "the upload", not by our path
                raise Refused(400, e.about("the upload")) from None
            if info.num_frames > limits.max_frames:
                raise Refused(413, f"the video has {info.num_frames} frames; the limit is {limits.max_frames} "
                                   "(STEMSEG_MAX_FRAMES)")
            if info.duration_s is not None and info.duration_s > limits.max_duration_s:
                raise Refused(413, f"the video lasts {info.duration_s:.1f} s; the limit is "
                                   f"{limits.max_duration_s:g} s (STEMSEG_MAX_DURATION_S)")
            plan = JobPlan(preset=model.name, clip_len=model.clip_len, overlap=model.overlap, min_dim=min_dim,
                           num_clips=len(clip_plan(info.num_frames, model.clip_len, model.overlap)),
                           clips_per_task=clips_per_task)
            self.storage.rename_job(staging, job_id)
            return self.create(job_id, owner, plan, {
                "num_frames": info.num_frames, "width": info.width, "height": info.height, "fps": info.fps,
                "duration_s": info.duration_s, "min_dim": min_dim, "preset": model.name, "min_iou": None,
                **fields}, quota=quota)
        except BaseException:
            self.storage.delete_job(staging)
            self.storage.delete_job(job_id)
            raise

    def _readable(self, staging: str, limits: Limits) -> VideoInfo:
        return probe_upload(self.storage, staging, max_pixels=limits.max_pixels, max_frames=limits.max_frames,
                            budget_s=limits.probe_budget_s, max_samples=limits.max_samples,
                            max_bytes=limits.max_bytes)

    # -- state changes -----------------------------------------------------------------------
    def transition(self, job_id: str, status: JobStatus, *, events: list[tuple[str, dict]] = (),
                   fence: tuple[str, str] | None = None, **fields: Any) -> bool:
        """Move the job to `status` if the table allows it from its current state; False if
        the job is gone or in a state that cannot move there, or if `fence` (lock key, token)
        is given and that lock is no longer held with that token. The status event, then
        `events`, are appended in the same step."""
        allowed = [s.value for s in TRANSITIONS[status]]
        ttl = self.ttl if status.final else 0
        announced = [["status", json.dumps({"status": status.value, **fields})]]
        announced += [[kind, json.dumps(data)] for kind, data in events]
        args: list[Any] = [status.value, self.keys.prefix, job_id, ttl, json.dumps(time.time()),
                           json.dumps(announced), self.ttl, _EVENTS_MAXLEN, fence[1] if fence else "",
                           len(allowed), *allowed]
        for f, v in fields.items():
            args += [f, json.dumps(v)]
        keys = [self.keys.job(job_id), self.keys.events(job_id)] + ([fence[0]] if fence else [])
        moved = bool(self._transition(keys=keys, args=args))
        if moved and self.on_end is not None and status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            self.on_end(job_id)
        return moved

    def start(self, job_id: str) -> bool:
        return self.transition(job_id, JobStatus.RUNNING, started_at=time.time())

    def finish(self, job_id: str, tracks: list[dict], fence: tuple[str, str] | None = None) -> bool:
        """Succeed, announcing the kept tracks (one `track` event each) in the same step; with
        `fence`, only while that lock is held with that token (no second worker can finish)."""
        return self.transition(job_id, JobStatus.SUCCEEDED, events=[("track", t) for t in tracks], fence=fence,
                               finished_at=time.time(), tracks=len(tracks))

    def fail(self, job_id: str, reason: str) -> bool:
        return self.transition(job_id, JobStatus.FAILED, finished_at=time.time(), error=reason)

    def cancel(self, job_id: str) -> None:
        """Delete a job, whatever its state: record, keys, files. A worker still running one
        of its tasks sees the record gone, stops, and deletes what it wrote meanwhile."""
        self.transition(job_id, JobStatus.CANCELLED, finished_at=time.time())
        self.delete_record(job_id)
        self.storage.delete_job(job_id)

    def delete_record(self, job_id: str) -> None:
        job = self.get(job_id)
        if job is None:
            return
        k = self.keys
        pipe = self.r.pipeline()
        pipe.zrem(k.owner_jobs(job["owner"]), job_id)
        pipe.srem(k.active(job["owner"]), job_id)
        for s in JobStatus:
            pipe.srem(k.state(s), job_id)
        pipe.delete(k.job(job_id), k.events(job_id), k.lock(job_id), k.timeline(job_id))
        pipe.execute()

    # -- progress (no state change) ----------------------------------------------------------
    def update(self, job_id: str, **fields: Any) -> None:
        """Write fields of a job that still exists (a deleted job is never resurrected)."""
        fields["updated_at"] = time.time()
        args = ["set"]
        for f, v in fields.items():
            args += [f, json.dumps(v)]
        self._write(keys=[self.keys.job(job_id)], args=args)

    def incr(self, job_id: str, field: str, by: int = 1) -> None:
        self._write(keys=[self.keys.job(job_id)], args=["incr", field, by])

    def event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        self.events(job_id, [(kind, data)])

    def events(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Append events in one round trip (a clip's frames)."""
        if not events:
            return
        key = self.keys.events(job_id)
        pipe = self.r.pipeline(transaction=False)
        for kind, data in events:
            pipe.xadd(key, {"type": kind, "data": json.dumps(data)}, maxlen=_EVENTS_MAXLEN, approximate=True)
        pipe.expire(key, self.ttl)
        pipe.execute()

    def enqueue_outputs(self, job_id: str, spans: list[tuple[int, int]], render_frames: int) -> None:
        """Queue one output task per range of frames and record how the frames were cut, in one
        transaction: a job either has all its output tasks queued or none."""
        pipe = self.r.pipeline()
        for start, stop in spans:
            self.queue.put(job_id, start, stop, pipe=pipe, kind=OUTPUTS)
        self._write(keys=[self.keys.job(job_id)], args=["set", "render_tasks", json.dumps(len(spans)),
                                                        "render_frames", json.dumps(render_frames)], client=pipe)
        pipe.execute()

    def record(self, job_id: str, entry: dict[str, Any]) -> None:
        """Append one entry to the job's timeline (how long its tasks waited and took)."""
        key = self.keys.timeline(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(entry))
        pipe.expire(key, self.ttl)
        pipe.execute()

    def timeline(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.r.lrange(self.keys.timeline(job_id), 0, -1)]

    # -- expiry ------------------------------------------------------------------------------
    def sweep(self, grace_s: float, consumer_idle_s: float) -> dict[str, int]:
        """Delete what expired jobs left: files of every job without a record (after `grace_s`,
        so an upload being received is left alone), ids of expired jobs in the state sets, and
        consumers of the task group that are idle and hold nothing (dead workers)."""
        files = 0
        # Directories without a record (one pipeline of EXISTS), and only those are walked for
        # their age: live jobs' directories are never read.
        names = list(self.storage.jobs())  # job ids, and "upload-..." for uploads being received
        ids = [n for n in names if valid_job_id(n)]
        pipe = self.r.pipeline()
        for n in ids:
            pipe.exists(self.keys.job(n))
        orphans = [n for n in names if n.startswith("upload-")]
        orphans += [n for n, alive in zip(ids, pipe.execute()) if not alive]
        for name in orphans:
            if self.storage.age_s(name) > grace_s:
                self.storage.delete_job(name)
                files += 1
        ids = 0
        for s in JobStatus:
            members = [m.decode() for m in self.r.sscan_iter(self.keys.state(s), count=500)]
            pipe = self.r.pipeline()
            for m in members:
                pipe.exists(self.keys.job(m))
            gone = [m for m, alive in zip(members, pipe.execute()) if not alive]
            if gone:
                self.r.srem(self.keys.state(s), *gone)
                ids += len(gone)
        consumers = 0
        self.queue.ensure_group()
        for c in self.r.xinfo_consumers(self.keys.tasks, GROUP):
            if int(c["pending"]) == 0 and int(c["idle"]) > consumer_idle_s * 1000:
                self.r.xgroup_delconsumer(self.keys.tasks, GROUP, c["name"])
                consumers += 1
        return {"job_dirs": files, "expired_ids": ids, "consumers": consumers}

    def live_workers(self) -> int:
        return sum(1 for _ in self.r.scan_iter(self.keys.workers_pattern, count=100))

    async def live_workers_async(self, ar) -> int:
        """live_workers on a redis.asyncio client (`ar`, the same server): for routes that must not take a thread."""
        return len([k async for k in ar.scan_iter(self.keys.workers_pattern, count=100)])
