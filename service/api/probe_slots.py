"""Where an API process probes uploads: threads of their own, a bounded number at once.

Probing is CPU work of up to `STEMSEG_PROBE_BUDGET_S` per upload. On the shared thread pool
(sync routes, dependencies, `run_in_threadpool`) a few hostile uploads would hold every thread
and stall everything else, so probes run on their own `anyio` limiter of
`STEMSEG_MAX_CONCURRENT_PROBES` threads. A slot is taken without waiting: when all are busy,
or the caller's API key already holds `STEMSEG_MAX_PROBES_PER_KEY`, the upload is answered 503
with Retry-After at once rather than queued behind them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import anyio
import anyio.to_thread

from service.api.problems import Problem

T = TypeVar("T")


class ProbeSlots:
    def __init__(self, total: int, per_key: int, retry_after_s: int) -> None:
        self.total, self.per_key, self.retry_after_s = total, per_key, retry_after_s
        self._threads: anyio.CapacityLimiter | None = None  # made in the event loop that uses it
        self._held: Counter[str] = Counter()

    @property
    def in_use(self) -> int:
        return sum(self._held.values())

    def check(self, owner: str) -> None:
        """Raise the 503 `run` would raise now (before an upload is read: no bytes for nothing)."""
        if owner and self._held[owner] >= self.per_key:
            raise Problem(503, f"this API key has {self.per_key} uploads being probed, the most allowed "
                               "(STEMSEG_MAX_PROBES_PER_KEY); retry once one is answered",
                          headers={"Retry-After": str(self.retry_after_s)})
        if self.in_use >= self.total:
            raise Problem(503, f"{self.total} uploads are being probed, the most this API process runs at once "
                               "(STEMSEG_MAX_CONCURRENT_PROBES); retry shortly",
                          headers={"Retry-After": str(self.retry_after_s)})

    async def run(self, owner: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on a probe thread, for `owner` ("" when API keys are off: no per-key cap)."""
        self.check(owner)  # checked and taken with no await in between: nothing else runs meanwhile
        self._held[owner] += 1
        try:
            if self._threads is None:
                self._threads = anyio.CapacityLimiter(self.total)
            return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self._threads)
        finally:
            self._held[owner] -= 1
            if not self._held[owner]:
                del self._held[owner]
