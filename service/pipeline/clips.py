"""The reference clip plan: which frames make up each clip of a video."""

from __future__ import annotations


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
