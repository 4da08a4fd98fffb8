"""Per-stage wall-clock accounting for `stemseg bench` and job timings."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Sums seconds per stage. With `sync` on a CUDA device each stage ends with a synchronise,
    so asynchronous kernels are charged to the stage that launched them (bench only: it costs)."""

    def __init__(self, device: torch.device | str = "cpu", sync: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync and torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds[stage] += time.perf_counter() - start

    def wrap(self, stage: str, items: Iterator) -> Iterator:
        """Charge the time spent producing each item of an iterator (e.g. decoding) to a stage."""
        it = iter(items)
        while True:
            with self(stage):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
