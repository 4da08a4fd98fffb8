"""Probing an upload: held to the limits, in a child process of its own.

A hostile upload keeps a probe busy for up to `STEMSEG_PROBE_BUDGET_S` of box walking and
FFmpeg parsing. Run on a thread of the API process, that work shares the GIL with the event
loop: every await of every other request then waits a switch interval to get it back, and on
two cores a 60-byte upload took 7 s to be refused while one probe ran. A decoder that crashes on
a crafted file would take the whole API with it. In a child process the API keeps its core, a
crash is one refused upload, and a probe that outlives its budget inside FFmpeg (where the
budget is not checked) is killed.

Children come from a forkserver that has imported this module once, so a probe starts in
milliseconds and never inherits the API's threads or sockets.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from service.jobs.storage import Storage
from service.video import VideoError, VideoInfo
from service.video.decode import OverLimit, Unindexed, check_indexable
from service.video.normalise import normalise

T = TypeVar("T")

# Past its own budget a probe gets this long to notice and answer before it is killed.
_GRACE_S = 5.0

_context_lock = threading.Lock()
_context: multiprocessing.context.BaseContext | None = None


class ChildDied(Exception):
    """The child ended without an answer (a signal, or os._exit): `exitcode` as multiprocessing has it."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(f"the probe process ended with {exitcode}")
        self.exitcode = exitcode

    def __reduce__(self):
        return type(self), (self.exitcode,)


class ChildTimedOut(Exception):
    """The child was still running at its deadline and was killed."""


def _forkserver() -> multiprocessing.context.BaseContext:
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            _context = ctx
        return _context


def _child(conn, fn: Callable[..., T], args: tuple) -> None:
    # The API's SIGINT/SIGTERM are for the API: a probe is ended by its parent alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        answer = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 - every failure is the parent's to raise
        answer = (False, e)
    try:
        conn.send(answer)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        conn.send((False, RuntimeError(f"{type(answer[1]).__name__} (not transferable: {e})")))
    finally:
        conn.close()


def run_in_child(fn: Callable[..., T], *args, deadline_s: float) -> T:
    """fn(*args) in a fresh child process: its value, or its exception raised here. Killed at
    `deadline_s` (ChildTimedOut); a child that dies without answering raises ChildDied. Blocks
    the calling thread (the GIL is free meanwhile); `fn` and its arguments must pickle."""
    ctx = _forkserver()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args), daemon=True)
    proc.start()
    child.close()  # the child holds its end: EOF here once it is gone
    try:
        if not parent.poll(max(deadline_s, 0.0)):
            raise ChildTimedOut()
        try:
            ok, value = parent.recv()
        except EOFError:
            proc.join(1)
            raise ChildDied(proc.exitcode) from None
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
        proc.close()
    if ok:
        return value
    raise value


def _nothing() -> None:
    return None


def warm_up() -> None:
    """Start the forkserver and one child now (a second or two, once per process)."""
    run_in_child(_nothing, deadline_s=60)


def readable_upload(storage: Storage, staging: str, max_pixels: int, max_frames: int, budget_s: float,
                    max_samples: int, max_bytes: int) -> VideoInfo:
    """Probe an upload (in `storage` under `staging`) within the limits; one whose frames cannot
    be placed without decoding from the start is remuxed once into a seekable file
    (service.video.normalise), so a task's decode cost does not depend on where its clips are.
    With an object store the upload is read into a local file first (one GET of the video)."""
    with storage.local(staging, "video") as video:
        return _readable(storage, staging, video, max_pixels, max_frames, budget_s, max_samples, max_bytes)


def _readable(storage: Storage, staging: str, video: Path, max_pixels: int, max_frames: int, budget_s: float,
              max_samples: int, max_bytes: int) -> VideoInfo:
    started = time.monotonic()

    def check(budget: float) -> VideoInfo:
        return check_indexable(video, max_pixels=max_pixels, max_frames=max_frames, budget_s=budget,
                               max_samples=max_samples)

    def left() -> float:
        return max(budget_s - (time.monotonic() - started), 0.001)

    try:
        return check(budget_s)
    except Unindexed:
        pass
    with storage.writer(staging, "video", seekable=True) as out:  # the muxer seeks back to its header
        normalise(video, out, max_pixels=max_pixels, max_frames=max_frames, budget_s=left(), max_bytes=max_bytes)
    try:
        if not storage.shared_paths:  # the local copy is the upload as it was: check what was stored
            with storage.local(staging, "video") as again:
                return check_indexable(again, max_pixels=max_pixels, max_frames=max_frames, budget_s=left(),
                                       max_samples=max_samples)
        return check(left())
    except Unindexed:
        raise VideoError(video, "the video cannot be made seekable (its frames cannot be placed "
                                "by timestamp even after remuxing)") from None


def probe_upload(storage: Storage, staging: str, *, max_pixels: int, max_frames: int, budget_s: float,
                 max_samples: int, max_bytes: int, isolated: bool = True) -> VideoInfo:
    """`readable_upload`, in a child process unless `isolated` is False. The child's end is
    answered as the client's file: killed at the budget it is over STEMSEG_PROBE_BUDGET_S, dead
    without an answer it crashed the decoder."""
    args = (storage, staging, max_pixels, max_frames, budget_s, max_samples, max_bytes)
    if not isolated:
        return readable_upload(*args)
    # What the errors below name (clients see only "the upload"; the log the file when there is one).
    video = storage.path(staging, "video") if storage.shared_paths else Path(f"{staging}/video")
    try:
        return run_in_child(readable_upload, *args, deadline_s=budget_s + _GRACE_S)
    except ChildTimedOut:
        raise OverLimit(video, f"probing took longer than {budget_s:g} s", "time", budget_s) from None
    except ChildDied as e:
        why = f"signal {-e.exitcode}" if e.exitcode and e.exitcode < 0 else f"exit status {e.exitcode}"
        raise VideoError(video, f"reading the video stopped the decoder ({why}); the file is damaged") from None


__all__ = ["ChildDied", "ChildTimedOut", "probe_upload", "readable_upload", "run_in_child", "warm_up"]
