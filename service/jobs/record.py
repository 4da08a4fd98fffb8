"""A job's record: its one typed form (`JobRecord`) and its encoding as a Redis hash.

The hash holds one field per attribute, each value JSON text, so the Lua scripts of
service.jobs.lifecycle can read the two they need (`status`, `owner`) with cjson and a partial
write (`HSET` of a few fields) never has to rewrite the record. Nothing else names a field:
readers get a `JobRecord`, writers name fields as keyword arguments that `encode_fields` checks
against the class, so a misspelt field is an error here, not a silent extra key in Redis.

Imports neither the worker nor torch (the API process uses this module).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    """The states of a job; which state may follow which is service.jobs.lifecycle's `TRANSITIONS`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


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


@dataclass
class JobRecord:
    """Everything Redis keeps about one job (the hash at `Keys.job`)."""

    id: str
    owner: str  # hash of the API key, "" when keys are off
    status: JobStatus
    created_at: float
    updated_at: float
    plan: JobPlan
    num_clips: int
    num_frames: int
    width: int
    height: int
    formats: list[str]
    fps: float | None = None
    duration_s: float | None = None
    min_dim: int | None = None
    preset: str | None = None
    min_iou: float | None = None
    filename: str | None = None
    callback_url: str | None = None
    # Progress, written by workers.
    clips_done: int = 0
    frames_done: int = 0
    stitched: int = 0  # clips chained on so far
    # Set once every clip is stitched: how the frames were cut into output tasks.
    render_tasks: int | None = None
    render_frames: int | None = None
    outputs_queued: bool = False  # the output tasks are on the queue (written after them)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    retry_reason: str | None = None  # why a task of the job was last left for redelivery (a store outage...)
    tracks: int | None = None
    webhook: dict[str, Any] | None = None  # {"url", "delivered", "attempts": [...]}, by the notifier

    # -- the Redis hash ----------------------------------------------------------------------
    def to_redis(self) -> dict[str, str]:
        """Every field, JSON-encoded, for one HSET of the whole record."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["status"] = self.status.value
        out["plan"] = asdict(self.plan)
        return {k: json.dumps(v) for k, v in out.items()}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> JobRecord:
        # A field this version does not know (written by a newer one during a rolling upgrade) is left out.
        values = {k.decode(): json.loads(v) for k, v in raw.items() if k.decode() in _FIELDS}
        values["status"] = JobStatus(values["status"])
        values["plan"] = JobPlan(**values["plan"])
        return cls(**values)

    @property
    def final(self) -> bool:
        return self.status.final


_FIELDS = frozenset(f.name for f in dataclasses.fields(JobRecord))
# Written only by the state machine's scripts (service.jobs.lifecycle), never by `update`.
STATE_FIELDS = frozenset({"status", "id", "owner", "plan", "created_at"})
COUNTERS = frozenset({"clips_done", "frames_done", "stitched"})


def encode_fields(fields: dict[str, Any]) -> list[str]:
    """Field/value pairs for an HSET of part of a record (values JSON-encoded as `to_redis`'s);
    raises ValueError naming a field `JobRecord` does not have or one only the state machine writes."""
    out: list[str] = []
    for name, value in fields.items():
        if name not in _FIELDS:
            raise ValueError(f"a job record has no field {name!r}")
        if name in STATE_FIELDS:
            raise ValueError(f"{name!r} is written only by the state machine (service.jobs.lifecycle)")
        out += [name, json.dumps(value)]
    return out


def counter(name: str) -> str:
    """The name of a counter field, checked (HINCRBY on anything else would corrupt a JSON value)."""
    if name not in COUNTERS:
        raise ValueError(f"{name!r} is not a counter of a job record")
    return name


def decode_value(raw: bytes | None) -> Any:
    """One field read alone (HGET of `status` or `owner`)."""
    return None if raw is None else json.loads(raw)
