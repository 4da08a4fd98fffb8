"""An overlay MP4 a person can watch: masks, outlines, track ids and class names over the video."""

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

DEFAULT_FPS = 25


def _outline(m: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask: a one-pixel contour without OpenCV."""
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def write_overlay(result: VideoResult, frames: Iterable[np.ndarray], path: Path, fps: float | None) -> int:
    """Encode frames (BGR uint8, HxWx3, at the result's size) with the kept tracks drawn on; returns frames written."""
    kept = result.kept()
    # DAVIS colours, so the overlay matches the PNGs; index 0 is black background, hence cycling over 1..255.
    palette = np.array(davis_palette(), dtype=np.float32).reshape(256, 3)
    colours = [palette[k % 255 + 1] for k in range(len(kept))]
    names = [f"{t.id} {result.classes.get(t.category(), '')}".strip() for t in kept]
    # Exact rates (30000/1001) survive as fractions; the time base follows the rate so pts = frame index.
    rate = Fraction(fps).limit_denominator(1001) if fps and fps > 0 else Fraction(DEFAULT_FPS)
    h, w = result.height, result.width
    written = 0
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        # yuv420p subsamples chroma 2x2, so libx264 needs even sizes: pad by a pixel where needed.
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = 1 / rate
        stream.codec_context.time_base = 1 / rate
        canvas = np.zeros((stream.height, stream.width, 3), dtype=np.uint8)
        for f, bgr in enumerate(frames):
            if bgr.shape != (h, w, 3):
                raise ValueError(f"overlay frame {f} is {bgr.shape}, expected {(h, w, 3)}")
            rgb = bgr[:, :, ::-1].astype(np.float32)
            labels = []
            for k, track in enumerate(kept):
                if f not in track.masks:
                    continue
                m = mask_utils.decode(track.masks[f]).astype(bool)
                ys, xs = np.nonzero(m)
                if not len(xs):
                    continue
                rgb[m] = 0.5 * rgb[m] + 0.5 * colours[k]
                rgb[_outline(m)] = colours[k]
                labels.append((int(xs.min()), int(ys.min()), names[k], tuple(int(c) for c in colours[k])))
            img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            for x, y, text, colour in labels:
                # Above the mask when there is room, else inside it; white on the track's colour (the DAVIS
                # colours are mid-dark) stays legible on any video and ties the label to its mask.
                _, top, _, bottom = draw.textbbox((0, 0), text)
                pos = (x, y - (bottom - top) - 3 if y >= bottom - top + 3 else y + 1)
                box = draw.textbbox(pos, text)
                draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=colour)
                draw.text(pos, text, fill=(255, 255, 255))
            canvas[:h, :w] = np.asarray(img)
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            frame.pts = f
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                out.mux(packet)
            written += 1
        for packet in stream.encode(None):
            out.mux(packet)
    return written
