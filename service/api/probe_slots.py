"""How many uploads an API process admits at once, each waited on by a thread of its own.

Admitting an upload takes up to `STEMSEG_PROBE_BUDGET_S` (the probe itself runs in a child
process: service.jobs.probing). On the shared thread pool (sync routes, dependencies,
`run_in_threadpool`) a few hostile uploads would hold every thread and stall everything else, so
admissions run on their own `anyio` limiter of `STEMSEG_MAX_CONCURRENT_PROBES` threads. An API key that already holds
`STEMSEG_MAX_PROBES_PER_KEY` is answered 503 with Retry-After at once (before its body is read):
that is the one tenant who could fill the slots. When every slot is busy with other uploads, an
upload waits up to `STEMSEG_PROBE_WAIT_S` for one (waiting holds no thread), so a legitimate
burst of small uploads is admitted, then 503.
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
    def __init__(self, total: int, per_key: int, retry_after_s: int, wait_s: float = 0.0) -> None:
        self.total, self.per_key, self.retry_after_s, self.wait_s = total, per_key, retry_after_s, wait_s
        self._freed: anyio.Event | None = None  # set when a slot is released
        self._threads: anyio.CapacityLimiter | None = None  # made in the event loop that uses it
        self._held: Counter[str] = Counter()

    @property
    def in_use(self) -> int:
        return sum(self._held.values())

    def check(self, owner: str) -> None:
        """Raise the 503 `run` would raise now (before an upload is read: no bytes for nothing).

        The total cap is checked here only when uploads do not wait for a slot (`wait_s` 0)."""
        if owner and self._held[owner] >= self.per_key:
            raise Problem(503, f"this API key has {self.per_key} uploads being probed, the most allowed "
                               "(STEMSEG_MAX_PROBES_PER_KEY); retry once one is answered",
                          headers={"Retry-After": str(self.retry_after_s)})
        if not self.wait_s:
            self._check_total()

    def _check_total(self) -> None:
        if self.in_use >= self.total:
            raise Problem(503, f"{self.total} uploads are being probed, the most this API process runs at once "
                               "(STEMSEG_MAX_CONCURRENT_PROBES); retry shortly",
                          headers={"Retry-After": str(self.retry_after_s)})

    async def run(self, owner: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on a probe thread, for `owner` ("" when API keys are off: no per-key cap)."""
        self.check(owner)
        deadline = anyio.current_time() + self.wait_s
        while self.in_use >= self.total and anyio.current_time() < deadline:
            if self._freed is None:
                self._freed = anyio.Event()
            with anyio.move_on_after(deadline - anyio.current_time()):
                await self._freed.wait()
            self.check(owner)
        self._check_total()  # checked and taken with no await in between: nothing else runs meanwhile
        self._held[owner] += 1
        try:
            if self._threads is None:
                self._threads = anyio.CapacityLimiter(self.total)
            return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self._threads)
        finally:
            self._held[owner] -= 1
            if not self._held[owner]:
                del self._held[owner]
            if self._freed is not None:
                self._freed.set()  # every waiter looks again; one takes the slot
                self._freed = None
