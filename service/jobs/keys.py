"""Every Redis key the service uses, named in one place (as RQ's `Job.key_for`).

Imported by the API, the workers and the tests; it imports nothing heavy, so the API process
can name keys without importing the worker (and with it torch).

Lifetimes (the reason where a key has no TTL):

| key | TTL |
| --- | --- |
| `job:{id}` (hash), `job:{id}:events` (capped stream) | `job_ttl_s`, restarted when the job ends |
| `job:{id}:lock` (the stitch/finish lease, service.jobs.lease) | the lease's own PX, renewed by its holder |
| `job:{id}:timeline` (list of per-task timings, JSON) | `job_ttl_s` from its last entry |
| `jobs:{owner}` (sorted set, the owner's listing) | `job_ttl_s` from the owner's last job change |
| `active:{owner}` (set of unfinished jobs, the quota) | `job_ttl_s` from the owner's last new job |
| `state:{status}` (set of job ids per state, the gauges) | none: one per state, pruned of expired ids by the sweeper |
| `rate:{owner}:{window}` (fixed-window counter) | the window |
| `tasks` (stream) and its consumer group | none: the queue; acknowledged entries are deleted, leaving only live work |
| `worker:{name}` (heartbeat) | a few visibility timeouts |
| `stats:clips` (cumulative counters) | none: three fields, monotonic, read by `/metrics` |
| `sweep` (the sweeper's lease) | the sweep period |
"""

from __future__ import annotations

import re

# uuid4().hex: validated before any Redis call, so no id can name another key.
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def valid_job_id(job_id: str) -> bool:
    return bool(JOB_ID.fullmatch(job_id))


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def lock(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lock"

    def timeline(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:timeline"

    def owner_jobs(self, owner: str) -> str:
        return f"{self.prefix}:jobs:{owner or '-'}"

    def active(self, owner: str) -> str:
        return f"{self.prefix}:active:{owner or '-'}"

    def state(self, status: str) -> str:
        return f"{self.prefix}:state:{status}"

    def rate(self, owner: str, window: int) -> str:
        return f"{self.prefix}:rate:{owner or '-'}:{window}"

    @property
    def tasks(self) -> str:
        return f"{self.prefix}:tasks"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    @property
    def workers_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    @property
    def clip_stats(self) -> str:
        return f"{self.prefix}:stats:clips"

    @property
    def sweep(self) -> str:
        return f"{self.prefix}:sweep"
