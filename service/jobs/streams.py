"""The owner of a live stream's life: creation under the per-key limit, the state machine, stop
(DELETE), takeover, expiry. The API routes (service.api.routes.streams) and the worker's stream
slots (service.jobs.stream_worker) change a stream only through `Streams`.

As for jobs (service.jobs.lifecycle, whose one-record scripts this module runs on streams'
records): a state change is first a script on the stream's slot, checking the transition against
`TRANSITIONS`, writing the status with its event and, when the stream ends, restarting its keys'
TTL (a stream expires `job_ttl_s` after it ends, its files with it); that step is the truth. Then
the shared slot's sets are updated: the owner's unfinished streams (the per-key limit) and every
unfinished stream (the metrics). A process that dies between the two leaves the sets behind the
record, never ahead; `create` and `sweep` prune members whose record has ended or expired.

A stream is one entry on its own task queue (`Keys.stream_tasks`, the same Redis Streams queue as
file tasks: a worker holds it with a heartbeat, and after the visibility timeout another worker
takes it over). The entry is acknowledged when the stream ends.

Imports neither the worker nor torch: the API process uses this module.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from service.jobs.keys import Keys, valid_job_id
from service.jobs.lifecycle import EVENTS_MAXLEN, TRANSITION_SCRIPT, WRITE_IF_EXISTS_SCRIPT
from service.jobs.queue import TaskQueue
from service.jobs.record import decode_value
from service.jobs.storage import Storage
from service.jobs.stream_record import StreamRecord, StreamStatus, encode_fields, storage_name

STREAM = "stream"  # the kind of a stream's queue entry

# Target state -> the states it may be entered from. Final states are never left. A takeover is
# no transition: the stream stays running, under a new tenure (`take_over`).
TRANSITIONS: dict[StreamStatus, frozenset[StreamStatus]] = {
    StreamStatus.RUNNING: frozenset({StreamStatus.QUEUED}),
    StreamStatus.STOPPING: frozenset({StreamStatus.RUNNING}),
    StreamStatus.STOPPED: frozenset({StreamStatus.QUEUED, StreamStatus.STOPPING}),
    StreamStatus.ENDED: frozenset({StreamStatus.RUNNING}),
    StreamStatus.FAILED: frozenset({StreamStatus.QUEUED, StreamStatus.RUNNING, StreamStatus.STOPPING}),
}

# Shared slot. KEYS: the owner's unfinished streams, every unfinished stream, the stream queue.
# ARGV: stream id, TTL, limit (0: none), then the queue entry's field/value pairs. Returns 0,
# changing nothing, when the owner already has `limit` unfinished streams.
_ADMIT = """
if tonumber(ARGV[3]) > 0 and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 4, #ARGV))
return 1
"""


# Stream slot. KEYS: the record, its events. ARGV: events TTL, events max length, number of
# events, then each event's type and data, then field/value pairs of the record (JSON values).
# Only while the record exists (an expired stream is never resurrected).
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[3])
for i = 4, 3 + 2 * n, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
end
if n > 0 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
for i = 4 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class StreamLimit(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"this API key already has {limit} unfinished live streams, the most allowed "
                         "(STEMSEG_MAX_STREAMS_PER_KEY)")
        self.limit = limit


class Streams:
    def __init__(self, r: redis.Redis, prefix: str, ttl_s: int, storage: Storage,
                 visibility_timeout_s: float = 60.0) -> None:
        self.r, self.ttl, self.storage = r, ttl_s, storage
        self.keys = Keys(prefix)
        self.queue = TaskQueue(r, self.keys, visibility_timeout_s, stream=self.keys.stream_tasks)
        self._transition = r.register_script(TRANSITION_SCRIPT)
        self._write = r.register_script(WRITE_IF_EXISTS_SCRIPT)
        self._admit = r.register_script(_ADMIT)
        self._publish = r.register_script(_PUBLISH)

    # -- reading -----------------------------------------------------------------------------
    def get(self, stream_id: str) -> StreamRecord | None:
        if not valid_job_id(stream_id):  # the same form as a job id: 32 hex digits
            return None
        raw = self.r.hgetall(self.keys.stream(stream_id))
        return StreamRecord.from_redis(raw) if raw else None

    async def owner_async(self, ar, stream_id: str) -> str | None:
        return decode_value(await ar.hget(self.keys.stream(stream_id), "owner"))

    async def status_async(self, ar, stream_id: str) -> StreamStatus | None:
        raw = decode_value(await ar.hget(self.keys.stream(stream_id), "status"))
        return None if raw is None else StreamStatus(raw)

    def unfinished(self) -> list[StreamRecord]:
        """Every stream not yet ended, by its record (the metrics); ids whose record has ended or
        expired are pruned from the set on the way."""
        ids = [m.decode() for m in self.r.smembers(self.keys.live_streams)]
        records, stale = [], []
        for i in ids:
            rec = self.get(i)
            if rec is None or rec.final:
                stale.append(i)
            else:
                records.append(rec)
        if stale:
            self.r.srem(self.keys.live_streams, *stale)
        return records

    def _prune_owner(self, owner: str) -> None:
        key = self.keys.owner_streams(owner)
        stale = [m for m in self.r.smembers(key) if (rec := self.get(m.decode())) is None or rec.final]
        if stale:
            self.r.srem(key, *stale)

    # -- creation ----------------------------------------------------------------------------
    def create(self, owner: str, url: str, formats: list[str], max_duration_s: float, preset: str,
               limit: int) -> StreamRecord:
        """Record a queued stream, then in one script on the shared slot check the owner's limit
        and queue it; over the limit the record is deleted again and StreamLimit raised."""
        now = time.time()
        rec = StreamRecord(id=uuid.uuid4().hex, owner=owner, status=StreamStatus.QUEUED, created_at=now,
                           updated_at=now, url=url, formats=list(formats), max_duration_s=max_duration_s,
                           preset=preset)
        k = self.keys
        pipe = self.r.pipeline(transaction=True)  # the stream's slot only
        # A TTL from creation too: bounds a stream whose creator died before the second step.
        pipe.hset(k.stream(rec.id), mapping=rec.to_redis())
        pipe.expire(k.stream(rec.id), self.ttl)
        pipe.xadd(k.stream_events(rec.id), {"type": "status", "data": json.dumps({"status": rec.status.value})})
        pipe.expire(k.stream_events(rec.id), self.ttl)
        pipe.execute()
        self._prune_owner(owner)
        self.queue.ensure_group()
        entry = [str(x) for pair in self.queue.entry(rec.id, 0, 0, kind=STREAM).items() for x in pair]
        if not self._admit(keys=[k.owner_streams(owner), k.live_streams, k.stream_tasks],
                           args=[rec.id, self.ttl, limit, *entry]):
            self.r.delete(k.stream(rec.id), k.stream_events(rec.id))
            raise StreamLimit(limit)
        return rec

    # -- state changes -----------------------------------------------------------------------
    def transition(self, stream_id: str, status: StreamStatus, *, events: list[tuple[str, dict]] = (),
                   **fields: Any) -> bool:
        """Move the stream to `status` if the table allows it from its current state (False if it
        is gone or cannot move there); the status event, then `events`, go in the same step."""
        allowed = [s.value for s in TRANSITIONS[status]]
        ttl = self.ttl if status.final else 0
        now = time.time()
        if status.final:
            fields.setdefault("finished_at", now)
        announced = [["status", json.dumps({"status": status.value, **fields})]]
        announced += [[kind, json.dumps(data)] for kind, data in events]
        args: list[Any] = [status.value, ttl, json.dumps(now), json.dumps(announced), self.ttl, EVENTS_MAXLEN, "",
                           len(allowed), *allowed, *encode_fields(fields)]
        moved = self._transition(keys=[self.keys.stream(stream_id), self.keys.stream_events(stream_id)], args=args)
        if not moved:
            return False
        if status.final:
            owner = moved[1].decode() if isinstance(moved[1], bytes) else moved[1]
            pipe = self.r.pipeline(transaction=True)  # the shared slot only
            pipe.srem(self.keys.owner_streams(owner), stream_id)
            pipe.srem(self.keys.live_streams, stream_id)
            pipe.execute()
        return True

    def stop(self, stream_id: str) -> StreamRecord | None:
        """DELETE: a queued stream is stopped at once; a running one is asked to stop (its worker
        sees `stopping`, writes the outputs of what it saw and moves it to stopped). What was
        written is kept until the stream expires."""
        rec = self.get(stream_id)
        if rec is None or rec.final or rec.status == StreamStatus.STOPPING:
            return rec  # a second DELETE changes nothing: the worker is already writing the outputs
        if rec.status == StreamStatus.QUEUED and self.transition(stream_id, StreamStatus.STOPPED, ended_by="deleted"):
            return self.get(stream_id)
        self.transition(stream_id, StreamStatus.STOPPING, ended_by="deleted")  # running (or it just started)
        return self.get(stream_id)

    def take_over(self, stream_id: str, worker: str, gap: dict[str, Any] | None) -> StreamRecord | None:
        """A worker takes the stream: its next tenure. `gap`: the previous worker was lost (or
        stopped) mid-stream, recorded in the record's gaps and as a `gap` event."""
        rec = self.get(stream_id)
        if rec is None:
            return None
        fields: dict[str, Any] = {"worker": worker, "tenure": rec.tenure + 1}
        if gap is not None:
            fields["gaps"] = [*rec.gaps, gap]
        self.update(stream_id, **fields)
        if gap is not None:
            self.events(stream_id, [("gap", gap)])
        return self.get(stream_id)

    # -- progress (no state change) ----------------------------------------------------------
    def update(self, stream_id: str, **fields: Any) -> None:
        """Write fields of a stream that still exists (an expired one is never resurrected)."""
        fields["updated_at"] = time.time()
        self._write(keys=[self.keys.stream(stream_id)], args=["set", *encode_fields(fields)])

    def events(self, stream_id: str, events: list[tuple[str, dict[str, Any]]], **fields: Any) -> None:
        """Append events (capped as a job's: a late reader sees the newest) and write `fields`
        of the record, in one script on the stream's slot: a worker killed in between cannot
        leave frame events the record's `frames_seen` does not count (a takeover numbers its
        frames from there). Nothing is written for a stream whose record is gone."""
        if not events and not fields:
            return
        if fields:
            fields["updated_at"] = time.time()
        args: list[Any] = [self.ttl, EVENTS_MAXLEN, len(events)]
        for kind, data in events:
            args += [kind, json.dumps(data)]
        self._publish(keys=[self.keys.stream(stream_id), self.keys.stream_events(stream_id)],
                      args=[*args, *encode_fields(fields)])

    # -- expiry ------------------------------------------------------------------------------
    def sweep(self, grace_s: float) -> dict[str, int]:
        """Delete the directories of streams whose record has expired (once `grace_s` old), and
        prune the set of unfinished streams."""
        names = [n for n in self.storage.jobs() if n.startswith("stream-")]
        ids = [n[len("stream-"):] for n in names]
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.exists(self.keys.stream(i))
        gone = 0
        for name, i, alive in zip(names, ids, pipe.execute()):
            if not alive and self.storage.age_s(name) > grace_s:
                self.storage.delete_job(name)
                gone += 1
        before = self.r.scard(self.keys.live_streams)
        self.unfinished()
        return {"stream_dirs": gone, "stream_ids": before - self.r.scard(self.keys.live_streams)}


__all__ = ["STREAM", "TRANSITIONS", "StreamLimit", "Streams", "storage_name"]
