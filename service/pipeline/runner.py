"""A whole video as a stream of per-frame tracks.

    segmenter = Segmenter(engine)  # an STEmSeg, or any Engine
    for frame in segmenter.propagate(clip_windows, plan, height, width):
        frame.index, frame.track_ids, frame.masks
    result = segmenter.result()

Frames are processed in clip order. Backbone features are computed once per frame and shared
by the clips that contain it; heads run per clip; a frame's semseg logits (or seediness, for
DAVIS) are averaged over all its clips, so a clip is clustered only once every clip touching
its frames has run. Each clip is then clustered and chained onto the previous one, which
finalises its new frames: they are emitted and their dense state dropped. At most two clips'
outputs and a clip and a half of frame features are alive at any time, whatever the length.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor

from service.model.engines import Engine
from service.model.stemseg import ClipOutputs
from service.pipeline.clips import last_use
from service.pipeline.clustering import ClusteringConfig, cluster_clip
from service.pipeline.preprocess import Geometry, geometry, masks_to_frame, preprocess
from service.pipeline.stitching import TrackChainer
from service.pipeline.timing import StageTimer
from service.pipeline.tracks import Track, VideoResult


@dataclass
class FrameTracks:
    index: int
    track_ids: list[int]
    masks: Tensor  # [K, H, W] bool at the original frame size, on the CPU
    track_map: Tensor  # [h, w] int64 at the clustering resolution: 0 bg, -1 unassigned, >0 track id


@dataclass
class _FrameState:
    """Evidence for one frame's foreground, summed over the clips that contain it."""

    total: Tensor | None = None
    count: int = 0

    def add(self, x: Tensor) -> None:
        self.total = x.clone() if self.total is None else self.total + x
        self.count += 1

    def mean(self) -> Tensor:
        return self.total / self.count


@dataclass
class _Pending:
    index: int
    frames: list[int]
    outputs: ClipOutputs


@dataclass
class SegmenterOptions:
    """Departures from the original, all off by default (reference behaviour)."""

    secondary: str = "reference"  # "corrected": leftover pixels go to their most probable instance
    min_iou: float | None = None  # clips link only at IoU >= this
    fg_thresh: float | None = None  # override the preset's foreground threshold


class Segmenter:
    def __init__(
        self,
        model: Engine,
        *,
        device: torch.device | str | None = None,
        options: SegmenterOptions | None = None,
        timer: StageTimer | None = None,
    ) -> None:
        self.model = model
        self.cfg = model.cfg
        self.device = torch.device(device) if device is not None else model.device
        self.options = options or SegmenterOptions()
        self.timer = timer or StageTimer(self.device)
        self.clustering = ClusteringConfig(
            min_seediness_prob=self.cfg.min_seediness,
            max_instances=self.cfg.max_instances,
            free_dim_stds=tuple(self.cfg.free_dim_stds),
            secondary=self.options.secondary,
        )
        self._tracks: dict[int, Track] = {}
        self._geom: Geometry | None = None
        self._num_frames = 0

    # ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propagate(
        self, clips: Iterable[tuple[int, list]], plan: list[list[int]], height: int, width: int
    ) -> Iterator[FrameTracks]:
        """Consume clip windows `(clip index, frames)` (frames with `.index` and BGR `.image`)
        in plan order and yield every frame's tracks once, in frame order."""
        cfg, timer = self.cfg, self.timer
        self._geom = geom = geometry(height, width, cfg.min_dim, cfg.max_dim)
        self._num_frames = max(f for clip in plan for f in clip) + 1
        self._tracks = {}
        chainer = TrackChainer(min_iou=self.options.min_iou)
        last = last_use(plan)
        features: dict[int, list[Tensor]] = {}
        evidence: dict[int, _FrameState] = {}
        pending: deque[_Pending] = deque()

        for k, frames in clips:
            indices = [f.index for f in frames]
            if indices != plan[k]:
                raise ValueError(f"clip {k} holds frames {indices}, the plan says {plan[k]}")
            new = {f.index: f.image for f in frames if f.index not in features}
            if new:
                with timer("preprocess"):
                    batch = self._to_device(np.stack(list(new.values())))
                    images = preprocess(batch, geom)
                with timer("backbone"):
                    maps = self.model.frame_features(images)
                for i, f in enumerate(new):
                    features[f] = [m[i] for m in maps]
            with timer("heads"):
                stacked = [torch.stack([features[f][lvl] for f in indices], 1).unsqueeze(0) for lvl in range(4)]
                out = self.model.clip_heads(stacked)
                for pos, f in enumerate(indices):
                    evidence.setdefault(f, _FrameState()).add(self._fg_evidence(out, pos))
            for f in set(indices):
                if last[f] == k:
                    del features[f]
            pending.append(_Pending(k, indices, ClipOutputs(out.embeddings, out.bandwidths, out.seediness, None)))

            while pending and max(last[f] for f in pending[0].frames) <= k:
                clip = pending.popleft()
                with timer("clustering"):
                    labels = self._cluster(clip, evidence, chainer.next_track_id)
                with timer("stitching"):
                    finished = chainer.add_clip(clip.frames, labels)
                for f, track_map in finished:
                    with timer("output"):
                        frame = self._emit(f, track_map, evidence[f])
                    yield frame
                still_needed = {f for p in pending for f in p.frames}
                for f in [f for f in evidence if last[f] <= k and f not in still_needed]:
                    del evidence[f]

    def result(self, fps: float | None = None) -> VideoResult:
        geom = self._geom
        return VideoResult(
            num_frames=self._num_frames,
            height=geom.height if geom else 0,
            width=geom.width if geom else 0,
            fps=fps,
            classes=dict(self.cfg.classes),
            max_tracks=self.cfg.max_tracks,
            tracks=list(self._tracks.values()),
        )

    # ----------------------------------------------------------------------------------------
    def _to_device(self, frames: np.ndarray) -> Tensor:
        t = torch.from_numpy(frames)
        if self.device.type == "cuda":
            # Pinned staging lets the copy overlap with work already queued on the GPU.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _fg_evidence(self, out: ClipOutputs, pos: int) -> Tensor:
        """What a clip says about one of its frames: semseg logits or seediness, [C, h, w]."""
        if self.cfg.foreground == "seediness":
            return out.seediness[0, :, pos]
        return out.semseg_logits[0, :, pos]

    def _upsample(self, x: Tensor) -> Tensor:
        """[C, T, h, w] -> the clustering resolution (x4 trilinear for stride-1 presets)."""
        if self.cfg.cluster_stride == 1:
            return F.interpolate(x.unsqueeze(0), scale_factor=(1.0, 4.0, 4.0), mode="trilinear",
                                 align_corners=False)[0]
        return x

    def _frame_maps(self, state: _FrameState) -> Tensor:
        """A frame's averaged evidence at the clustering resolution, [C, h, w]."""
        mean = state.mean()
        if self.cfg.cluster_stride == 1:
            mean = F.interpolate(mean.unsqueeze(0), scale_factor=4.0, mode="bilinear", align_corners=False)[0]
        return mean

    def _foreground(self, state: _FrameState) -> Tensor:
        thresh = self.options.fg_thresh if self.options.fg_thresh is not None else self.cfg.foreground_thresh
        maps = self._frame_maps(state)
        if self.cfg.foreground == "seediness":
            return maps[0] > thresh
        return torch.sigmoid(maps[-1]) > thresh

    def _cluster(self, clip: _Pending, evidence: dict[int, _FrameState], next_label: int) -> Tensor:
        fg_by_frame = {f: self._foreground(evidence[f]) for f in set(clip.frames)}
        fg = torch.stack([fg_by_frame[f] for f in clip.frames])
        out = clip.outputs
        return cluster_clip(
            self._upsample(out.embeddings[0]), self._upsample(out.bandwidths[0]), self._upsample(out.seediness[0]),
            fg, self.clustering, next_label=next_label,
        )

    def _emit(self, index: int, track_map: Tensor, state: _FrameState) -> FrameTracks:
        cfg, geom = self.cfg, self._geom
        ids_t = torch.unique(track_map)
        ids = [int(i) for i in ids_t.tolist() if i > 0]
        if not ids:
            empty = torch.zeros(0, geom.height, geom.width, dtype=torch.bool)
            return FrameTracks(index, [], empty, track_map.cpu())
        onehot = track_map.unsqueeze(0) == torch.tensor(ids, device=track_map.device).view(-1, 1, 1)
        pixels = onehot.flatten(1).sum(1)
        logit_sums = votes = None
        if cfg.semseg_inter is not None:
            # Class channels only: 0 is background and the last is the foreground logit.
            logits = self._frame_maps(state)[1:-1].flatten(1)
            flat = onehot.flatten(1).to(logits.dtype)
            logit_sums = (flat @ logits.T).double().cpu().numpy()
            labels = F.one_hot(logits.argmax(0), logits.shape[0]).to(logits.dtype)
            votes = (flat @ labels).round().long().cpu().numpy()
        masks = masks_to_frame(onehot, geom, cfg.cluster_stride).cpu()
        rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
        for j, (tid, n) in enumerate(zip(ids, pixels.tolist())):
            track = self._tracks.get(tid)
            if track is None:
                track = self._tracks[tid] = Track(tid, first_frame=index, last_frame=index)
            track.last_frame = index
            track.pixels += n
            if logit_sums is not None:
                track.class_logit_sum = logit_sums[j] if track.class_logit_sum is None else track.class_logit_sum + logit_sums[j]
                track.class_votes = votes[j] if track.class_votes is None else track.class_votes + votes[j]
            track.masks[index] = rles[j]
        return FrameTracks(index, ids, masks, track_map.cpu())
