"""Real encoded videos for tests, written with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from frames import moving_frames

_CONTAINER = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".mov": "mov", ".avi": "avi"}


def make_video(path: Path, num_frames: int, width: int, height: int, codec: str = "libx264",
               pix_fmt: str = "yuv420p", fps: int = 25, rotate: int | None = None,
               vfr: bool = False, options: dict | None = None) -> np.ndarray:
    """Encode moving coloured shapes; returns the BGR frames that went in, [N, H, W, 3]."""
    frames = moving_frames(num_frames, height, width)
    with av.open(str(path), mode="w", format=_CONTAINER.get(Path(path).suffix)) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        time_base = Fraction(1, fps * 10)  # finer than a frame, so VFR gaps are exact
        stream.codec_context.time_base = time_base
        if codec == "libx264":
            stream.options = {"bf": "2", "g": "12", "crf": "18", **(options or {})}
        elif options:
            stream.options = options
        if rotate:
            stream.set_display_rotation(rotate)
        pts = 0
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format=pix_fmt)
            frame.pts = pts
            frame.time_base = time_base
            # Irregular gaps for variable frame rate: one or two nominal steps.
            pts += 10 * (1 + (pts // 10) % 3) if vfr else 10
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return np.stack(frames)


def make_audio_only(path: Path, seconds: float = 0.5) -> None:
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = (np.sin(np.linspace(0, 440 * seconds * 2 * np.pi, int(16000 * seconds))) * 0.3).astype(np.float32)
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, len(samples), frame_size):
            chunk = samples[start:start + frame_size]
            if len(chunk) < frame_size:
                chunk = np.pad(chunk, (0, frame_size - len(chunk)))
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
