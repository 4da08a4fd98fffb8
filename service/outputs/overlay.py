"""An overlay MP4 a person can watch: masks, outlines, and a label per track (id, class, score).

Labels are laid out per frame so that none covers another: each goes above its mask, else below
it, else inside it, sliding along its column, and as a last resort anywhere free, with a line back
to its mask. Text scales with the frame (a 128-pixel frame and a 1080p one both stay legible).
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from itertools import chain
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from service.outputs.davis import davis_palette
from service.pipeline.tracks import VideoResult

DEFAULT_FPS = 25
Box = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive-exclusive


def _outline(m: np.ndarray, width: int = 1) -> np.ndarray:
    """Mask pixels within `width` 4-neighbour steps of the outside: a contour without OpenCV."""
    inner = m.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return m & ~inner


def _font_size(height: int, width: int) -> int:
    # About 36 text rows on the short side, never below 9 px (the smallest size that stays readable).
    return max(9, round(min(height, width) / 36))


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(sizes: list[tuple[int, int]], anchors: list[Box], height: int, width: int) -> list[Box | None]:
    """Boxes for labels of the given (w, h) near their anchor boxes (mask extents), in the given
    order (most important first), none overlapping another and all inside the frame; None for a
    label that fits nowhere."""
    placed: list[Box] = []
    out: list[Box | None] = []
    for (lw, lh), (x0, y0, x1, y1) in zip(sizes, anchors):
        if lw > width or lh > height:
            out.append(None)
            continue
        x = min(max(x0, 0), width - lw)
        if width < 3 * lw:
            # Room for two label columns at most: keep to an edge, or a label in the middle blocks both.
            x = 0 if x <= (width - lw) / 2 else width - lw
        preferred = [y0 - lh, y1, y0]  # above the mask, below it, inside its top
        # Then every row of the label's column nearest the mask first, then columns tiling the frame,
        # then any column.
        rows = sorted(range(height - lh + 1), key=lambda y: abs(y - (y0 - lh)))
        tiles = [*range(0, width - lw + 1, lw), width - lw]
        columns = tiles + sorted(range(0, width - lw + 1, max(1, lh // 2)), key=lambda c: abs(c - x))
        candidates = chain(((x, y) for y in preferred), ((x, y) for y in rows),
                           ((c, y) for c in columns for y in rows))
        found = None
        for cx, cy in candidates:
            if not 0 <= cy <= height - lh:
                continue
            box = (cx, cy, cx + lw, cy + lh)
            if not any(_overlaps(box, p) for p in placed):
                found = box
                break
        if found is not None:
            placed.append(found)
        out.append(found)
    return out


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_frame(rgb: np.ndarray, masks: list[np.ndarray], texts: list[str], colours: list[np.ndarray]) -> np.ndarray:
    """One overlay frame (RGB uint8): masks tinted and outlined, then their labels; masks and texts
    in label priority order."""
    h, w = rgb.shape[:2]
    canvas = rgb.astype(np.float32)
    thick = max(1, round(min(h, w) / 300))
    anchors = []
    for m, colour in zip(masks, colours):
        ys, xs = np.nonzero(m)
        if not len(xs):
            continue
        canvas[m] = 0.5 * canvas[m] + 0.5 * colour
        canvas[_outline(m, thick)] = colour
        anchors.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=_font_size(h, w))
    pad = max(1, _font_size(h, w) // 6)
    kept = [k for k, m in enumerate(masks) if m.any()]
    sizes = []
    for k in kept:
        left, top, right, bottom = draw.textbbox((0, 0), texts[k], font=font)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
    boxes = place_labels(sizes, anchors, h, w)
    for k, anchor, box in zip(kept, anchors, boxes):
        if box is not None and not _overlaps(box, (anchor[0], anchor[1] - 1, anchor[2], anchor[3] + 1)):
            # Displaced from its mask: a leader line (under every label) says whose label it is.
            draw.line([((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), (anchor[0], anchor[1])],
                      fill=tuple(int(c) for c in colours[k]), width=thick)
    for k, box in zip(kept, boxes):
        if box is None:
            continue
        fill = tuple(int(c) for c in colours[k])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
        left, top, _, _ = draw.textbbox((0, 0), texts[k], font=font)
        draw.text((box[0] + pad - left, box[1] + pad - top), texts[k], fill=_text_colour(fill), font=font)
    return np.asarray(img)


def write_overlay(result: VideoResult, frames: Iterable[np.ndarray], path: Path, fps: float | None,
                  min_score: float = 0.0) -> int:
    """Encode frames (BGR uint8, HxWx3, at the result's size) with the kept tracks scoring at least
    min_score drawn on; returns frames written."""
    kept = result.kept()
    scores = result.scores(kept)
    # DAVIS colours, so the overlay matches the PNGs; index 0 is black background, hence cycling over 1..255.
    palette = np.array(davis_palette(), dtype=np.float32).reshape(256, 3)
    drawn = sorted((k for k in range(len(kept)) if scores[k] >= min_score), key=lambda k: -scores[k])
    colours = [palette[k % 255 + 1] for k in drawn]
    texts = [f"{kept[k].id} {result.classes.get(kept[k].category(), '')} {scores[k]:.2f}".replace("  ", " ")
             for k in drawn]
    # Exact rates (30000/1001) survive as fractions; the time base follows the rate so pts = frame index.
    rate = Fraction(fps).limit_denominator(1001) if fps and fps > 0 else Fraction(DEFAULT_FPS)
    h, w = result.height, result.width
    written = 0
    empty = np.zeros((h, w), bool)
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
            masks = [mask_utils.decode(kept[k].masks[f]).astype(bool) if f in kept[k].masks else empty
                     for k in drawn]
            canvas[:h, :w] = draw_frame(bgr[:, :, ::-1], masks, texts, colours)
            # Converted here, not by encode(): its implicit conversion made the same frames encode to
            # different bytes from run to run. Not the whole story: libx264 still reads uninitialised
            # heap memory (MALLOC_PERTURB_ makes its output repeatable), so a process that wrote
            # other outputs first may still encode slightly different bytes.
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24").reformat(format="yuv420p")
            frame.pts = f
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                out.mux(packet)
            written += 1
        for packet in stream.encode(None):
            out.mux(packet)
    return written
