"""Chaining clustered clips in order and folding them into per-track accumulators: the one
stitcher, used in one process (the CLI's Segmenter) and across workers (service.jobs.coordinator
keeps its state between clips). Which labels match which tracks is service.pipeline.track_matching's."""

from __future__ import annotations

import torch

from service.pipeline.handover import ClusteredClip, FrameStats, FrameTracks
from service.pipeline.track_matching import TrackChainer
from service.pipeline.tracks import Track


class Stitcher:
    """Chains clustered clips in order and folds them into per-track accumulators.

    Its state is small: the last clip's label maps, the next ids and the accumulators, so that
    whichever worker finishes a clip can advance the job (stored by service.jobs.encoding's
    stitcher_to_bytes). With `keep_masks=False` the per-frame RLEs are only returned, for the
    caller to store.
    """

    def __init__(self, min_iou: float | None = None, keep_masks: bool = True) -> None:
        self.chainer = TrackChainer(min_iou=min_iou)
        self.min_iou = min_iou
        self.keep_masks = keep_masks
        self.tracks: dict[int, Track] = {}
        self.next_clip = 0

    def add(self, clip: ClusteredClip) -> list[FrameTracks]:
        if clip.index != self.next_clip:
            raise ValueError(f"clip {clip.index} stitched out of order (expected {self.next_clip})")
        # Number this clip's instances from the next free track id, as the original numbers them.
        offset = self.chainer.next_track_id - 1
        labels = torch.where(clip.labels > 0, clip.labels + offset, clip.labels)
        finished = self.chainer.add_clip(clip.frames, labels)
        self.next_clip += 1
        owned = {s.index: s for s in clip.owned}
        out = []
        for f, track_map in finished:
            mapping = {lab: self.chainer.last_mapping.get(lab + offset, lab + offset) for lab in owned[f].labels}
            stats = owned[f].renamed(mapping)
            self._accumulate(stats)
            out.append(FrameTracks(f, stats.labels, stats.rles, track_map))
        return out

    def _accumulate(self, stats: FrameStats) -> None:
        for j, tid in enumerate(stats.labels):
            track = self.tracks.get(tid)
            if track is None:
                track = self.tracks[tid] = Track(tid, first_frame=stats.index, last_frame=stats.index)
            track.last_frame = stats.index
            track.pixels += stats.pixels[j]
            if stats.logit_sums is not None:
                s, v = stats.logit_sums[j], stats.votes[j]
                track.class_logit_sum = s.copy() if track.class_logit_sum is None else track.class_logit_sum + s
                track.class_votes = v.copy() if track.class_votes is None else track.class_votes + v
            if self.keep_masks:
                track.masks[stats.index] = stats.rles[j]
