"""The owner of a job's life: creation, the state machine, cancel, finish, fail, expiry.

Everything that changes a job's state goes through `Jobs`, so each invariant has one place:

* The record is a `JobRecord` (service.jobs.record), which alone knows its Redis encoding.
* Every script gets all the keys it touches as KEYS, and touches keys of one hash slot only
  (service.jobs.keys), so the same code runs on one Redis and on Redis Cluster. A state change
  is therefore two steps. First a script on the job's slot checks the transition against
  `TRANSITIONS`, writes the status with its events (fenced by the job's lease where asked), and
  when the job ends restarts its keys' TTL (a job expires `job_ttl_s` after it ends); that step
  is the truth. Then a script on the shared slot moves the id between the per-state sets the
  gauges count and, when the job ends, out of its owner's quota set. A process that dies between
  the two leaves the sets behind the record, never ahead: the sweeper reconciles unfinished
  states' sets with the records (`sweep`), and `counts` checks those sets member by member.
* A job is created with its plan (`JobPlan`: preset, clip length, overlap, min_dim): first its
  record (job slot), then, in one script on the shared slot, the owner's quota check, the
  listing, the state set and its tasks; over quota, the record is deleted again. Workers read
  the plan and never re-plan.
* Files: a job's folder (a directory, or its objects in an S3 store: service.jobs.storage)
  belongs to its record. Whoever deletes the record deletes the files; a worker whose in-flight
  task ends on a deleted job deletes what it wrote; the sweeper (`sweep`) deletes every folder
  without a record, as a backstop (with S3, unfinished multipart uploads included).

Imports neither the worker nor torch: the API process uses this module.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from service.config import Settings
from service.jobs.keys import Keys, valid_job_id
from service.jobs.probing import probe_upload
from service.jobs.queue import GROUP, OUTPUTS, TaskQueue
from service.jobs.record import JobPlan, JobRecord, JobStatus, counter, decode_value, encode_fields
from service.jobs.storage import Storage
from service.model.presets import ModelConfig
from service.pipeline.clips import clip_plan
from service.video import VideoError, VideoInfo
from service.video.decode import OverLimit

log = logging.getLogger("stemseg.jobs")

_EVENTS_MAXLEN = 2000


# Target state -> the states it may be entered from. Final states are never left.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
}


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


# Job slot. KEYS: job hash, events stream, and optionally a lock whose holder alone may make the
# change (a fencing token). ARGV: new status, TTL to restart (0: the job has not ended), now,
# events to append when the change is made (a JSON list of [type, data]; the status event
# first), events TTL, events max length, the lock's token ('' without a lock), allowed-from
# count, allowed-from states..., then field/value pairs (JSON-encoded values) to write with the
# status. The events go in with the change or not at all, so a reader that sees the job ended
# has every event it announced (a finished job's tracks). Returns {previous status, owner}, or
# nil when nothing changed: what the shared slot's step needs.
_TRANSITION = """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return nil end
if KEYS[3] and redis.call('GET', KEYS[3]) ~= ARGV[7] then return nil end
local cur = cjson.decode(raw)
local n = tonumber(ARGV[8])
local ok = false
for i = 9, 8 + n do if ARGV[i] == cur then ok = true end end
if not ok then return nil end
redis.call('HSET', KEYS[1], 'status', cjson.encode(ARGV[1]), 'updated_at', ARGV[3])
for i = 9 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for _, ev in ipairs(cjson.decode(ARGV[4])) do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', ev[1], 'data', ev[2])
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return {cur, cjson.decode(redis.call('HGET', KEYS[1], 'owner'))}
"""

# Shared slot. KEYS: the set of the state left, the set of the state entered, the owner's quota
# set, the owner's listing. ARGV: job id, TTL (0: the job has not ended). Idempotent, so the
# sweeper can repeat it for a change whose process died between the two steps.
_MOVE_STATE = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
return 1
"""

# Shared slot. KEYS: the owner's quota set, the owner's listing, the queued state's set, the task
# stream. ARGV: job id, now, TTL, quota (0: none), then each task's stream entry as 8 strings
# (field, value x 4). Returns 0, changing nothing, when the owner already has `quota` unfinished jobs.
_ADMIT = """
if tonumber(ARGV[4]) > 0 and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
for i = 5, #ARGV, 8 do redis.call('XADD', KEYS[4], '*', unpack(ARGV, i, i + 7)) end
return 1
"""


# Job slot. KEYS: job hash. ARGV: "set" then field/value pairs, or "incr", field, amount. Writes
# only while the record exists, in one step: a DELETE between a check and a write would otherwise
# leave a record with no status, owner or TTL behind.
_WRITE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == 'incr' then return redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3]) end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


# The two one-record scripts serve live streams' records too (service.jobs.streams): they know
# nothing of jobs but the `status` and `owner` fields, which a stream's record has alike.
TRANSITION_SCRIPT, WRITE_IF_EXISTS_SCRIPT = _TRANSITION, _WRITE_IF_EXISTS
EVENTS_MAXLEN = _EVENTS_MAXLEN


class Jobs:
    def __init__(self, r: redis.Redis, prefix: str, ttl_s: int, storage: Storage,
                 visibility_timeout_s: float = 60.0) -> None:
        self.r, self.ttl, self.storage = r, ttl_s, storage
        self.keys = Keys(prefix)
        self.queue = TaskQueue(r, self.keys, visibility_timeout_s)
        self._transition = r.register_script(_TRANSITION)
        self._move_state = r.register_script(_MOVE_STATE)
        self._admit = r.register_script(_ADMIT)
        self._write = r.register_script(_WRITE_IF_EXISTS)
        # Called with the job id after it succeeded or failed here (workers send webhooks).
        self.on_end: Callable[[str], None] | None = None

    # -- reading -----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        if not valid_job_id(job_id):
            return None
        raw = self.r.hgetall(self.keys.job(job_id))
        return JobRecord.from_redis(raw) if raw else None

    async def owner_async(self, ar, job_id: str) -> str | None:
        """The job's owner on a redis.asyncio client (`ar`, the same server); None: no such job."""
        return decode_value(await ar.hget(self.keys.job(job_id), "owner"))

    async def status_async(self, ar, job_id: str) -> JobStatus | None:
        raw = decode_value(await ar.hget(self.keys.job(job_id), "status"))
        return None if raw is None else JobStatus(raw)

    def list(self, owner: str, offset: int, limit: int) -> tuple[int, list[JobRecord]]:
        index = self.keys.owner_jobs(owner)
        ids = [i.decode() for i in self.r.zrevrange(index, offset, offset + limit - 1)]
        pipe = self.r.pipeline(transaction=False)  # one record per slot: no transaction on a cluster
        for i in ids:
            pipe.hgetall(self.keys.job(i))
        jobs, gone = [], []
        for i, raw in zip(ids, pipe.execute()):
            if raw:
                jobs.append(JobRecord.from_redis(raw))
            else:
                gone.append(i)
        if gone:  # expired records: drop them from the listing
            self.r.zrem(index, *gone)
        return self.r.zcard(index), jobs

    def _statuses(self, ids: list[str]) -> list[JobStatus | None]:
        """Each job's status as its record says (None: no record), in one pipeline."""
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hget(self.keys.job(i), "status")
        return [None if v is None else JobStatus(decode_value(v)) for v in pipe.execute()]

    def counts(self) -> dict[str, int]:
        """Jobs per state: the sizes of the per-state sets. Unfinished jobs are few, so their
        sets are checked member by member against the records (a job that expired unfinished, or
        whose set was not yet moved, is counted where its record says); ended jobs' sets may
        still hold ids that expired since the last sweep (`sweep_interval_s`)."""
        pipe = self.r.pipeline(transaction=False)
        for s in JobStatus:
            (pipe.smembers if not s.final else pipe.scard)(self.keys.state(s))
        out = {s.value: 0 for s in JobStatus}
        for s, v in zip(JobStatus, pipe.execute()):
            if isinstance(v, int):
                out[s.value] += v
                continue
            ids = [m.decode() for m in v]
            out[s.value] += sum(1 for now in self._statuses(ids) if now == s)
        return out

    # -- creation ----------------------------------------------------------------------------
    def check_rate(self, owner: str, limit: int, window_s: int) -> None:
        """Fixed window per API key; raises RateLimited with the seconds to the next window."""
        if limit <= 0:
            return
        now = time.time()
        window = int(now // window_s)
        key = self.keys.rate(owner, window)
        # The counter gets its TTL when it is made, so no crash leaves one without.
        pipe = self.r.pipeline(transaction=False)
        pipe.set(key, 0, ex=window_s + 1, nx=True)
        pipe.incr(key)
        _, n = pipe.execute()
        if n > limit:
            raise RateLimited(limit, window_s, max(1, int((window + 1) * window_s - now + 0.999)))

    def check_quota(self, owner: str, limit: int) -> None:
        if limit > 0 and self.r.scard(self.keys.active(owner)) >= limit:
            raise QuotaExceeded(limit)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    @staticmethod
    def new_record(job_id: str, owner: str, plan: JobPlan, **fields: Any) -> JobRecord:
        """A queued job's record; `fields`: JobRecord's (num_frames, width, height, formats, ...)."""
        now = time.time()
        return JobRecord(id=job_id, owner=owner, status=JobStatus.QUEUED, created_at=now, updated_at=now, plan=plan,
                         num_clips=plan.num_clips, **fields)

    def create(self, job: JobRecord, quota: int = 0) -> JobRecord:
        """Record the job, then enqueue its tasks in one script that also holds the owner's
        quota; over quota, the record is deleted and QuotaExceeded raised. The job's files must
        already be in place: a worker may take the first task at once."""
        k, job_id = self.keys, job.id
        pipe = self.r.pipeline(transaction=True)  # the job's slot only
        # A TTL from creation too: bounds the life of a job that never ends (or whose API died
        # before the second step: invisible, nobody knows its id, it expires).
        pipe.hset(k.job(job_id), mapping=job.to_redis())
        pipe.expire(k.job(job_id), self.ttl)
        pipe.xadd(k.events(job_id), {"type": "status", "data": json.dumps({"status": JobStatus.QUEUED.value})})
        pipe.expire(k.events(job_id), self.ttl)
        pipe.execute()
        self.queue.ensure_group()
        tasks = [str(x) for start, stop in job.plan.task_ranges()
                 for pair in self.queue.entry(job_id, start, stop).items() for x in pair]
        if not self._admit(keys=[k.active(job.owner), k.owner_jobs(job.owner), k.state(JobStatus.QUEUED), k.tasks],
                           args=[job_id, json.dumps(job.created_at), self.ttl, quota, *tasks]):
            self.r.delete(k.job(job_id), k.events(job_id))
            raise QuotaExceeded(quota)
        return job

    def admit(self, staging: str, owner: str, *, model: ModelConfig, min_dim: int | None, clips_per_task: int,
              limits: Limits, quota: int, fields: dict[str, Any]) -> JobRecord:
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
            return self.create(self.new_record(
                job_id, owner, plan, num_frames=info.num_frames, width=info.width, height=info.height, fps=info.fps,
                duration_s=info.duration_s, min_dim=min_dim, preset=model.name, **fields), quota=quota)
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
        args: list[Any] = [status.value, ttl, json.dumps(time.time()), json.dumps(announced), self.ttl,
                           _EVENTS_MAXLEN, fence[1] if fence else "", len(allowed), *allowed, *encode_fields(fields)]
        keys = [self.keys.job(job_id), self.keys.events(job_id)] + ([fence[0]] if fence else [])
        moved = self._transition(keys=keys, args=args)
        if not moved:
            return False
        previous, owner = (v.decode() if isinstance(v, bytes) else v for v in moved)
        self._move(job_id, JobStatus(previous), status, owner)
        if self.on_end is not None and status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            self.on_end(job_id)
        return True

    def _move(self, job_id: str, previous: JobStatus, status: JobStatus, owner: str) -> None:
        k = self.keys
        self._move_state(keys=[k.state(previous), k.state(status), k.active(owner), k.owner_jobs(owner)],
                         args=[job_id, self.ttl if status.final else 0])

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
        # Two slots, so no transaction: the record first (the truth); ids left in the shared sets
        # by a crash between are pruned by the sweeper.
        self.r.delete(k.job(job_id), k.events(job_id), k.lock(job_id), k.timeline(job_id))
        pipe = self.r.pipeline(transaction=True)  # the shared slot only
        pipe.zrem(k.owner_jobs(job.owner), job_id)
        pipe.srem(k.active(job.owner), job_id)
        for s in JobStatus:
            pipe.srem(k.state(s), job_id)
        pipe.execute()

    # -- progress (no state change) ----------------------------------------------------------
    def update(self, job_id: str, **fields: Any) -> None:
        """Write fields of a job that still exists (a deleted job is never resurrected)."""
        fields["updated_at"] = time.time()
        self._write(keys=[self.keys.job(job_id)], args=["set", *encode_fields(fields)])

    def incr(self, job_id: str, field: str, by: int = 1) -> None:
        self._write(keys=[self.keys.job(job_id)], args=["incr", counter(field), by])

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
        """Queue one output task per range of frames. Three steps, as the record and the queue
        live in different slots: how the frames are cut is recorded first, then every task is
        queued in one transaction (all or none), then `outputs_queued`. A stitcher that dies
        between the last two is repeated by its redelivered task, which queues the same ranges
        again (output tasks are idempotent: the duplicates rewrite the same parts)."""
        self.update(job_id, render_tasks=len(spans), render_frames=render_frames)
        self.queue.put_all(job_id, spans, kind=OUTPUTS)
        self.update(job_id, outputs_queued=True)

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
        consumers of the task group that are idle and hold nothing (dead workers). Ids in an
        unfinished state's set whose record has moved on (its process died between the two
        steps of a change) are moved where the record says."""
        files = 0
        # Directories without a record (one pipeline of EXISTS), and only those are walked for
        # their age: live jobs' directories are never read.
        names = list(self.storage.jobs())  # job ids, and "upload-..." for uploads being received
        ids = [n for n in names if valid_job_id(n)]
        pipe = self.r.pipeline(transaction=False)
        for n in ids:
            pipe.exists(self.keys.job(n))
        orphans = [n for n in names if n.startswith("upload-")]
        orphans += [n for n, alive in zip(ids, pipe.execute()) if not alive]
        for name in orphans:
            if self.storage.age_s(name) > grace_s:
                self.storage.delete_job(name)
                files += 1
        gone_ids = moved = 0
        for s in JobStatus:
            members = [m.decode() for m in self.r.sscan_iter(self.keys.state(s), count=500)]
            if s.final:
                pipe = self.r.pipeline(transaction=False)
                for m in members:
                    pipe.exists(self.keys.job(m))
                gone = [m for m, alive in zip(members, pipe.execute()) if not alive]
            else:
                statuses = self._statuses(members)
                gone = [m for m, now in zip(members, statuses) if now is None]
                for m, now in zip(members, statuses):
                    if now is not None and now != s:
                        job = self.get(m)
                        if job is not None:
                            self._move(m, s, job.status, job.owner)
                            moved += 1
            if gone:
                self.r.srem(self.keys.state(s), *gone)
                gone_ids += len(gone)
        consumers = 0
        self.queue.ensure_group()
        for c in self.r.xinfo_consumers(self.keys.tasks, GROUP):
            if int(c["pending"]) == 0 and int(c["idle"]) > consumer_idle_s * 1000:
                self.r.xgroup_delconsumer(self.keys.tasks, GROUP, c["name"])
                consumers += 1
        return {"job_dirs": files, "expired_ids": gone_ids, "moved_ids": moved, "consumers": consumers}

    def live_workers(self) -> int:
        return sum(1 for _ in self.r.scan_iter(self.keys.workers_pattern, count=100))

    async def live_workers_async(self, ar) -> int:
        """live_workers on a redis.asyncio client (`ar`, the same server): for routes that must not take a thread."""
        return len([k async for k in ar.scan_iter(self.keys.workers_pattern, count=100)])
