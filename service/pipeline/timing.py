"""Per-stage wall-clock accounting for `stemseg bench` and job timings."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Sums seconds per stage. With `sync` on a CUDA device each stage ends with a synchronise,
    so asynchronous kernels are charged to the stage that launched them (bench only: it costs).

    Thread-safe: the pipeline's decode and post-processing threads charge their own stages, so
    with threads on, the stages overlap and their sum can exceed the wall-clock time."""

    def __init__(self, device: torch.device | str = "cpu", sync: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync and torch.device(device).type == "cuda"
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextmanager
    def __call__(self, stage: str, sync: bool = True) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync and sync:
                torch.cuda.synchronize()
            self.add(stage, time.perf_counter() - start)

    def wrap(self, stage: str, items: Iterator) -> Iterator:
        """Charge the time spent producing each item of an iterator (e.g. decoding) to a stage.
        No device sync: producing items is host work, possibly on another thread."""
        it = iter(items)
        while True:
            with self(stage, sync=False):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
