"""Making an upload seekable once, at admission, without re-encoding it.

A raw Annex-B H.264/HEVC stream (what a camera or `ffmpeg -f h264` writes) has no timestamps
and no index, and an AVI with B-frames has made-up ones: a worker cannot seek to frame i of
such a file and would decode from frame 0 for every task, so a late task costs as much as the
whole video before it. ``normalise`` rewrites such a file once, packet for packet (no decoding
into pixels survives, no re-encoding), into Matroska with presentation timestamps, so
``read_frames`` can seek in it like in any MP4.

Two passes over the packets. The first feeds the decoder packets numbered 0, 1, 2, ... in
decode order as their pts; the decoder hands frames back in presentation order carrying those
numbers, which gives each packet its display position (and counts the frames, bounded like a
probe: ``max_frames``, a deadline). The second muxes the same packets with pts = display
position + the stream's reorder delay and dts = decode position, at a constant frame rate
(the stream's, else 25 fps). Packets the decoder drops (before the first keyframe) are left
out: they were never frames. The output counts against the upload size limit.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from service.video.decode import (
    DEFAULT_MAX_PIXELS,
    OverLimit,
    Unindexed,
    VideoError,
    _Bounds,
    _check_size,
    _open,
    _reason,
    _video_stream,
)

_CHECK_EVERY = 256
_DEFAULT_RATE = Fraction(25)


def _display_positions(path: str | Path, max_pixels: int, bounds: _Bounds) -> tuple[np.ndarray, int]:
    """Per packet (decode order, empty packets skipped) its frame's display position, -1 for a
    packet the decoder dropped; and the number of frames."""
    order: list[int] = []
    packets = 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        try:
            for packet in container.demux(stream):
                if packet.size:
                    packet.pts = packet.dts = packets
                    packets += 1
                for frame in packet.decode():  # the size-0 packets at the end drain the decoder
                    if frame.pts is None:
                        raise Unindexed(path, "the decoder gives frames without timestamps")
                    if not order:
                        _check_size(path, frame.width, frame.height, max_pixels)
                    order.append(frame.pts)
                if packets % _CHECK_EVERY == 0:
                    bounds.check_time(path)
                    bounds.over_frames(path, len(order))
        except av.FFmpegError as e:
            raise VideoError(path, f"the video cannot be decoded past frame {len(order)} "
                                   f"(damaged or truncated: {_reason(e)})") from None
    bounds.over_frames(path, len(order))
    if not order:
        raise VideoError(path, "the video stream has no decodable frames")
    pos = np.full(packets, -1, dtype=np.int64)
    taken = np.asarray(order, dtype=np.int64)
    if taken.min() < 0 or taken.max() >= packets or np.unique(taken).size != taken.size:
        # A packet giving two frames (field pairs) or none we can name: no one-to-one map to remux by.
        raise Unindexed(path, "the video's packets and frames do not match one to one")
    pos[taken] = np.arange(taken.size)
    return pos, int(taken.size)


def normalise(path: str | Path, out: BinaryIO, *, max_pixels: int = DEFAULT_MAX_PIXELS,
              max_frames: int | None = None, budget_s: float | None = None, max_bytes: int | None = None) -> int:
    """Remux the video stream of `path` into Matroska on `out` with timestamps that place every
    frame (see the module docstring); returns the number of frames. Raises OverLimit past
    `max_frames`, `budget_s` or `max_bytes` (of output), Unindexed or VideoError if the file
    cannot be remuxed so."""
    bounds = _Bounds.of(max_frames, budget_s, None)
    pos, frames = _display_positions(path, max_pixels, bounds)
    delay = int(max(0, (np.arange(pos.size) - pos)[pos >= 0].max()))
    with _open(path) as container:
        source = _video_stream(container, path)
        rate = source.average_rate or source.guessed_rate or _DEFAULT_RATE
        tb = Fraction(1, 1) / Fraction(rate)
        try:
            with av.open(out, "w", format="matroska") as dst:
                target = dst.add_stream_from_template(source)
                target.time_base = tb
                target.codec_context.framerate = Fraction(rate)
                k = 0
                for packet in container.demux(source):
                    if not packet.size:
                        continue
                    at, k = int(pos[k]), k + 1
                    if at < 0:
                        continue
                    packet.pts, packet.dts, packet.duration = at + delay, k - 1, 1
                    packet.time_base = tb
                    packet.stream = target
                    dst.mux(packet)
                    if k % _CHECK_EVERY == 0:
                        bounds.check_time(path)
                        if max_bytes is not None and out.tell() > max_bytes:
                            raise OverLimit(path, f"the remuxed video is larger than {max_bytes} bytes",
                                            "bytes", max_bytes)
        except av.FFmpegError as e:
            raise Unindexed(path, f"the video stream cannot be remuxed ({_reason(e)})") from None
    if max_bytes is not None and out.tell() > max_bytes:
        raise OverLimit(path, f"the remuxed video is larger than {max_bytes} bytes", "bytes", max_bytes)
    return frames
