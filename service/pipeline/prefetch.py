"""Run an iterator ahead of its consumer on a thread, through a bounded queue.

Decoding (PyAV releases the GIL while FFmpeg works) then overlaps with the network instead of
stalling it between clips, and the queue's bound keeps memory to `depth` items.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from service.pipeline.timing import StageTimer

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int, timer: StageTimer | None = None,
             wait_stage: str = "decode_wait") -> Iterator[T]:
    """Yield `items` in order, produced up to `depth` ahead on a daemon thread. The producer's
    exception is re-raised here; closing this generator stops the producer. Time the consumer
    spends waiting for an item is charged to `wait_stage` (what decoding still costs the
    critical path)."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except Exception as e:  # noqa: BLE001 - any decode failure is handed to the consumer, which raises it
            put(_Failure(e))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="stemseg-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            start = time.perf_counter()
            item = q.get()
            if timer is not None:
                timer.add(wait_stage, time.perf_counter() - start)
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
