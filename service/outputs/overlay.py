"""An overlay MP4 a person can watch: masks, outlines, and a label per track (id, class, score).

Labels are laid out per frame so that none covers another: each goes above its mask, else below
it, else inside it, sliding along its column, and as a last resort anywhere free, with a line back
to its mask. Text scales with the frame (a 128-pixel frame and a 1080p one both stay legible).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from fractions import Fraction
from itertools import chain
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from service.outputs.davis import davis_palette
from service.outputs.labels import Labels
from service.pipeline.tracks import VideoResult

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


def _box(m: np.ndarray) -> Box | None:
    rows = np.flatnonzero(m.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def draw_frame(rgb: np.ndarray, masks: list[np.ndarray], texts: list[str], colours: list[np.ndarray]) -> np.ndarray:
    """One overlay frame (RGB uint8): masks tinted and outlined, then their labels; masks and texts
    in label priority order."""
    h, w = rgb.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    boxes = [_box(m) for m in masks]
    anchors = [b for b in boxes if b is not None]
    out = rgb.copy()
    if anchors:
        # Tinting works in float32 over the masks' joint extent only: a frame's masks usually
        # cover a small part of it, and the pixels outside are left exactly as they were.
        # Each mask's outline is taken on its box grown by thick + 1 (clipped to the frame), which
        # erodes exactly as the whole frame would.
        ux0, uy0 = min(b[0] for b in anchors), min(b[1] for b in anchors)
        ux1, uy1 = max(b[2] for b in anchors), max(b[3] for b in anchors)
        grow = thick + 1
        ux0, uy0, ux1, uy1 = max(ux0 - grow, 0), max(uy0 - grow, 0), min(ux1 + grow, w), min(uy1 + grow, h)
        canvas = rgb[uy0:uy1, ux0:ux1].astype(np.float32)
        for m, colour, box in zip(masks, colours, boxes):
            if box is None:
                continue
            x0, y0 = max(box[0] - grow, ux0), max(box[1] - grow, uy0)
            x1, y1 = min(box[2] + grow, ux1), min(box[3] + grow, uy1)
            mc = m[y0:y1, x0:x1]
            region = canvas[y0 - uy0:y1 - uy0, x0 - ux0:x1 - ux0]
            region[mc] = 0.5 * region[mc] + 0.5 * colour
            region[_outline(mc, thick)] = colour
        out[uy0:uy1, ux0:ux1] = np.clip(canvas, 0, 255).astype(np.uint8)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=_font_size(h, w))
    pad = max(1, _font_size(h, w) // 6)
    kept = [k for k, box in enumerate(boxes) if box is not None]
    sizes = []
    for k in kept:
        left, top, right, bottom = draw.textbbox((0, 0), texts[k], font=font)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
    placed = place_labels(sizes, anchors, h, w)
    for k, anchor, box in zip(kept, anchors, placed):
        if box is not None and not _overlaps(box, (anchor[0], anchor[1] - 1, anchor[2], anchor[3] + 1)):
            # Displaced from its mask: a leader line (under every label) says whose label it is.
            draw.line([((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), (anchor[0], anchor[1])],
                      fill=tuple(int(c) for c in colours[k]), width=thick)
    for k, box in zip(kept, placed):
        if box is None:
            continue
        fill = tuple(int(c) for c in colours[k])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
        left, top, _, _ = draw.textbbox((0, 0), texts[k], font=font)
        draw.text((box[0] + pad - left, box[1] + pad - top), texts[k], fill=_text_colour(fill), font=font)
    return np.asarray(img)


class OverlaySegment:
    """An H.264 MP4 of consecutive overlay frames, time stamps from 0 in frames (the settings
    every overlay has: libx264's defaults, yuv420p, sizes padded to even)."""

    def __init__(self, path: Path, height: int, width: int, rate: Fraction) -> None:
        self.out = av.open(str(path), mode="w", format="mp4")
        self.stream = self.out.add_stream("libx264", rate=rate)
        # yuv420p subsamples chroma 2x2, so libx264 needs even sizes: pad by a pixel where needed.
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.time_base = 1 / rate
        self.stream.codec_context.time_base = 1 / rate
        self.canvas = np.zeros((self.stream.height, self.stream.width, 3), dtype=np.uint8)
        self.h, self.w = height, width
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        self.canvas[:self.h, :self.w] = rgb
        # Converted here, not by encode(): its implicit conversion made the same frames encode to
        # different bytes from run to run. Not the whole story: libx264 still reads uninitialised
        # heap memory (MALLOC_PERTURB_ makes its output repeatable), so a process that wrote
        # other outputs first may still encode slightly different bytes.
        frame = av.VideoFrame.from_ndarray(self.canvas, format="rgb24").reformat(format="yuv420p")
        frame.pts = self.frames
        frame.time_base = self.stream.codec_context.time_base
        for packet in self.stream.encode(frame):
            self.out.mux(packet)
        self.frames += 1

    def close(self) -> None:
        try:
            for packet in self.stream.encode(None):
                self.out.mux(packet)
        finally:
            self.out.close()


def write_overlay(result: VideoResult, frames: Iterable[np.ndarray], path: Path, fps: float | None,
                  min_score: float = 0.0) -> int:
    """Encode frames (BGR uint8, HxWx3, at the result's size) with the kept tracks scoring at least
    min_score drawn on, as one segment; returns frames written. (service.outputs.render writes the
    same frames in ranges, in parallel.)"""
    labels = Labels.decide(result, min_score)
    labels = replace(labels, fps=fps)
    palette = np.array(davis_palette(), dtype=np.float32).reshape(256, 3)
    colours = [palette[k % 255 + 1] for k in labels.drawn]
    texts = [labels.overlay_text(k) for k in labels.drawn]
    kept = result.kept()
    drawn = [kept[k] for k in labels.drawn]
    h, w = result.height, result.width
    empty = np.zeros((h, w), bool)
    segment = OverlaySegment(path, h, w, labels.rate)
    try:
        for f, bgr in enumerate(frames):
            if bgr.shape != (h, w, 3):
                raise ValueError(f"overlay frame {f} is {bgr.shape}, expected {(h, w, 3)}")
            masks = [mask_utils.decode(t.masks[f]).astype(bool) if f in t.masks else empty for t in drawn]
            segment.write(draw_frame(bgr[:, :, ::-1], masks, texts, colours))
    finally:
        segment.close()
    return segment.frames
