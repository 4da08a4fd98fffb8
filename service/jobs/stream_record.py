"""A live stream's record: its one typed form (`StreamRecord`) and its encoding as a Redis hash.

As a job's (service.jobs.record): one field per attribute, each value JSON text, so the Lua scripts
shared with the jobs' state machine read `status` and `owner` with cjson, and a partial write (HSET
of a few fields) never rewrites the record. Writers name fields as keyword arguments that
`encode_fields` checks against the class.

Imports neither the worker nor torch (the API process uses this module).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class StreamStatus(StrEnum):
    """The states of a live stream; which may follow which is service.jobs.streams' `TRANSITIONS`.

    queued (no worker has it yet) -> running -> ended (the source ended or max_duration_s passed)
    | stopping (DELETE asked a worker to stop) -> stopped; failed from any unfinished state."""

    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ENDED = "ended"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (StreamStatus.STOPPED, StreamStatus.ENDED, StreamStatus.FAILED)


# Upper bounds (seconds) of the end-to-end latency histogram: a frame's arrival at the worker to
# its frame event in Redis. The last bucket is +Inf. Shared by the worker (which counts) and /metrics.
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, float("inf"))


@dataclass
class StreamRecord:
    """Everything Redis keeps about one live stream (the hash at `Keys.stream`)."""

    id: str
    owner: str  # hash of the API key, "" when keys are off
    status: StreamStatus
    created_at: float
    updated_at: float
    url: str  # as given (it may hold a camera's password: shown only through redact())
    formats: list[str]
    max_duration_s: float
    preset: str
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None  # the worker running it now (or last)
    # A tenure is one worker's run of the stream: 1 for the first, one more per takeover.
    tenure: int = 0
    # Totals over every tenure (a takeover continues them), written as the worker goes.
    frames_seen: int = 0  # frames whose tracks were published (frame events)
    frames_read: int = 0  # decoded from the source, dropped ones included
    frames_dropped: int = 0
    clips_dropped: int = 0
    reconnects: int = 0
    latency_s: float | None = None  # the latest frame's, arrival to its frame event
    frames_per_second: float | None = None  # published, over the last few seconds
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))  # per bucket
    latency_sum_s: float = 0.0
    next_track_id: int = 1  # the next tenure's first track id: ids never repeat over a gap
    # Where the frames stop being one run: {"after_frame", "cause", "at", "tenure"}; a takeover's
    # cause is "worker lost" (the frames its worker had not yet published are not in the events).
    gaps: list[dict[str, Any]] = field(default_factory=list)
    # One output folder per tenure that saw frames: {"tenure", "path", "frames", "first_frame", "tracks"}.
    outputs: list[dict[str, Any]] = field(default_factory=list)
    ended_by: str | None = None
    error: str | None = None

    def to_redis(self) -> dict[str, str]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["status"] = self.status.value
        return {k: json.dumps(v) for k, v in out.items()}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> StreamRecord:
        # A field this version does not know (a newer one wrote it during a rolling upgrade) is left out.
        values = {k.decode(): json.loads(v) for k, v in raw.items() if k.decode() in _FIELDS}
        values["status"] = StreamStatus(values["status"])
        return cls(**values)

    @property
    def final(self) -> bool:
        return self.status.final

    @property
    def directory(self) -> str:
        return storage_name(self.id)


def storage_name(stream_id: str) -> str:
    """The stream's directory in storage. Not the bare id, which the jobs' sweeper would take
    for a job without a record; service.jobs.streams' sweep owns these directories."""
    return f"stream-{stream_id}"


_FIELDS = frozenset(f.name for f in dataclasses.fields(StreamRecord))
# Written only by the state machine (service.jobs.streams), never by `update`.
STATE_FIELDS = frozenset({"status", "id", "owner", "created_at"})


def encode_fields(fields: dict[str, Any]) -> list[str]:
    """Field/value pairs for an HSET of part of a record; ValueError for a field `StreamRecord`
    does not have or one only the state machine writes."""
    out: list[str] = []
    for name, value in fields.items():
        if name not in _FIELDS:
            raise ValueError(f"a stream record has no field {name!r}")
        if name in STATE_FIELDS:
            raise ValueError(f"{name!r} is written only by the state machine (service.jobs.streams)")
        out += [name, json.dumps(value)]
    return out
