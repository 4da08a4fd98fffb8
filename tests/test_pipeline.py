"""The streaming pipeline against the core functions run directly, the way the original does:
every clip through the whole network, all evidence kept, then clustering and chaining."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from frames import moving_frames

from service.model.checkpoint import load_model
from service.pipeline.clips import clip_plan, context_range
from service.pipeline.clustering import ClusteringConfig, cluster_clip
from service.pipeline.preprocess import geometry, masks_to_frame, preprocess
from service.pipeline.runner import ClipProcessor, Segmenter, Stitcher
from service.pipeline.stitching import TrackChainer


class _Frame:
    def __init__(self, index: int, image: np.ndarray) -> None:
        self.index, self.image = index, image


def small_model(official_weights, preset: str):
    """Synthetic weights seed nothing at the official 0.8 / 0.95, so lower the bar to get tracks."""
    model = load_model(official_weights(preset))
    model.cfg = replace(model.cfg, min_dim=64, max_dim=128, min_seediness=0.5)
    return model


def direct_track_maps(model, images: list[np.ndarray], plan: list[list[int]]) -> dict[int, torch.Tensor]:
    cfg = model.cfg
    geom = geometry(*images[0].shape[:2], cfg.min_dim, cfg.max_dim)
    x = preprocess(torch.from_numpy(np.stack(images)), geom)
    with torch.inference_mode():
        outs = [model(x[clip]) for clip in plan]
    total: dict[int, torch.Tensor] = {}
    count: dict[int, int] = {}
    for clip, out in zip(plan, outs):
        ev = out.seediness[0] if cfg.foreground == "seediness" else out.semseg_logits[0]
        for pos, f in enumerate(clip):
            total[f] = total.get(f, 0) + ev[:, pos]
            count[f] = count.get(f, 0) + 1

    def up(t: torch.Tensor) -> torch.Tensor:  # [C, T, h, w]
        if cfg.cluster_stride == 1:
            return F.interpolate(t[None], scale_factor=(1.0, 4.0, 4.0), mode="trilinear", align_corners=False)[0]
        return t

    def fg(f: int) -> torch.Tensor:
        mean = total[f] / count[f]
        if cfg.cluster_stride == 1:
            mean = F.interpolate(mean[None], scale_factor=4.0, mode="bilinear", align_corners=False)[0]
        return mean[0] > cfg.foreground_thresh if cfg.foreground == "seediness" else torch.sigmoid(mean[-1]) > 0.5

    ccfg = ClusteringConfig(min_seediness_prob=cfg.min_seediness, max_instances=cfg.max_instances,
                            free_dim_stds=tuple(cfg.free_dim_stds))
    chainer, maps = TrackChainer(), {}
    for clip, out in zip(plan, outs):
        labels = cluster_clip(up(out.embeddings[0]), up(out.bandwidths[0]), up(out.seediness[0]),
                              torch.stack([fg(f) for f in clip]), ccfg, next_label=chainer.next_track_id)
        maps.update(chainer.add_clip(clip, labels))
    return maps


def _windows(images, plan):
    return ((k, [_Frame(i, images[i]) for i in clip]) for k, clip in enumerate(plan))


@pytest.mark.parametrize("preset, n", [("kitti_mots", 21), ("kitti_mots", 5), ("youtube_vis", 13), ("davis", 17)])
def test_streaming_equals_direct(official_weights, preset: str, n: int) -> None:
    model = small_model(official_weights, preset)
    images = moving_frames(n, 48, 64)
    plan = clip_plan(n, model.cfg.clip_len, model.cfg.overlap)
    seg = Segmenter(model)
    frames = list(seg.propagate(_windows(images, plan), plan, 48, 64))
    assert [f.index for f in frames] == list(range(n))
    expected = direct_track_maps(model, images, plan)
    for fr in frames:
        assert torch.equal(fr.track_map, expected[fr.index]), f"frame {fr.index}"
    result = seg.result()
    assert result.tracks, "the test needs tracks to be meaningful"
    for fr in frames:
        masks = fr.masks()
        assert len(fr.track_ids) == len(masks) and (not len(masks) or masks.shape[1:] == (48, 64))


def test_chunked_processing_with_saved_stitcher_state_equals_one_pass(official_weights) -> None:
    """What the service does: clip groups on different workers, stitched from saved state."""
    model = small_model(official_weights, "kitti_mots")
    n = 29
    images = moving_frames(n, 48, 64)
    plan = clip_plan(n, model.cfg.clip_len, model.cfg.overlap)
    one = Segmenter(model)
    expected = {f.index: f for f in one.propagate(_windows(images, plan), plan, 48, 64)}

    state = Stitcher(keep_masks=False).to_bytes()
    got = {}
    for a, b in [(0, 2), (2, 5), (5, len(plan))]:
        windows = ((k, [_Frame(i, images[i]) for i in plan[k]]) for k in context_range(plan, a, b))
        clips = list(ClipProcessor(model).run(windows, plan, 48, 64, cluster=range(a, b)))
        assert [c.index for c in clips] == list(range(a, b))
        for clip in clips:
            st = Stitcher.from_bytes(state)
            got.update({f.index: f for f in st.add(clip)})
            state = st.to_bytes()
    assert sorted(got) == list(range(n))
    for f in range(n):
        assert torch.equal(got[f].track_map, expected[f].track_map)
        assert got[f].track_ids == expected[f].track_ids and got[f].rles == expected[f].rles
    final = Stitcher.from_bytes(state)
    assert {t.id: (t.pixels, t.first_frame, t.last_frame) for t in final.tracks.values()} == {
        t.id: (t.pixels, t.first_frame, t.last_frame) for t in one.result().tracks}


def test_lite_outlines_follow_the_foreground_not_the_stride_4_grid(lite_weights) -> None:
    """On a synthetic video the shipped model knows: `reference` masks are upsampled stride-4
    labels (a pixel at offset (1, 1) in its 4x4 cell carries the cell's label, so resampling
    those pixels reproduces the mask); `soft` ones (the lite default) are not, and fit the
    objects better."""
    from service.pipeline.runner import SegmenterOptions
    from service.training.synth import render_video

    model = load_model(lite_weights)
    assert model.cfg.mask_upsampling == "soft"
    video, objects = render_video(31, frames=12, size=(128, 160))
    plan = clip_plan(len(video), model.cfg.clip_len, model.cfg.overlap)
    ious = {}
    for mode in ("reference", "soft"):
        seg = Segmenter(model, options=SegmenterOptions(mask_upsampling=mode))
        frames = list(seg.propagate(_windows(video, plan), plan, 128, 160))
        geom = geometry(128, 160, model.cfg.min_dim, model.cfg.max_dim)
        blocky = all(np.array_equal(masks_to_frame(torch.from_numpy(m[1::4, 1::4]), geom, 4).numpy(), m)
                     for fr in frames for m in fr.masks())
        assert blocky == (mode == "reference"), mode
        best = []  # each object's best mask IoU per frame
        for fr in frames:
            masks = fr.masks()
            for o in objects:
                gt = o["masks"][fr.index]
                if gt.any() and len(masks):
                    best.append(max((m & gt).sum() / (m | gt).sum() for m in masks))
        ious[mode] = float(np.mean(best))
    assert ious["soft"] > ious["reference"], ious
