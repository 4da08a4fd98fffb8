"""Synthetic BGR frames with objects that move, for pipeline tests that need no decoding."""

from __future__ import annotations

import numpy as np


def moving_frames(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    background = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    frames = []
    for i in range(n):
        img = background.copy()
        x = (3 * i) % max(width - width // 4, 1)
        img[height // 5: height // 2, x: x + width // 4] = (30, 200, 60)
        img[height // 2: height - 3, width - x - width // 3: width - x] = (200, 40, 40)
        frames.append(img)
    return frames
