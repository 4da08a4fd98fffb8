"""The task queue: a Redis Stream with one consumer group.

Redis Streams give at-least-once delivery with crash recovery without another broker: a task
read by a worker stays in the group's pending list until acknowledged; a worker that dies
stops refreshing its claim, and after the visibility timeout any other worker takes the task
over with XAUTOCLAIM. The pending list also counts deliveries, which bounds retries.
Acknowledged entries are deleted, so the stream holds only live work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from service.jobs.keys import Keys

GROUP = "workers"


CLIPS, OUTPUTS = "clips", "outputs"


@dataclass
class Task:
    """`clips`: clips start..stop-1 through the network and clustering; `outputs`: frames
    start..stop-1 of the job's output formats (queued once every clip is stitched)."""

    id: str
    job_id: str
    start: int
    stop: int
    deliveries: int
    kind: str = CLIPS
    taken_at: float = 0.0

    @property
    def queued_at(self) -> float:
        """When it was first queued: a stream entry id starts with its Redis time in ms."""
        return int(self.id.split("-")[0]) / 1000


class TaskQueue:
    def __init__(self, r: redis.Redis, keys: Keys, visibility_timeout_s: float, stream: str | None = None) -> None:
        """`stream`: the Redis stream of the queue (default the file tasks', `keys.tasks`; live
        streams have their own, `keys.stream_tasks`, with the same lease and takeover)."""
        self.r = r
        self.stream = stream or keys.tasks
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self._group = False

    def ensure_group(self) -> None:
        """Create the stream and its group on first use (not at construction: a process that
        starts while Redis is down must come up and answer 503, not crash)."""
        if self._group:
            return
        try:
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group = True

    @staticmethod
    def entry(job_id: str, start: int, stop: int, kind: str = CLIPS) -> dict[str, str | int]:
        """A task's stream entry (what `take` reads back)."""
        return {"job": job_id, "start": start, "stop": stop, "kind": kind}

    def put(self, job_id: str, start: int, stop: int, kind: str = CLIPS) -> None:
        self.put_all(job_id, [(start, stop)], kind)

    def put_all(self, job_id: str, spans: list[tuple[int, int]], kind: str = CLIPS) -> None:
        """Queue one task per span in one transaction (one key: fine on Redis Cluster): all or none."""
        self.ensure_group()
        pipe = self.r.pipeline(transaction=True)
        for start, stop in spans:
            pipe.xadd(self.stream, self.entry(job_id, start, stop, kind))
        pipe.execute()

    def _task(self, entry_id: bytes, fields: dict) -> Task:
        tid = entry_id.decode()
        pending = self.r.xpending_range(self.stream, GROUP, min=tid, max=tid, count=1)
        return Task(tid, fields[b"job"].decode(), int(fields[b"start"]), int(fields[b"stop"]),
                    pending[0]["times_delivered"] if pending else 1, fields.get(b"kind", CLIPS.encode()).decode(),
                    time.time())

    def _group_call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):  # Redis came back without its data: make the group again
                self._group = False
                return None
            raise

    def take(self, consumer: str, block_ms: int = 1000) -> Task | None:
        """A stale task first (its worker died), else a new one, else None after block_ms."""
        self.ensure_group()
        claimed = self._group_call(self.r.xautoclaim, self.stream, GROUP, consumer, self.visibility_ms, "0-0",
                                   count=1)
        if claimed is None:
            return None
        _, claimed, _ = claimed
        for entry_id, fields in claimed:
            if fields:  # an entry deleted while pending comes back empty
                return self._task(entry_id, fields)
            self.r.xack(self.stream, GROUP, entry_id)
        res = self._group_call(self.r.xreadgroup, GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms)
        for _, entries in res or []:
            for entry_id, fields in entries:
                return self._task(entry_id, fields)
        return None

    def touch(self, consumer: str, task_id: str) -> None:
        """Heartbeat: reset the task's idle time so nobody else claims it."""
        self.r.xclaim(self.stream, GROUP, consumer, 0, [task_id], justid=True)

    def done(self, task_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.xack(self.stream, GROUP, task_id)
        pipe.xdel(self.stream, task_id)
        pipe.execute()

    def forget_consumer(self, consumer: str) -> None:
        if self.r.exists(self.stream):  # (no stream: never used, nothing to forget)
            self.r.xgroup_delconsumer(self.stream, GROUP, consumer)

    def depth(self) -> int:
        """Tasks waiting or held: the group's lag plus its pending entries."""
        if not self.r.exists(self.stream):
            return 0
        for g in self.r.xinfo_groups(self.stream):
            if g["name"].decode() == GROUP:
                return int(g.get("lag") or 0) + int(g["pending"])
        return 0
