"""The child process that probes uploads: its answers, its exceptions, its crashes and its deadline."""

from __future__ import annotations

import os
import signal
import time

import pytest

from service.jobs.probing import ChildDied, ChildTimedOut, run_in_child
from service.video.decode import OverLimit


def _add(a: int, b: int) -> int:
    return a + b


def _over(path: str) -> None:
    raise OverLimit(path, "too many", "frames", 7)


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _hang() -> None:
    time.sleep(60)


def _pid() -> int:
    return os.getpid()


def test_value_and_exception_cross_back() -> None:
    assert run_in_child(_add, 2, 3, deadline_s=30) == 5
    with pytest.raises(OverLimit) as e:
        run_in_child(_over, "/x/video", deadline_s=30)
    assert (e.value.kind, e.value.limit, e.value.about("the upload")) == ("frames", 7, "the upload: too many")
    assert run_in_child(_pid, deadline_s=30) != os.getpid()


def test_a_crash_is_an_answer_not_the_end_of_the_caller() -> None:
    with pytest.raises(ChildDied) as e:
        run_in_child(_crash, deadline_s=30)
    assert e.value.exitcode == -signal.SIGSEGV
    assert run_in_child(_add, 1, 1, deadline_s=30) == 2  # the next probe runs as usual


def test_past_its_deadline_a_child_is_killed() -> None:
    t0 = time.monotonic()
    with pytest.raises(ChildTimedOut):
        run_in_child(_hang, deadline_s=1)
    assert time.monotonic() - t0 < 10
