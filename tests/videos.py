"""Real encoded videos for tests, written with PyAV."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.stream import Disposition
from frames import moving_frames

_FORMATS = {".mp4": "mp4", ".m4a": "mp4", ".mkv": "matroska", ".webm": "webm", ".mov": "mov", ".avi": "avi",
            ".wav": "wav", ".mp3": "mp3"}

# Quality high enough that decoded frames stay close to what went in; small GOPs with B-frames
# so seeking and reordering are exercised even in short videos.
_OPTIONS = {
    "libx264": {"bf": "2", "g": "12", "crf": "18"},
    "libx265": {"x265-params": "log-level=error:bframes=2:keyint=12:min-keyint=12", "crf": "18"},
    "mpeg4": {"bf": "2", "g": "12", "qmin": "2", "qmax": "4"},
    "libvpx-vp9": {"crf": "20", "b": "0", "g": "12", "deadline": "good", "cpu-used": "8"},
    "libvpx": {"crf": "8", "b": "1M", "g": "12", "cpu-used": "8"},
}


def squares_frames(n: int, height: int, width: int) -> list[np.ndarray]:
    """Coloured squares moving over a smooth gradient: easy on lossy codecs, and every frame
    differs clearly from its neighbours so a dropped or duplicated frame shows."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([40 + 160 * x / max(width - 1, 1), 40 + 160 * y / max(height - 1, 1),
                           np.full(x.shape, 110.0)], axis=-1).astype(np.uint8)
    side = max(min(width, height) // 4, 4)
    frames = []
    for i in range(n):
        img = background.copy()
        x0 = (9 * i) % max(width - side, 1)
        y0 = (7 * i) % max(height - side, 1)
        img[height // 8: height // 8 + side, x0: x0 + side] = (30, 220, 60)
        img[y0: y0 + side, width - side - width // 8: width - width // 8] = (230, 40, 200)
        frames.append(img)
    return frames


def make_video(path: Path, num_frames: int, width: int, height: int, codec: str = "libx264",
               container: str | None = None, pix_fmt: str = "yuv420p", fps: int = 25,
               rotate: int | None = None, vfr: bool = False, content: str = "moving",
               options: dict | None = None) -> np.ndarray:
    """Encode a video; returns the BGR frames that went in, [N, H, W, 3].

    content: "moving" (squares over a gradient) or "noise" (shapes over per-pixel noise, hard
    on the codec). rotate: display rotation in degrees counterclockwise. vfr: irregular gaps of
    one or two frame intervals between frames. The container format follows the suffix unless
    given."""
    make = {"moving": squares_frames, "noise": moving_frames}[content]
    frames = make(num_frames, height, width)
    with av.open(str(path), mode="w", format=container or _FORMATS.get(Path(path).suffix)) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        # Finer than a frame so VFR gaps are exact; AVI counts time in frames, so it gets 1/fps.
        time_base = Fraction(1, fps) if out.format.name == "avi" and not vfr else Fraction(1, fps * 10)
        stream.codec_context.time_base = time_base
        stream.options = {**_OPTIONS.get(codec, {}), **(options or {})}
        if rotate:
            stream.set_display_rotation(rotate)
        pts = 0
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format=pix_fmt)
            frame.pts = pts
            frame.time_base = time_base
            pts += (1 + i % 3 % 2) * round(1 / (time_base * fps)) if vfr else round(1 / (time_base * fps))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return np.stack(frames)


def make_audio_only(path: Path, seconds: float = 0.5, codec: str | None = None, cover: bool = False) -> None:
    """An audio-only file: AAC in .m4a/.mp4, PCM in .wav, MP3 in .mp3 unless `codec` is given.
    `cover` adds cover art (.mp3): a one-picture video stream marked as an attached picture."""
    suffix = Path(path).suffix
    codec = codec or {".wav": "pcm_s16le", ".mp3": "libmp3lame"}.get(suffix, "aac")
    rate = 16000
    with av.open(str(path), mode="w", format=_FORMATS.get(suffix, "mp4")) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        if cover:
            art = out.add_stream("mjpeg", rate=1)
            art.width, art.height, art.pix_fmt = 32, 32, "yuvj420p"
            art.disposition = Disposition.attached_pic
            picture = av.VideoFrame.from_ndarray(squares_frames(1, 32, 32)[0], format="bgr24")
            picture = picture.reformat(format="yuvj420p")
            picture.pts = 0
            for packet in [*art.encode(picture), *art.encode(None)]:
                out.mux(packet)
        fmt = stream.codec_context.format.name
        samples = np.sin(np.linspace(0, 440 * seconds * 2 * np.pi, int(rate * seconds))) * 0.3
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, len(samples), frame_size):
            chunk = np.pad(samples[start:start + frame_size], (0, max(0, start + frame_size - len(samples))))
            dtype = {"s16": np.int16, "s32": np.int32}.get(fmt.rstrip("p"), np.float32)
            data = (chunk * (np.iinfo(dtype).max if dtype != np.float32 else 1)).astype(dtype)
            frame = av.AudioFrame.from_ndarray(data[None, :], format=fmt, layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def remux(src: Path, dst: Path, *, skip: int = 0, shift: int = 0, container: str | None = None,
          options: dict | None = None) -> None:
    """Copy the video packets of `src` into `dst` without re-encoding: `skip` drops the first
    packets (a file cut mid-GOP), `shift` moves every timestamp (negative pts make the MP4
    muxer write an edit list), `options` go to the muxer (e.g. movflags=faststart)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=container or _FORMATS.get(Path(dst).suffix),
                                           options=options or {}) as out:
        source = inp.streams.video[0]
        target = out.add_stream_from_template(source)
        for k, packet in enumerate(p for p in inp.demux(source) if p.dts is not None):
            if k < skip:
                continue
            packet.pts += shift
            packet.dts += shift
            packet.stream = target
            out.mux(packet)



def make_long_video(path: Path, num_frames: int, width: int = 16, height: int = 16, gop: int = 250,
                    container: str | None = None, fps: int = 25) -> None:
    """A video of `num_frames` frames made fast: one GOP of a still picture (a keyframe, then
    P-frames of a few bytes) encoded once and its packets repeated with new timestamps, so every
    frame decodes. A 5,000,000-frame MP4 is about 65 MB. A `.h264` suffix writes a raw Annex-B
    stream (no timestamps, no index: what a camera or `ffmpeg -f h264` gives)."""
    suffix = Path(path).suffix
    fmt = container or ("h264" if suffix in (".h264", ".264") else _FORMATS.get(suffix))
    raw = io.BytesIO()
    still = av.VideoFrame.from_ndarray(squares_frames(1, height, width)[0], format="bgr24").reformat(format="yuv420p")
    with av.open(raw, "w", format="h264") as enc:
        stream = enc.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"bf": "0", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0",
                          "x264-params": "repeat-headers=1"}
        for i in range(gop):
            still.pts = i
            for packet in stream.encode(still):
                enc.mux(packet)
        for packet in stream.encode(None):
            enc.mux(packet)
    raw.seek(0)
    with av.open(raw, format="h264") as src, av.open(str(path), "w", format=fmt) as out:
        source = src.streams.video[0]
        packets = [(bytes(p), p.is_keyframe) for p in src.demux(source) if p.size]
        target = out.add_stream_from_template(source)
        target.time_base = Fraction(1, fps)
        for i in range(num_frames):
            data, key = packets[i % len(packets)]
            packet = av.Packet(data)
            packet.pts = packet.dts = i
            packet.time_base = Fraction(1, fps)
            packet.is_keyframe = key
            packet.stream = target
            out.mux(packet)
