"""Job records in Redis: state, progress, listing and the per-job event stream.

Every key carries the job TTL; listings are sorted sets trimmed of expired ids on read, and
event streams are capped, so no key grows without bound.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = {"succeeded", "failed", "cancelled"}
_EVENTS_MAXLEN = 2000


class JobStore:
    def __init__(self, r: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.r, self.p, self.ttl = r, prefix, ttl_s

    def key(self, job_id: str, *parts: str) -> str:
        return ":".join((self.p, "job", job_id, *parts))

    def _index(self, owner: str) -> str:
        return f"{self.p}:jobs:{owner or '-'}"

    def create(self, owner: str, fields: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        record = {"id": job_id, "owner": owner, "status": "queued", "created_at": now, "updated_at": now,
                  "clips_done": 0, "frames_done": 0, **fields}
        pipe = self.r.pipeline()
        pipe.hset(self.key(job_id), mapping={k: json.dumps(v) for k, v in record.items()})
        pipe.expire(self.key(job_id), self.ttl)
        pipe.zadd(self._index(owner), {job_id: now})
        pipe.expire(self._index(owner), self.ttl)
        pipe.hincrby(f"{self.p}:stats", "queued", 1)
        pipe.execute()
        return job_id

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(self.key(job_id))
        return {k.decode(): json.loads(v) for k, v in raw.items()} if raw else None

    def update(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        # Only touch a job that still exists: a deleted job must not be resurrected by a worker.
        if self.r.exists(self.key(job_id)):
            self.r.hset(self.key(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})

    def incr(self, job_id: str, field: str, by: int = 1) -> None:
        if self.r.exists(self.key(job_id)):
            self.r.hincrby(self.key(job_id), field, by)

    def transition(self, job_id: str, status: str, **fields: Any) -> bool:
        """Move to a state unless the job is gone or already final; keeps the per-state counts."""
        old = self.get(job_id)
        if old is None or old["status"] in FINAL or old["status"] == status:
            return False
        self.update(job_id, status=status, **fields)
        pipe = self.r.pipeline()
        pipe.hincrby(f"{self.p}:stats", old["status"], -1)
        pipe.hincrby(f"{self.p}:stats", status, 1)
        pipe.execute()
        self.event(job_id, "status", {"status": status, **fields})
        return True

    def counts(self) -> dict[str, int]:
        raw = self.r.hgetall(f"{self.p}:stats")
        return {s: max(int(raw.get(s.encode(), 0)), 0) for s in STATES}

    def list(self, owner: str, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        index = self._index(owner)
        self.r.zremrangebyscore(index, "-inf", time.time() - self.ttl)
        ids = [i.decode() for i in self.r.zrevrange(index, offset, offset + limit - 1)]
        jobs = [j for j in (self.get(i) for i in ids) if j is not None]
        return self.r.zcard(index), jobs

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if job is None:
            return
        pipe = self.r.pipeline()
        pipe.zrem(self._index(job["owner"]), job_id)
        pipe.delete(self.key(job_id), self.key(job_id, "events"), self.key(job_id, "lock"))
        pipe.hincrby(f"{self.p}:stats", job["status"], -1)
        pipe.execute()

    # Events: a capped stream per job, read by the server-sent-events endpoint.
    def event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        key = self.key(job_id, "events")
        pipe = self.r.pipeline()
        pipe.xadd(key, {"type": kind, "data": json.dumps(data)}, maxlen=_EVENTS_MAXLEN, approximate=True)
        pipe.expire(key, self.ttl)
        pipe.execute()

    def read_events(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, str, str]]:
        res = self.r.xread({self.key(job_id, "events"): after}, block=block_ms, count=100)
        out = []
        for _, entries in res or []:
            for entry_id, fields in entries:
                out.append((entry_id.decode(), fields[b"type"].decode(), fields[b"data"].decode()))
        return out
