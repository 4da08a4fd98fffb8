"""How far two runs' tracks of the same video agree, e.g. fp16 or bf16 against fp32.

Tracks are matched one to one by the Hungarian method on their whole-video mask IoU (the
YouTube-VIS video IoU, `video_iou`); a reference track left unmatched counts as IoU 0, so the
mean penalises tracks that one precision finds and the other does not.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from service.evaluation.ytvis import video_iou
from service.pipeline.tracks import Track, VideoResult


def _per_frame(tracks: list[Track], num_frames: int) -> list[list[dict | None]]:
    return [[t.masks.get(f) for f in range(num_frames)] for t in tracks]


def track_agreement(reference: VideoResult, other: VideoResult, kept_only: bool = True) -> dict:
    """Matched-track IoU of `other` against `reference` (same video): mean over the reference's
    tracks (unmatched: 0), minimum, and the track counts. `kept_only` compares the tracks the
    outputs report (VideoResult.kept)."""
    if reference.num_frames != other.num_frames:
        raise ValueError(f"different videos: {reference.num_frames} and {other.num_frames} frames")
    a = reference.kept() if kept_only else reference.tracks
    b = other.kept() if kept_only else other.tracks
    report = {"reference_tracks": len(a), "other_tracks": len(b), "matched": 0,
              "mean_matched_iou": 1.0 if not a and not b else 0.0, "min_matched_iou": None}
    if not a or not b:
        return report
    iou = video_iou(_per_frame(b, other.num_frames), _per_frame(a, reference.num_frames))  # [other, reference]
    rows, cols = linear_sum_assignment(-iou)
    matched = np.zeros(len(a))
    matched[cols] = iou[rows, cols]
    report.update(matched=len(rows), mean_matched_iou=round(float(matched.mean()), 6),
                  min_matched_iou=round(float(matched.min()), 6))
    return report


__all__ = ["track_agreement"]
