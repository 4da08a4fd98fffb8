"""Streaming video decoding with PyAV.

Frames come out in presentation order, one per decoded picture (no resampling to a constant
rate, so variable-frame-rate videos keep every frame exactly once), as 8-bit BGR with the
container's rotation applied. Nothing holds more than the frames a clip window needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import av
import numpy as np

DEFAULT_MAX_PIXELS = 4096 * 2160


class VideoError(Exception):
    """A file that cannot be used as a video, with a one-line message meant for the user."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int  # display size, after rotation
    height: int
    num_frames: int
    fps: float | None
    rotation: int  # degrees counterclockwise, applied to every frame
    codec: str
    pix_fmt: str | None
    duration_s: float | None


@dataclass
class Frame:
    index: int
    pts_seconds: float | None
    image: np.ndarray  # [H, W, 3] uint8 BGR


def _open(path: str | Path) -> av.container.InputContainer:
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if not p.is_file():
        raise VideoError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise VideoError(f"{p}: the file is empty")
    try:
        return av.open(str(p), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"{p}: not a readable video ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    return str(getattr(e, "strerror", None) or e).splitlines()[0]


def _stream(container: av.container.InputContainer, path: str | Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        raise VideoError(f"{path}: no video stream (the file has {', '.join(kinds)} streams)")
    return container.streams.video[0]


def _rotation(frame: av.VideoFrame) -> int:
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


def _to_bgr(frame: av.VideoFrame) -> np.ndarray:
    image = frame.to_ndarray(format="bgr24")
    rot = _rotation(frame)
    if rot:
        # The display matrix gives the counterclockwise turn needed for display.
        image = np.ascontiguousarray(np.rot90(image, k=rot // 90))
    return image


@lru_cache(maxsize=64)
def _presentation_pts(path: str, mtime_ns: int, size: int) -> tuple[tuple[int, ...], bool]:
    """Every video packet's pts in presentation order, from a demux pass (no decoding);
    the flag says whether all packets had one."""
    with _open(path) as container:
        stream = _stream(container, path)
        pts, complete = [], True
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream flush packet
                if packet.pts is None:
                    complete = False
                else:
                    pts.append(packet.pts)
        except av.FFmpegError as e:
            raise VideoError(f"{path}: the file is damaged ({_reason(e)})") from None
    return tuple(sorted(pts)), complete


def _pts_table(path: str | Path) -> tuple[tuple[int, ...], bool]:
    st = os.stat(path)
    return _presentation_pts(str(path), st.st_mtime_ns, st.st_size)


def probe(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Validate a video and count its frames (one per packet: checked against decoding in the
    tests for H.264 with B-frames, VP9, MPEG-4 part 2). The first frame is decoded too, so a
    file whose pictures cannot be decoded is refused here rather than halfway through a job."""
    with _open(path) as container:
        stream = _stream(container, path)
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise VideoError(f"{path}: the video stream cannot be decoded ({_reason(e)})") from None
        if first is None:
            raise VideoError(f"{path}: the video stream has no frames")
        rotation = _rotation(first)
        w, h = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        if w * h > max_pixels:
            raise VideoError(f"{path}: frames of {w}x{h} exceed the limit of {max_pixels} pixels")
        fps = float(stream.average_rate) if stream.average_rate else None
        duration = float(container.duration / av.time_base) if container.duration else None
        codec, pix_fmt = stream.codec_context.name, stream.codec_context.pix_fmt
    pts, _ = _pts_table(path)
    num = len(pts)
    if num == 0:
        raise VideoError(f"{path}: the video stream has no frames")
    return VideoInfo(str(path), w, h, num, fps, rotation, codec, pix_fmt, duration)


def iter_frames(path: str | Path, *, threads: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                expected: int | None = None) -> Iterator[Frame]:
    """Every frame in presentation order. With `expected`, a video that ends early (a damaged
    or truncated file) raises VideoError instead of passing for a shorter one."""
    n = 0
    with _open(path) as container:
        stream = _stream(container, path)
        if threads:
            stream.thread_type = "AUTO"
        tb = stream.time_base
        try:
            for frame in container.decode(stream):
                if n == 0 and frame.width * frame.height > max_pixels:
                    raise VideoError(f"{path}: frames of {frame.width}x{frame.height} exceed the limit "
                                     f"of {max_pixels} pixels")
                pts = float(frame.pts * tb) if frame.pts is not None and tb is not None else None
                yield Frame(n, pts, _to_bgr(frame))
                n += 1
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed at frame {n} ({_reason(e)})") from None
    if expected is not None and n < expected:
        raise VideoError(f"{path}: the video ends at frame {n} of {expected} (damaged or truncated)")


def iter_clip_windows(path: str | Path, plan: Sequence[Sequence[int]], *, threads: bool = True,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[int, list[Frame]]]:
    """(clip index, its frames in plan order), decoding once and keeping only the frames that
    the current or a later clip still needs."""
    last = {f: k for k, clip in enumerate(plan) for f in clip}
    expected = max(last) + 1
    held: dict[int, Frame] = {}
    frames = iter_frames(path, threads=threads, max_pixels=max_pixels, expected=expected)
    for k, clip in enumerate(plan):
        while max(clip) not in held:
            frame = next(frames, None)
            if frame is None:
                raise VideoError(f"{path}: the video ends before frame {max(clip)}")
            held[frame.index] = frame
        yield k, [held[f] for f in clip]
        for f in [f for f in held if last.get(f, -1) <= k]:
            del held[f]
    frames.close()


def read_frames(path: str | Path, indices: Sequence[int], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Frame]:
    """The frames at these indices (as numbered by iter_frames), by seeking to the keyframe
    before the first one and decoding forward: what a worker needs for its clips."""
    wanted = sorted(set(indices))
    if not wanted:
        return []
    pts_list, complete = _pts_table(path)
    if not complete or wanted[-1] >= len(pts_list):
        # Without a pts for every frame the index of a decoded frame is only known by counting.
        if wanted[-1] >= len(pts_list):
            raise VideoError(f"{path}: frame {wanted[-1]} asked for, the video has {len(pts_list)}")
        keep = set(wanted)
        return [f for f in iter_frames(path, max_pixels=max_pixels) if f.index in keep]
    index_of = {p: i for i, p in enumerate(pts_list)}
    out: dict[int, Frame] = {}
    with _open(path) as container:
        stream = _stream(container, path)
        stream.thread_type = "AUTO"
        container.seek(pts_list[wanted[0]], stream=stream, backward=True, any_frame=False)
        tb = stream.time_base
        try:
            for frame in container.decode(stream):
                i = index_of.get(frame.pts)
                if i is None or i < wanted[0]:
                    continue
                if i in wanted and i not in out:
                    out[i] = Frame(i, float(frame.pts * tb), _to_bgr(frame))
                if i >= wanted[-1]:
                    break
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed ({_reason(e)})") from None
    missing = [i for i in wanted if i not in out]
    if missing:
        raise VideoError(f"{path}: could not decode frames {missing[:5]} (damaged file)")
    return [out[i] for i in wanted]
