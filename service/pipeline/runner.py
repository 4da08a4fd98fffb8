"""A whole video as a stream of per-frame tracks.

    segmenter = Segmenter(engine)
    for frame in segmenter.propagate(clip_windows, plan, height, width):
        frame.index, frame.track_ids, frame.masks()
    result = segmenter.result()

Two stages, so the service can run the first on many workers and the second in one place:

* `ClipProcessor` (network and clustering): backbone features are computed once per frame and
  shared by the clips containing it; heads run per clip; a frame's semseg logits (seediness
  for DAVIS) are averaged over all its clips, so a clip is clustered once every clip touching
  its frames has run. It yields each clip's labels plus, for the frames the clip is the first
  to contain, per-label statistics and full-size RLE masks. Dense state is dropped as soon as
  no later clip needs it: memory does not grow with the video.
* `Stitcher` (service.pipeline.stitcher; chaining and accumulation): links each clip to the
  previous one and folds the renamed statistics into compact per-track accumulators.

What one stage hands the next lives in service.pipeline.handover; how those records are stored
as bytes between workers, in service.jobs.encoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor

from service.model.engines import Engine
from service.model.presets import ModelConfig
from service.model.stemseg import ClipOutputs
from service.pipeline.clips import StreamPlan
from service.pipeline.clustering import ClusteringConfig, cluster_clip
from service.pipeline.handover import ClusteredClip, FrameStats, FrameTracks
from service.pipeline.prefetch import prefetch
from service.pipeline.preprocess import Geometry, geometry, masks_to_frame, preprocess, soft_masks_to_frame
from service.pipeline.stitcher import Stitcher
from service.pipeline.timing import StageTimer
from service.pipeline.tracks import Track, VideoResult


@dataclass
class SegmenterOptions:
    """Departures from the original, all off by default (reference behaviour)."""

    secondary: str = "reference"  # "corrected": leftover pixels go to their most probable instance
    min_iou: float | None = None  # clips link only at IoU >= this
    fg_thresh: float | None = None  # override the preset's foreground threshold
    mask_upsampling: str | None = None  # override the preset's ("reference" or "soft")


@dataclass
class PipelineOptions:
    """How the work is scheduled. The threads never change the outputs, bit for bit
    (tests/test_pipeline.py); see clips_per_forward for the one caveat.

    prefetch: clip windows decoded ahead on their own thread (0: decode inline).
    clips_per_forward: consecutive clips whose heads run as one batch, their new frames through
        the backbone as one batch too (more work per forward for a large GPU; memory grows with it).
        Batched 3-D convolutions may round differently from single-clip ones (about 1e-5 on the
        CPU; see service.model.batching), so above 1 a pixel at a threshold can change; 1 keeps
        the reference outputs exactly.
    post_workers: 1 runs per-frame statistics, mask upsampling to full size and RLE encoding on a
        post-processing thread, off the network's critical path; 0 runs them inline.
    """

    prefetch: int = 4
    clips_per_forward: int = 1
    post_workers: int = 1

    @classmethod
    def serial(cls) -> PipelineOptions:
        """Everything inline on the caller's thread, one clip per forward (the old pipeline)."""
        return cls(prefetch=0, clips_per_forward=1, post_workers=0)

    @classmethod
    def for_worker(cls, settings) -> PipelineOptions:
        """A worker's task reads its frames into memory before the network runs (read_frames), so
        there is no decoding left to overlap: no prefetch thread."""
        return cls(prefetch=0, clips_per_forward=settings.clips_per_forward)


@dataclass
class _Evidence:
    """A frame's foreground evidence summed over the clips that contain it."""

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


def first_clip(plan: Sequence[Sequence[int]]) -> dict[int, int]:
    """For every frame, the first clip containing it: the clip that fixes its labels."""
    owner: dict[int, int] = {}
    for k, clip in enumerate(plan):
        for f in clip:
            owner.setdefault(f, k)
    return owner


def _groups(clips: Iterable[tuple[int, list]], size: int) -> Iterator[list[tuple[int, list]]]:
    it = iter(clips)
    while group := list(islice(it, size)):
        yield group


def _ready(item: Future | ClusteredClip) -> bool:
    return not isinstance(item, Future) or item.done()


def _result(item: Future | ClusteredClip) -> ClusteredClip:
    return item.result() if isinstance(item, Future) else item


class ClipProcessor:
    """Network and clustering over clip windows; see the module docstring."""

    def __init__(self, engine: Engine, *, device: torch.device | str | None = None,
                 options: SegmenterOptions | None = None, timer: StageTimer | None = None,
                 cfg: ModelConfig | None = None, pipeline: PipelineOptions | None = None) -> None:
        self.engine = engine
        self.cfg = cfg or engine.cfg  # e.g. the engine's preset with a job's own min_dim
        self.device = torch.device(device) if device is not None else engine.device
        self.options = options or SegmenterOptions()
        self.pipeline = pipeline or PipelineOptions()
        if self.pipeline.clips_per_forward < 1:
            raise ValueError(f"clips_per_forward must be at least 1, got {self.pipeline.clips_per_forward}")
        self.timer = timer or StageTimer(self.device)
        self.clustering = ClusteringConfig(
            min_seediness_prob=self.cfg.min_seediness, max_instances=self.cfg.max_instances,
            free_dim_stds=tuple(self.cfg.free_dim_stds), secondary=self.options.secondary,
        )
        self.geom: Geometry | None = None

    def run(self, clips: Iterable[tuple[int, list]], plan: list[list[int]] | StreamPlan, height: int, width: int,
            cluster: range | None = None) -> Iterator[ClusteredClip]:
        """Consume clip windows `(clip index, frames with .index and BGR .image)` in order and yield
        the clips in `cluster` (default all) clustered. Clips outside it only lend evidence.

        `plan` is a video's clip_plan, or a StreamPlan that grows while the windows arrive (a live
        stream; its windows' producer plans each clip before handing it over and ends the plan
        before the windows run out): a clip is clustered once the plan knows every clip touching
        its frames, so a stream gives the clips a file of the same frames gives."""
        pipe = self.pipeline
        post = ThreadPoolExecutor(1, thread_name_prefix="stemseg-post") if pipe.post_workers > 0 else None
        source = prefetch(clips, pipe.prefetch, self.timer)
        try:
            yield from self._run(source, plan, height, width, cluster, post)
        finally:
            source.close()  # stops the decode thread when the consumer stops early
            if post is not None:
                post.shutdown(wait=True, cancel_futures=True)

    def _run(self, clips: Iterator[tuple[int, list]], plan: list[list[int]], height: int, width: int,
             cluster: range | None, post: ThreadPoolExecutor | None) -> Iterator[ClusteredClip]:
        cfg, timer = self.cfg, self.timer
        self.geom = geom = geometry(height, width, cfg.min_dim, cfg.max_dim)
        plan = plan if isinstance(plan, StreamPlan) else StreamPlan.of(plan)

        def used_up(f: int, k: int | None) -> bool:
            last = plan.last_use(f)
            return last is not None and k is not None and last <= k
        features: dict[int, list[Tensor]] = {}
        evidence: dict[int, _Evidence] = {}
        pending: deque[_Pending] = deque()
        # Post-processing results in clip order; bounded so dense state cannot pile up.
        finishing: deque[Future | ClusteredClip] = deque()
        max_finishing = 2 + self.pipeline.clips_per_forward
        seen: int | None = None

        for group in _groups(clips, self.pipeline.clips_per_forward):
            with torch.inference_mode():
                new: dict[int, np.ndarray] = {}
                for k, frames in group:
                    indices = [f.index for f in frames]
                    if indices != plan[k]:
                        raise ValueError(f"clip {k} holds frames {indices}, the plan says {plan[k]}")
                    new.update({f.index: f.image for f in frames if f.index not in features and f.index not in new})
                if new:
                    with timer("preprocess"):
                        images = preprocess(self._to_device(np.stack(list(new.values()))), geom)
                    with timer("backbone"):
                        maps = self.engine.frame_features(images)
                    for i, f in enumerate(new):
                        features[f] = [m[i] for m in maps]
                with timer("heads"):
                    outs = self._heads([plan[k] for k, _ in group], features)
                    for (k, _), out in zip(group, outs):
                        for pos, f in enumerate(plan[k]):
                            evidence.setdefault(f, _Evidence()).add(self._fg_evidence(out, pos))
                for (k, _), out in zip(group, outs):
                    indices = plan[k]
                    for f in [f for f in features if used_up(f, k)]:
                        del features[f]
                    if cluster is None or k in cluster:
                        pending.append(_Pending(k, indices, ClipOutputs(out.embeddings, out.bandwidths, out.seediness,
                                                                        None)))
                    seen = k
                    self._finish_ready(pending, finishing, evidence, plan, seen, post)
            while finishing and (len(finishing) > max_finishing or _ready(finishing[0])):
                yield _result(finishing.popleft())
        # A stream's plan may have learnt its last clips' extent only as its windows ran out.
        with torch.inference_mode():
            self._finish_ready(pending, finishing, evidence, plan, seen, post)
        while finishing:
            yield _result(finishing.popleft())
        if pending:
            raise ValueError(f"clips {[p.index for p in pending]} lack the later clips their frames need")

    def _finish_ready(self, pending: deque[_Pending], finishing: deque[Future | ClusteredClip],
                      evidence: dict[int, _Evidence], plan: StreamPlan, seen: int | None,
                      post: ThreadPoolExecutor | None) -> None:
        """Cluster, in order, the pending clips whose frames no clip still to come can contain."""
        def used_up(f: int) -> bool:
            last = plan.last_use(f)
            return last is not None and seen is not None and last <= seen

        while pending and all(used_up(f) for f in pending[0].frames):
            finishing.append(self._finish(pending.popleft(), evidence, plan, post))
            still_needed = {f for p in pending for f in p.frames}
            for f in [f for f in evidence if used_up(f) and f not in still_needed]:
                del evidence[f]

    def _heads(self, clips: list[list[int]], features: dict[int, list[Tensor]]) -> list[ClipOutputs]:
        """Head outputs of consecutive clips, run as one batch."""
        # One clip (the default) is stacked straight into its batch of one: no extra copy per level.
        stacked = [torch.stack([features[f][lvl] for f in clips[0]], 1).unsqueeze(0) if len(clips) == 1 else
                   torch.cat([torch.stack([features[f][lvl] for f in c], 1).unsqueeze(0) for c in clips])
                   for lvl in range(4)]
        out = self.engine.clip_heads(stacked)
        if len(clips) == 1:
            return [out]
        fields = [out.embeddings, out.bandwidths, out.seediness, out.semseg_logits]
        return [ClipOutputs(*(None if t is None else t[j:j + 1] for t in fields)) for j in range(len(clips))]

    # ----------------------------------------------------------------------------------------
    def _finish(self, clip: _Pending, evidence: dict[int, _Evidence], plan: StreamPlan,
                post: ThreadPoolExecutor | None) -> Future | ClusteredClip:
        """Cluster a clip here (device work, queued without host reads on CUDA); its per-frame
        statistics and full-size RLE masks (host work) go to the post-processing thread."""
        with self.timer("clustering"):
            fg_by_frame = {f: self._foreground(evidence[f]) for f in set(clip.frames)}
            fg = torch.stack([fg_by_frame[f] for f in clip.frames])
            out = clip.outputs
            labels = cluster_clip(
                self._upsample(out.embeddings[0]), self._upsample(out.bandwidths[0]),
                self._upsample(out.seediness[0]), fg, self.clustering, next_label=1,
            )
        # The frames' evidence is final: no later clip contains them (see run's loop).
        owned = {f: evidence[f] for f in set(clip.frames) if plan.first_clip(f) == clip.index}
        if post is None:
            return self._clip_stats(clip, labels, owned)
        return post.submit(self._clip_stats, clip, labels, owned)

    @torch.inference_mode()
    def _clip_stats(self, clip: _Pending, labels: Tensor, owned: dict[int, _Evidence]) -> ClusteredClip:
        with self.timer("output", sync=False):
            # A clip shorter than the video repeats frame 0: its last copy is the real frame.
            position = {f: i for i, f in enumerate(clip.frames)}
            stats = [self._frame_stats(f, labels[position[f]], owned[f]) for f in sorted(owned)]
            return ClusteredClip(clip.index, clip.frames, labels.cpu(), stats)

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

    def _frame_maps(self, ev: _Evidence) -> Tensor:
        """A frame's averaged evidence at the clustering resolution, [C, h, w]."""
        mean = ev.mean()
        if self.cfg.cluster_stride == 1:
            mean = F.interpolate(mean.unsqueeze(0), scale_factor=4.0, mode="bilinear", align_corners=False)[0]
        return mean

    def _foreground_score(self, maps: Tensor) -> tuple[Tensor, float]:
        """The foreground score in a frame's maps and the threshold it must pass."""
        thresh = self.options.fg_thresh if self.options.fg_thresh is not None else self.cfg.foreground_thresh
        if self.cfg.foreground == "seediness":
            return maps[0], thresh
        return torch.sigmoid(maps[-1]), thresh

    def _foreground(self, ev: _Evidence) -> Tensor:
        score, thresh = self._foreground_score(self._frame_maps(ev))
        return score > thresh

    def _frame_stats(self, index: int, label_map: Tensor, ev: _Evidence) -> FrameStats:
        cfg, geom = self.cfg, self.geom
        ids = [int(i) for i in torch.unique(label_map).tolist() if i > 0]
        if not ids:
            return FrameStats(index, [], [], [])
        onehot = label_map.unsqueeze(0) == torch.tensor(ids, device=label_map.device).view(-1, 1, 1)
        flat = onehot.flatten(1)
        stats = FrameStats(index, ids, flat.sum(1).tolist(), [])
        maps = self._frame_maps(ev)
        if cfg.semseg_inter is not None:
            # Class channels only: 0 is background and the last is the foreground logit.
            logits = maps[1:-1].flatten(1)
            weights = flat.to(logits.dtype)
            stats.logit_sums = (weights @ logits.T).double().cpu().numpy()
            votes = F.one_hot(logits.argmax(0), logits.shape[0]).to(logits.dtype)
            stats.votes = (weights @ votes).round().long().cpu().numpy()
        if (self.options.mask_upsampling or cfg.mask_upsampling) == "soft":
            score, thresh = self._foreground_score(maps)
            masks = soft_masks_to_frame(onehot, score, thresh, geom, cfg.cluster_stride).cpu()
        else:
            masks = masks_to_frame(onehot, geom, cfg.cluster_stride).cpu()
        stats.rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
        return stats


class Segmenter:
    """ClipProcessor and Stitcher in one process: the CLI's pipeline."""

    def __init__(self, engine: Engine, *, device: torch.device | str | None = None,
                 options: SegmenterOptions | None = None, timer: StageTimer | None = None,
                 pipeline: PipelineOptions | None = None) -> None:
        self.processor = ClipProcessor(engine, device=device, options=options, timer=timer, pipeline=pipeline)
        self.options = self.processor.options
        self.timer = self.processor.timer
        self.cfg = engine.cfg
        self._stitcher = Stitcher(self.options.min_iou)
        self._num_frames = 0

    def propagate(self, clips: Iterable[tuple[int, list]], plan: list[list[int]] | StreamPlan, height: int,
                  width: int) -> Iterator[FrameTracks]:
        """Every frame's tracks once, in frame order, as soon as its clip is chained (a StreamPlan:
        see ClipProcessor.run)."""
        self._stitcher = Stitcher(self.options.min_iou)
        streaming = isinstance(plan, StreamPlan)
        self._num_frames = 0 if streaming else max(f for clip in plan for f in clip) + 1
        for clip in self.processor.run(clips, plan, height, width):
            with self.timer("stitching"):
                frames = self._stitcher.add(clip)
            yield from frames
        if streaming:
            self._num_frames = plan.frames

    @property
    def tracks(self) -> dict[int, Track]:
        """The tracks chained so far, by id (accumulated up to the last frame propagate() yielded)."""
        return self._stitcher.tracks

    def result(self, fps: float | None = None) -> VideoResult:
        geom = self.processor.geom
        return VideoResult(
            num_frames=self._num_frames, height=geom.height if geom else 0, width=geom.width if geom else 0,
            fps=fps, classes=dict(self.cfg.classes), max_tracks=self.cfg.max_tracks,
            tracks=list(self._stitcher.tracks.values()),
        )
