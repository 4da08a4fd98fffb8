"""What lasts to the end of a video: compact per-track accumulators, and the final selection.

Dense maps are dropped frame by frame; each track keeps its lifetime, pixel count, class
evidence and one COCO RLE per frame, which is all the output formats need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Track:
    id: int
    first_frame: int
    last_frame: int
    pixels: int = 0  # counted at the clustering resolution, as the original scores tracks
    # Sum over the track's pixels of the semseg class logits without background, [num classes].
    class_logit_sum: np.ndarray | None = None
    # How many of its pixels have each class as their semseg argmax, [num classes].
    class_votes: np.ndarray | None = None
    # Frame index -> COCO RLE ({"size": [h, w], "counts": bytes}) at the original frame size.
    masks: dict[int, dict] = field(default_factory=dict)

    @property
    def lifetime(self) -> int:
        return self.last_frame - self.first_frame

    @property
    def area(self) -> int:
        return self.pixels

    def category(self) -> int:
        """1-based category id: argmax of softmax of the mean class logits (YouTube-VIS / DAVIS rule)."""
        if self.class_logit_sum is None or self.pixels == 0:
            return 1
        mean = self.class_logit_sum / self.pixels
        p = np.exp(mean - mean.max())
        return int(np.argmax(p / p.sum())) + 1

    def voted_category(self) -> int:
        """1-based category id by majority vote of per-pixel argmax labels (KITTI-MOTS rule)."""
        if self.class_votes is None or not self.class_votes.any():
            return self.category()
        return int(np.argmax(self.class_votes)) + 1


@dataclass
class VideoResult:
    num_frames: int
    height: int
    width: int
    fps: float | None
    classes: dict[int, str]  # category id -> name
    max_tracks: int | None
    tracks: list[Track]  # every track, in order of first appearance

    def kept(self) -> list[Track]:
        """The longest-lived tracks, at most max_tracks (stable for equal lifetimes)."""
        ranked = sorted(self.tracks, key=lambda t: t.lifetime, reverse=True)
        return ranked if self.max_tracks is None else ranked[: self.max_tracks]

    def scores(self, kept: list[Track]) -> list[float]:
        """Pixel count relative to the largest kept track."""
        top = max((t.pixels for t in kept), default=0)
        return [t.pixels / top if top else 0.0 for t in kept]
