"""DAVIS index PNGs: one per frame, the kept tracks painted in order (a later track wins)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service.pipeline.tracks import VideoResult

log = logging.getLogger(__name__)

MAX_INDEX = 255  # a "P" PNG holds 8-bit indices


def davis_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map, flat [r, g, b] * 256: bits of the index spread over R, G and B."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_davis(result: VideoResult, out_dir: Path) -> None:
    """Track k of result.kept() (0-based) gets index k + 1; 0 is background."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = result.kept()
    if len(kept) > MAX_INDEX:
        # Only reachable with max_tracks=None; failing the whole job over it would lose the
        # other formats, and kept() is longest-lived first, so the dropped tracks matter least.
        log.warning("DAVIS PNGs hold %d tracks; %d shortest-lived not painted", MAX_INDEX, len(kept) - MAX_INDEX)
        kept = kept[:MAX_INDEX]
    palette = davis_palette()
    for f in range(result.num_frames):
        canvas = np.zeros((result.height, result.width), dtype=np.uint8)
        for k, track in enumerate(kept, start=1):
            if f in track.masks:
                canvas[mask_utils.decode(track.masks[f]).astype(bool)] = k
        img = Image.fromarray(canvas, mode="P")
        img.putpalette(palette)
        img.save(out_dir / f"{f:05d}.png")
