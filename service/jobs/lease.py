"""A per-job Redis lock held by renewal, with a fencing token.

The holder renews it on a thread every third of its TTL, so holding it takes no guess of how
long the work lasts (a long video's stitch or finish), and a holder that dies or stalls loses it
within one TTL. The token is the fence: a step that must happen once (the job's success) is
made by a script that checks the token in the same step (`Jobs.finish(fence=...)`), so a holder
that stalled past its TTL and woke up cannot finish a job someone else now holds.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Self

import redis

from service.jobs.redis_clients import REDIS_ERRORS

log = logging.getLogger("stemseg.lease")

_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class Lease:
    def __init__(self, r: redis.Redis, key: str, ttl_s: float) -> None:
        self.r, self.key = r, key
        self.token = uuid.uuid4().hex
        self.ttl_ms = max(int(ttl_s * 1000), 100)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it, and start renewing it."""
        if not self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.key}")
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.r.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    self._lost.set()
                    return
            except REDIS_ERRORS:
                log.warning("could not renew %s", self.key)  # it lapses unless the next renewal gets through

    @property
    def held(self) -> bool:
        """Still ours, checked in Redis (not only the renewals' view)."""
        if self._lost.is_set():
            return False
        return self.r.get(self.key) == self.token.encode()

    @property
    def fence(self) -> tuple[str, str]:
        return self.key, self.token

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.r.eval(_RELEASE, 1, self.key, self.token)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
