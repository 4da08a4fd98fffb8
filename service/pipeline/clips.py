"""The reference clip plan: which frames make up each clip of a video."""

from __future__ import annotations

import threading


def clip_plan(num_frames: int, clip_len: int, overlap: int) -> list[list[int]]:
    """Frame indices of every clip, in order, exactly as the original inference plans them.

    A video shorter than a clip becomes one clip whose front is padded with copies of
    frame 0, so the network always sees ``clip_len`` frames. Otherwise clips start every
    ``clip_len - overlap`` frames and one last clip is anchored at the end of the video
    if the regular ones do not reach it (that clip overlaps its predecessor by more).
    """
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if not 0 <= overlap < clip_len:
        raise ValueError(f"overlap must be in [0, clip_len), got {overlap} for clip_len {clip_len}")
    if num_frames < clip_len:
        return [[0] * (clip_len - num_frames) + list(range(num_frames))]
    step = clip_len - overlap
    clips = [list(range(s, s + clip_len)) for s in range(0, num_frames - clip_len + 1, step)]
    if clips[-1][-1] != num_frames - 1:
        clips.append(list(range(num_frames - clip_len, num_frames)))
    return clips


def last_use(plan: list[list[int]]) -> dict[int, int]:
    """For every frame, the index of the last clip that contains it.

    The streaming pipeline drops a frame's dense state once that clip is done.
    """
    return {f: k for k, clip in enumerate(plan) for f in clip}


def context_range(plan: list[list[int]], start: int, stop: int) -> range:
    """Clips whose heads are needed to cluster clips [start, stop): every clip sharing a frame
    with them, since a frame's foreground is averaged over all of its clips."""
    frames = {f for clip in plan[start:stop] for f in clip}
    touching = [k for k, clip in enumerate(plan) if frames.intersection(clip)]
    return range(min(touching), max(touching) + 1)


class StreamPlan:
    """clip_plan for a video whose length is known only when it ends (a live stream).

    Regular clips are planned as their last frame arrives; `end()` plans what clip_plan adds for
    the final length (the clip anchored at the end, or the one padded clip of a short video), so
    an ended StreamPlan holds exactly clip_plan(n)'s clips. A frame's last clip is known once no
    clip still to come can contain it: when the stream has ended, or `clip_len` frames after it
    (the end-anchored clip reaches back at most that far). Written by one thread, read by another.
    """

    def __init__(self, clip_len: int, overlap: int) -> None:
        if not 0 <= overlap < clip_len:
            raise ValueError(f"overlap must be in [0, clip_len), got {overlap} for clip_len {clip_len}")
        self.clip_len, self.step = clip_len, clip_len - overlap
        self.clips: list[list[int]] = []
        self.frames = 0
        self.ended = False
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, plan: list[list[int]], clip_len: int | None = None, overlap: int | None = None) -> StreamPlan:
        """A finished plan (clip_plan's, or any list of clips) behind the same questions."""
        length = clip_len or len(plan[0])
        sp = cls(length, overlap if overlap is not None else 0)
        for clip in plan:
            sp._add(list(clip))
        sp.frames = max(f for clip in plan for f in clip) + 1
        sp.ended = True
        return sp

    def _add(self, clip: list[int]) -> int:
        k = len(self.clips)
        self.clips.append(clip)
        for f in clip:
            self._first.setdefault(f, k)
            self._last[f] = k
        return k

    def add_frame(self) -> list[int]:
        """One more frame has arrived; the indices of the clips this plans (zero or one)."""
        with self._lock:
            if self.ended:
                raise ValueError("the stream has ended")
            self.frames += 1
            start = self.frames - self.clip_len
            if start >= 0 and start % self.step == 0:
                return [self._add(list(range(start, self.frames)))]
            return []

    def end(self) -> list[int]:
        """The stream ends here: the indices of the clips clip_plan adds for this length."""
        with self._lock:
            if self.ended:
                return []
            self.ended = True
            n = self.frames
            if n == 0:
                return []
            if n < self.clip_len:
                return [self._add([0] * (self.clip_len - n) + list(range(n)))]
            if self.clips[-1][-1] != n - 1:
                return [self._add(list(range(n - self.clip_len, n)))]
            return []

    def last_use(self, frame: int) -> int | None:
        """The last clip containing `frame`, or None while a clip to come may still contain it."""
        with self._lock:
            if self.ended or self.frames > frame + self.clip_len:
                return self._last.get(frame)
            return None

    def first_clip(self, frame: int) -> int:
        """The first clip containing `frame` (planned already)."""
        return self._first[frame]

    def __getitem__(self, k: int) -> list[int]:
        return self.clips[k]

    def __len__(self) -> int:
        return len(self.clips)
