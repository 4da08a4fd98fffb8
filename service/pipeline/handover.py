"""What one pipeline stage hands the next: a clip's clustering, a frame's statistics, a frame's
final tracks. Plain records, no behaviour beyond reading them; service.jobs.encoding stores them
as bytes between workers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from torch import Tensor


@dataclass
class FrameStats:
    """One frame's instances under some labelling: what the outputs need, nothing dense."""

    index: int
    labels: list[int]
    pixels: list[int]  # at the clustering resolution
    rles: list[dict]  # COCO RLE at the original frame size
    logit_sums: np.ndarray | None = None  # [K, classes] summed class logits (no background)
    votes: np.ndarray | None = None  # [K, classes] per-pixel argmax counts

    def renamed(self, mapping: dict[int, int]) -> FrameStats:
        return FrameStats(self.index, [mapping.get(label, label) for label in self.labels], self.pixels,
                          self.rles, self.logit_sums, self.votes)


@dataclass
class ClusteredClip:
    index: int
    frames: list[int]
    labels: Tensor  # [T, h, w] int64 on the CPU, instances numbered from 1
    owned: list[FrameStats]  # the frames this clip is the first to contain, in frame order


@dataclass
class FrameTracks:
    index: int
    track_ids: list[int]
    rles: list[dict]
    track_map: Tensor  # [h, w] at the clustering resolution: 0 bg, -1 unassigned, >0 track id

    def masks(self) -> np.ndarray:
        """[K, H, W] bool at the original frame size."""
        if not self.rles:
            return np.zeros((0, 0, 0), dtype=bool)
        return mask_utils.decode(self.rles).transpose(2, 0, 1).astype(bool)
