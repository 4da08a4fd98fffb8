from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_checks import run_chain_vector

from service.pipeline.clustering import ClusteringConfig, cluster_clip, free_dim_bandwidths

CFG = ClusteringConfig()
REFERENCE_DIR = Path(os.environ.get("STEMSEG_REFERENCE_DIR", Path(__file__).parent / "fixtures" / "reference"))


def _maps(centers: list[tuple[float, ...]], t: int = 2, h: int = 6, w: int = 8, seed_val: float = 0.9):
    """Embeddings with one blob per centre laid out in vertical stripes, constant bandwidths."""
    emb = torch.zeros(4, t, h, w)
    stripe = w // max(len(centers), 1)
    for i, c in enumerate(centers):
        emb[:, :, :, i * stripe:(i + 1) * stripe] = torch.tensor(c).view(4, 1, 1, 1)
    bw = torch.full((2, t, h, w), 10.0)
    seed = torch.full((1, t, h, w), seed_val)
    return emb, bw, seed


def _row(xs: list[float], seeds: list[float]):
    """One frame, one row of pixels whose embeddings differ only in dim 0 (unit bandwidths)."""
    n = len(xs)
    emb = torch.zeros(4, 1, 1, n)
    emb[0, 0, 0] = torch.tensor(xs, dtype=torch.float32)
    return emb, torch.ones(2, 1, 1, n), torch.tensor(seeds).view(1, 1, 1, n), torch.ones(1, 1, n, dtype=torch.bool)


UNIT = ClusteringConfig(free_dim_stds=(1.0, 1.0))


def test_no_foreground_is_all_background() -> None:
    emb, bw, seed = _maps([(0, 0, 0, 0)])
    out = cluster_clip(emb, bw, seed, torch.zeros(2, 6, 8, dtype=torch.bool), CFG, next_label=5)
    assert out.dtype == torch.int64 and out.shape == (2, 6, 8) and (out == 0).all()


def test_one_pixel() -> None:
    emb, bw, seed = _maps([(0, 0, 0, 0)])
    fg = torch.zeros(2, 6, 8, dtype=torch.bool)
    fg[1, 3, 4] = True
    out = cluster_clip(emb, bw, seed, fg, CFG, next_label=7)
    assert out[1, 3, 4] == 7 and (out[~fg] == 0).all()


def test_seediness_below_threshold_leaves_foreground_unassigned() -> None:
    emb, bw, seed = _maps([(0, 0, 0, 0)], seed_val=0.79)
    fg = torch.ones(2, 6, 8, dtype=torch.bool)
    fg[:, 0] = False
    out = cluster_clip(emb, bw, seed[0], fg, CFG)  # [T, h, w] seediness accepted too
    assert (out[fg] == -1).all() and (out[~fg] == 0).all()


def test_seediness_threshold_compared_in_float32() -> None:
    # float32(0.95) is just below 0.95; the original compares in float32, so it still seeds.
    emb, bw, seed, fg = _row([0.0], [float(np.float32(0.95))])
    assert cluster_clip(emb, bw, seed, fg, replace(CFG, min_seediness_prob=0.95)).item() == 1


def test_free_dim_bandwidths_in_float32() -> None:
    assert free_dim_bandwidths((0.2,)).item() == pytest.approx(24.999998, abs=1e-6)
    # A pixel offset only in a free dim by 1.8425015: its float32 distance is 9.2125072 with
    # the float32 bandwidth 24.999998 (the original) and one ulp more, 9.2125082, with 25.
    # At a threshold between the two exact probabilities (2 and 3 float32 ulps from each, so
    # exp's last-bit rounding, which differs between CPUs, cannot decide it) only the
    # original's bandwidth keeps the pixel in the seed's instance.
    offset = 1.8425015211105347
    inside, outside = math.exp(-0.5 * 9.212507247924805), math.exp(-0.5 * 9.212508201599121)
    emb = torch.zeros(4, 1, 1, 2)
    emb[2, 0, 0, 1] = offset
    seed = torch.tensor([0.9, 0.1]).view(1, 1, 1, 2)
    cfg = ClusteringConfig(free_dim_stds=(0.2, 0.2), primary_prob_thresh=(inside + outside) / 2,
                           secondary_prob_thresh=0.99)
    out = cluster_clip(emb, torch.ones(2, 1, 1, 2), seed, torch.ones(1, 1, 2, dtype=torch.bool), cfg)
    assert out[0, 0].tolist() == [1, 1]


def test_separated_blobs_get_one_label_each_from_next_label() -> None:
    emb, bw, seed = _maps([(-1, -1, 0, 0), (0, 0, 0, 0), (1, 1, 0, 0), (1, -1, 0, 0)])
    out = cluster_clip(emb, bw, seed, torch.ones(2, 6, 8, dtype=torch.bool), CFG, next_label=10)
    stripes = [out[:, :, i * 2:(i + 1) * 2] for i in range(4)]
    assert sorted(int(s.unique()) for s in stripes) == [10, 11, 12, 13]


def test_seediness_ties_take_the_first_pixel_in_frame_order() -> None:
    # Both pixels are equally seedy. With the frame-0 pixel as the centre (unit bandwidth) the
    # other, 1.0 away, is claimed (p = 0.61); the other way round (bandwidth 100) it would not be.
    emb = torch.zeros(4, 2, 1, 1)
    emb[0, 1] = 1.0
    bw = torch.ones(2, 2, 1, 1)
    bw[:, 1] = 100.0
    out = cluster_clip(emb, bw, torch.full((1, 2, 1, 1), 0.9), torch.ones(2, 1, 1, dtype=torch.bool), UNIT)
    assert out.flatten().tolist() == [1, 1]


def _many(n: int):
    """n well-separated instances, one pixel column each, seediness decreasing left to right."""
    w = n
    emb = torch.zeros(4, 1, 2, w)
    emb[0, 0, :, :] = torch.arange(w, dtype=torch.float32) * 3.0
    bw = torch.full((2, 1, 2, w), 10.0)
    seed = (0.99 - 0.001 * torch.arange(w, dtype=torch.float32)).view(1, 1, 1, w).expand(1, 1, 2, w).clone()
    return emb, bw, seed, torch.ones(1, 2, w, dtype=torch.bool)


def test_more_than_twenty_instances_capped() -> None:
    emb, bw, seed, fg = _many(24)
    out = cluster_clip(emb, bw, seed, fg, CFG)
    assert set(out.unique().tolist()) == set(range(1, 21)) | {-1}
    assert (out[..., 20:] == -1).all()
    unlimited = cluster_clip(emb, bw, seed, fg, ClusteringConfig(max_instances=None))
    assert set(unlimited.unique().tolist()) == set(range(1, 25))
    assert (cluster_clip(emb, bw, seed, fg, ClusteringConfig(max_instances=0)) == -1).all()


def test_cap_lets_the_secondary_pass_relabel_the_last_instances_pixels() -> None:
    # A at 0, B at 2.6, Q at 1.6: A does not claim Q (p = 0.45); B does (p = 0.61). When B is
    # the last instance the cap allows, the original's secondary pass still sees Q as
    # unassigned and gives it to the farthest instance, A (p = 0.45 > 0.3).
    emb, bw, seed, fg = _row([0.0, 1.6, 2.6], [0.95, 0.1, 0.9])
    assert cluster_clip(emb, bw, seed, fg, replace(UNIT, max_instances=2)).flatten().tolist() == [1, 1, 2]
    assert cluster_clip(emb, bw, seed, fg, replace(UNIT, max_instances=3)).flatten().tolist() == [1, 2, 2]
    fixed = replace(UNIT, max_instances=2, secondary="corrected")
    assert cluster_clip(emb, bw, seed, fg, fixed).flatten().tolist() == [1, 2, 2]


def test_secondary_pass_reference_takes_farthest_instance_corrected_nearest() -> None:
    # A at 0 and B at 1.2; a leftover pixel at 0.45 is too far from both for the primary
    # threshold but within the secondary one of both. The original assigns it to the farther
    # instance (B); corrected assigns it to A.
    emb, bw, seed, fg = _row([0.0, 1.2, 0.45], [0.95, 0.9, 0.1])
    cfg = replace(UNIT, primary_prob_thresh=0.8, secondary_prob_thresh=0.6)
    assert cluster_clip(emb, bw, seed, fg, cfg)[0, 0].tolist() == [1, 2, 2]
    assert cluster_clip(emb, bw, seed, fg, replace(cfg, secondary="corrected"))[0, 0].tolist() == [1, 2, 1]


def test_secondary_pass_picks_by_distance_not_by_rounded_probability() -> None:
    # The leftover pixel is 1.5000001 from A and 1.5000002 from B: distinct distances whose
    # float32 probabilities (0.47237) are equal or one ulp apart, depending on the CPU's exp
    # rounding. The original takes the max *distance*: B, on every CPU.
    d_a, d_b = 1.5000001192092896, 1.500000238418579
    p_a, p_b = torch.exp(torch.tensor(-0.5 * d_a)), torch.exp(torch.tensor(-0.5 * d_b))
    assert 0 <= p_a - p_b <= torch.finfo(torch.float32).eps / 4  # one float32 ulp in [0.25, 0.5)
    emb, bw, seed, fg = _row([d_a, -d_b, 0.0], [0.95, 0.9, 0.1])
    assert cluster_clip(emb, bw, seed, fg, UNIT)[0, 0].tolist() == [1, 2, 2]


HARD = sorted(REFERENCE_DIR.glob("chain_hard_*.npz"))


@pytest.mark.parametrize("path", HARD, ids=[p.name for p in HARD])
def test_corrected_secondary_assigns_at_least_as_many_pixels(path: Path) -> None:
    ref, _ = run_chain_vector(path)
    fixed, _ = run_chain_vector(path, secondary="corrected")
    assert (fixed == -1).sum() <= (ref == -1).sum()
    assert ((fixed == 0) == (ref == 0)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("path", sorted(REFERENCE_DIR.glob("chain_*.npz"))[:2], ids=lambda p: p.name)
def test_cuda_matches_cpu(path: Path) -> None:
    z = np.load(path)
    for k, frames in enumerate(z["clip_frames"].tolist()):
        args = [torch.from_numpy(z[name][k]) for name in ("embeddings", "bandwidths", "seediness")]
        fg = torch.from_numpy(z["fg_masks"][frames]).bool()
        cpu = cluster_clip(*args, fg, CFG)
        gpu = cluster_clip(*[a.cuda() for a in args], fg.cuda(), CFG)
        assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu())
