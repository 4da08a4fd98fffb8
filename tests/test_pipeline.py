"""The streaming pipeline against the core functions run directly, the way the original does:
every clip through the whole network, all evidence kept, then clustering and chaining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from frames import moving_frames

from service.jobs.encoding import stitcher_from_bytes, stitcher_to_bytes
from service.model.checkpoint import load_model
from service.pipeline.clips import clip_plan, context_range
from service.pipeline.clustering import ClusteringConfig, cluster_clip
from service.pipeline.preprocess import geometry, masks_to_frame, preprocess
from service.pipeline.runner import ClipProcessor, Segmenter
from service.pipeline.stitcher import Stitcher
from service.pipeline.track_matching import TrackChainer


class _Frame:
    def __init__(self, index: int, image: np.ndarray) -> None:
        self.index, self.image = index, image


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
def test_streaming_equals_direct(small_model, preset: str, n: int) -> None:
    model = small_model(preset)
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


def test_chunked_processing_with_saved_stitcher_state_equals_one_pass(small_model) -> None:
    """What the service does: clip groups on different workers, stitched from saved state."""
    model = small_model("kitti_mots")
    n = 29
    images = moving_frames(n, 48, 64)
    plan = clip_plan(n, model.cfg.clip_len, model.cfg.overlap)
    one = Segmenter(model)
    expected = {f.index: f for f in one.propagate(_windows(images, plan), plan, 48, 64)}

    state = stitcher_to_bytes(Stitcher(keep_masks=False))
    got = {}
    for a, b in [(0, 2), (2, 5), (5, len(plan))]:
        windows = ((k, [_Frame(i, images[i]) for i in plan[k]]) for k in context_range(plan, a, b))
        clips = list(ClipProcessor(model).run(windows, plan, 48, 64, cluster=range(a, b)))
        assert [c.index for c in clips] == list(range(a, b))
        for clip in clips:
            st = stitcher_from_bytes(state)
            got.update({f.index: f for f in st.add(clip)})
            state = stitcher_to_bytes(st)
    assert sorted(got) == list(range(n))
    for f in range(n):
        assert torch.equal(got[f].track_map, expected[f].track_map)
        assert got[f].track_ids == expected[f].track_ids and got[f].rles == expected[f].rles
    final = stitcher_from_bytes(state)
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


# --- the scheduling options: threads and batching never change the outputs -------

def _run(model, images, plan, pipeline):
    from service.pipeline.runner import PipelineOptions  # noqa: F401

    seg = Segmenter(model, pipeline=pipeline)
    frames = list(seg.propagate(_windows(images, plan), plan, *images[0].shape[:2]))
    return frames, seg.result()


@pytest.mark.parametrize("preset, n, per_forward", [("kitti_mots", 29, 3), ("youtube_vis", 21, 2), ("davis", 17, 4)])
def test_threaded_and_batched_pipeline_equals_serial(small_model, preset: str, n: int, per_forward: int) -> None:
    from service.pipeline.runner import PipelineOptions

    model = small_model(preset)
    images = moving_frames(n, 48, 64)
    plan = clip_plan(n, model.cfg.clip_len, model.cfg.overlap)
    serial, serial_result = _run(model, images, plan, PipelineOptions.serial())
    assert serial_result.tracks
    for options in (PipelineOptions(), PipelineOptions(prefetch=1, clips_per_forward=per_forward, post_workers=1)):
        frames, result = _run(model, images, plan, options)
        assert [f.index for f in frames] == list(range(n))
        for a, b in zip(frames, serial):
            assert torch.equal(a.track_map, b.track_map) and a.track_ids == b.track_ids and a.rles == b.rles
        assert [(t.id, t.pixels, t.first_frame, t.last_frame) for t in result.tracks] == [
            (t.id, t.pixels, t.first_frame, t.last_frame) for t in serial_result.tracks]


def test_prefetch_reraises_the_producers_error_and_stops_when_closed() -> None:
    import threading

    from service.pipeline.prefetch import prefetch

    def broken():
        yield 1
        raise ValueError("decode failed")

    it = prefetch(broken(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="decode failed"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), 3)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert not any(t.name == "stemseg-prefetch" for t in threading.enumerate())
    assert len(produced) <= 5 + 3 + 2  # bounded: at most the queue's depth beyond what was taken


def test_pipeline_error_mid_video_surfaces_and_leaves_no_threads(small_model) -> None:
    import threading

    model = small_model("kitti_mots")
    images = moving_frames(13, 48, 64)
    plan = clip_plan(13, model.cfg.clip_len, model.cfg.overlap)

    def windows():
        yield from list(_windows(images, plan))[:1]
        raise OSError("the video ended early")

    with pytest.raises(OSError, match="ended early"):
        list(Segmenter(model).propagate(windows(), plan, 48, 64))
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("stemseg-prefetch", "stemseg-post"))]


@pytest.mark.parametrize("secondary", ["reference", "corrected"])
def test_clustering_without_host_reads_gives_the_same_labels(secondary: str) -> None:
    """The device-flag loop (what CUDA runs) against the early-exit loop on the reference clips,
    with the cap hit and not hit."""
    from pathlib import Path

    from service.pipeline.clustering import ClusteringConfig, cluster_clip

    ref = Path(__file__).parent / "fixtures" / "reference"
    checked = 0
    for path in sorted(ref.glob("chain_*.npz")):
        z = np.load(path)
        for k, frames in enumerate(z["clip_frames"].tolist()):
            args = [torch.from_numpy(z[name][k]) for name in ("embeddings", "bandwidths", "seediness")]
            fg = torch.from_numpy(z["fg_masks"][frames]).bool()
            for cap in (20, 2, 1):
                cfg = ClusteringConfig(max_instances=cap, secondary=secondary)
                a = cluster_clip(*args, fg, cfg, host_reads=True)
                b = cluster_clip(*args, fg, cfg, host_reads=False)
                assert torch.equal(a, b), (path.name, k, cap)
                checked += int((a > 0).any())
    assert checked > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: proves clustering queues without syncs")
def test_cuda_clustering_makes_no_per_instance_host_syncs() -> None:
    """torch.cuda.set_sync_debug_mode('warn') warns on every synchronising call: the count must
    not grow with the number of instances (the foreground gather's reads per clip remain)."""
    import warnings

    from service.pipeline.clustering import ClusteringConfig, cluster_clip

    def syncs(instances: int) -> tuple[int, int]:
        centers = [(i / instances, 0.0, 0.0, 0.0) for i in range(instances)]
        emb = torch.zeros(4, 2, 8, 8 * instances)
        for i, c in enumerate(centers):
            emb[:, :, :, 8 * i:8 * (i + 1)] = torch.tensor(c).view(4, 1, 1, 1) * 10
        args = [emb.cuda(), torch.full((2, 2, 8, 8 * instances), 10.0, device="cuda"),
                torch.full((1, 2, 8, 8 * instances), 0.9, device="cuda"),
                torch.ones(2, 8, 8 * instances, dtype=torch.bool, device="cuda")]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                labels = cluster_clip(*args, ClusteringConfig())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return len(caught), int(labels.max())

    few, n_few = syncs(2)
    many, n_many = syncs(12)
    assert (n_few, n_many) == (2, 12)
    # A few per clip (gathering the foreground pixels, staging constants), none per instance.
    assert few == many and few <= 8, (few, many)


def test_bf16_autocast_runs_on_cpu_and_tracks_agree_with_fp32(lite_weights) -> None:
    """bf16 autocast on the CPU (what the GPU's tensor cores run, the same rounding): float32
    outputs, and the tracks of a synthetic video match fp32's (matched-track mask IoU)."""
    from service.evaluation.agreement import track_agreement
    from service.model.engines import TorchEngine
    from service.training.synth import render_video

    model = load_model(lite_weights)
    video, _ = render_video(5, frames=12, size=(128, 160))
    plan = clip_plan(len(video), model.cfg.clip_len, model.cfg.overlap)
    results = {}
    for dtype in ("off", "bf16"):
        engine = TorchEngine(model, autocast=dtype)
        seg = Segmenter(engine)
        list(seg.propagate(_windows(video, plan), plan, 128, 160))
        results[dtype] = seg.result()
    from service.model.stemseg import stack_clip

    bf16 = TorchEngine(model, autocast="bf16")
    with torch.inference_mode():
        out = bf16.clip_heads([stack_clip(f) for f in bf16.frame_features(torch.zeros(model.cfg.clip_len, 3, 64, 96))])
    assert out.embeddings.dtype == torch.float32
    agreement = track_agreement(results["off"], results["bf16"])
    assert agreement["reference_tracks"] >= 2
    assert agreement["mean_matched_iou"] >= 0.9, agreement
