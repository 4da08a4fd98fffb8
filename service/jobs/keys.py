"""Every Redis key the service uses, named in one place (as RQ's `Job.key_for`).

Imported by the API, the workers and the tests; it imports nothing heavy, so the API process
can name keys without importing the worker (and with it torch).

Lifetimes (the reason where a key has no TTL):

Every key starts with the prefix P (`redis_prefix`). In braces: the hash tag, which decides the
Redis Cluster slot. A job's keys are `P:job:{ID}...` (the slot of its id); the keys all jobs share
are `{P}:...` (the slot of the prefix). A Lua script or MULTI touches keys of one of the two only.

| key | TTL |
| --- | --- |
| `P:job:{ID}` (hash, service.jobs.record), `P:job:{ID}:events` (capped stream) | `job_ttl_s`, from its end |
| `P:job:{ID}:lock` (the stitch/finish lease, service.jobs.lease) | the lease's own PX, renewed by its holder |
| `P:job:{ID}:timeline` (list of per-task timings, JSON) | `job_ttl_s` from its last entry |
| `{P}:jobs:OWNER` (sorted set, the owner's listing) | `job_ttl_s` from the owner's last job change |
| `{P}:active:OWNER` (set of unfinished jobs, the quota) | `job_ttl_s` from the owner's last new job |
| `{P}:state:STATUS` (set of job ids per state, the gauges) | none: pruned, reconciled by the sweeper |
| `{P}:rate:OWNER:WINDOW` (fixed-window counter) | the window |
| `{P}:tasks` (stream) and its consumer group | none: acknowledged entries are deleted, leaving live work |
| `{P}:worker:NAME` (heartbeat) | a few visibility timeouts |
| `{P}:stats:clips` (cumulative counters) | none: three fields, monotonic, read by `/metrics` |
| `{P}:sweep` (the sweeper's lease) | the sweep period |
| `P:stream:{ID}` (hash, service.jobs.stream_record), `P:stream:{ID}:events` | `job_ttl_s`, from its end |
| `{P}:streams:owner:OWNER` (the owner's unfinished streams, its limit) | `job_ttl_s` from its last new stream |
| `{P}:streams:live` (every unfinished stream, the metrics) | none: left as streams end, pruned by the sweeper |
| `{P}:stream-tasks` (stream) and its group: one entry per unfinished stream | none: acknowledged ones are deleted |
"""

from __future__ import annotations

import re

# uuid4().hex: validated before any Redis call, so no id can name another key.
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def valid_job_id(job_id: str) -> bool:
    return bool(JOB_ID.fullmatch(job_id))


class Keys:
    """Key names, hash-tagged for Redis Cluster: a job's keys share the tag `{id}` (one slot per
    job, so a script may touch all of them), and every key shared by all jobs shares the tag
    `{prefix}` (one slot per deployment, so the state sets, quotas and the queue can be changed
    together in one script or transaction). On a single Redis the braces are just characters."""

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:  # a brace would move the hash tag (STEMSEG_REDIS_PREFIX is checked too)
            raise ValueError("a Redis key prefix may not contain { or }")
        self.prefix = prefix
        self._shared = f"{{{prefix}}}"

    # -- one job's keys: slot of the job's id ------------------------------------------------
    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{{{job_id}}}"

    def events(self, job_id: str) -> str:
        return f"{self.job(job_id)}:events"

    def lock(self, job_id: str) -> str:
        return f"{self.job(job_id)}:lock"

    def timeline(self, job_id: str) -> str:
        return f"{self.job(job_id)}:timeline"

    # -- shared keys: one slot, the prefix's -------------------------------------------------
    def owner_jobs(self, owner: str) -> str:
        return f"{self._shared}:jobs:{owner or '-'}"

    def active(self, owner: str) -> str:
        return f"{self._shared}:active:{owner or '-'}"

    def state(self, status: str) -> str:
        return f"{self._shared}:state:{status}"

    def rate(self, owner: str, window: int) -> str:
        return f"{self._shared}:rate:{owner or '-'}:{window}"

    @property
    def tasks(self) -> str:
        return f"{self._shared}:tasks"

    def worker(self, name: str) -> str:
        return f"{self._shared}:worker:{name}"

    @property
    def workers_pattern(self) -> str:
        return f"{self._shared}:worker:*"

    @property
    def clip_stats(self) -> str:
        return f"{self._shared}:stats:clips"

    # -- live streams (service.jobs.streams): a stream's keys share the tag of its id -----------
    def stream(self, stream_id: str) -> str:
        return f"{self.prefix}:stream:{{{stream_id}}}"

    def stream_events(self, stream_id: str) -> str:
        return f"{self.stream(stream_id)}:events"

    def owner_streams(self, owner: str) -> str:
        return f"{self._shared}:streams:owner:{owner or '-'}"

    @property
    def live_streams(self) -> str:
        return f"{self._shared}:streams:live"

    @property
    def stream_tasks(self) -> str:
        return f"{self._shared}:stream-tasks"

    @property
    def sweep(self) -> str:
        return f"{self._shared}:sweep"

    @property
    def patterns(self) -> tuple[str, str]:
        """SCAN patterns that together match every key under this prefix (jobs', shared)."""
        return f"{self.prefix}:*", f"{self._shared}:*"
