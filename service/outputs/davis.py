"""DAVIS index PNGs: one per frame, the kept tracks painted in order (a later track wins)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service.pipeline.tracks import VideoResult


def davis_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map: bits of the index spread over R, G and B."""
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
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = result.kept()
    palette = davis_palette()
    for f in range(result.num_frames):
        canvas = np.zeros((result.height, result.width), dtype=np.uint8)
        for k, track in enumerate(kept, start=1):
            if f in track.masks:
                canvas[mask_utils.decode(track.masks[f]).astype(bool)] = k
        img = Image.fromarray(canvas, mode="P")
        img.putpalette(palette)
        img.save(out_dir / f"{f:05d}.png")
