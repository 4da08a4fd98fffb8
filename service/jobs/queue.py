"""The task queue: a Redis Stream with one consumer group.

Redis Streams give at-least-once delivery with crash recovery without another broker: a task
read by a worker stays in the group's pending list until acknowledged; a worker that dies
stops refreshing its claim, and after the visibility timeout any other worker takes the task
over with XAUTOCLAIM. The pending list also counts deliveries, which bounds retries.
Acknowledged entries are deleted, so the stream holds only live work.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

GROUP = "workers"


@dataclass
class Task:
    id: str
    job_id: str
    start: int  # first clip
    stop: int  # one past the last clip
    deliveries: int


class TaskQueue:
    def __init__(self, r: redis.Redis, prefix: str, visibility_timeout_s: float) -> None:
        self.r = r
        self.stream = f"{prefix}:tasks"
        self.visibility_ms = int(visibility_timeout_s * 1000)
        try:
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def put(self, job_id: str, start: int, stop: int) -> str:
        return self.r.xadd(self.stream, {"job": job_id, "start": start, "stop": stop}).decode()

    def _task(self, entry_id: bytes, fields: dict) -> Task:
        tid = entry_id.decode()
        pending = self.r.xpending_range(self.stream, GROUP, min=tid, max=tid, count=1)
        return Task(tid, fields[b"job"].decode(), int(fields[b"start"]), int(fields[b"stop"]),
                    pending[0]["times_delivered"] if pending else 1)

    def take(self, consumer: str, block_ms: int = 1000) -> Task | None:
        """A stale task first (its worker died), else a new one, else None after block_ms."""
        _, claimed, _ = self.r.xautoclaim(self.stream, GROUP, consumer, self.visibility_ms, "0-0", count=1)
        for entry_id, fields in claimed:
            if fields:  # an entry deleted while pending comes back empty
                return self._task(entry_id, fields)
            self.r.xack(self.stream, GROUP, entry_id)
        res = self.r.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms)
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

    def depth(self) -> int:
        """Tasks waiting or held: the group's lag plus its pending entries."""
        for g in self.r.xinfo_groups(self.stream):
            if g["name"].decode() == GROUP:
                return int(g.get("lag") or 0) + int(g["pending"])
        return 0
