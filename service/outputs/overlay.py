"""An overlay MP4 a person can watch: masks, track ids and class names over the video."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from service.outputs.davis import davis_palette
from service.pipeline.tracks import VideoResult


def write_overlay(result: VideoResult, frames: Iterable[np.ndarray], path: Path, fps: float | None) -> int:
    kept = result.kept()
    palette = np.array(davis_palette(), dtype=np.float32).reshape(256, 3)
    names = {t.id: f"{t.id} {result.classes.get(t.category(), '')}".strip() for t in kept}
    rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(25)
    written = 0
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        # H.264 in yuv420p needs even sizes: pad by a pixel where needed.
        stream.width, stream.height = result.width + result.width % 2, result.height + result.height % 2
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        for f, bgr in enumerate(frames):
            rgb = bgr[:, :, ::-1].astype(np.float32)
            labels = []
            for k, track in enumerate(kept, start=1):
                if f in track.masks:
                    m = mask_utils.decode(track.masks[f]).astype(bool)
                    rgb[m] = 0.5 * rgb[m] + 0.5 * palette[k]
                    ys, xs = np.nonzero(m)
                    if len(xs):
                        labels.append((int(xs.min()), int(ys.min()), names[track.id], tuple(int(c) for c in palette[k])))
            img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            for x, y, text, colour in labels:
                draw.text((x + 1, max(y - 10, 0)), text, fill=colour)
            canvas = np.zeros((stream.height, stream.width, 3), dtype=np.uint8)
            canvas[: result.height, : result.width] = np.asarray(img)
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            frame.pts = f
            for packet in stream.encode(frame):
                out.mux(packet)
            written += 1
        for packet in stream.encode(None):
            out.mux(packet)
    return written
