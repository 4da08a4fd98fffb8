"""Instance clustering of a clip's spatio-temporal embeddings, as the original does it.

Seeds are taken greedily by seediness; each claims the unassigned foreground pixels whose
Gaussian probability under the seed's embedding and bandwidth exceeds a threshold. The work is
vectorised over pixels and the loop runs once per instance with a single host read (whether the
next seed is good enough), so the same code runs on CPU and CUDA; on CUDA that read is replaced
by a device-side flag (`host_reads`), so clustering queues its kernels without waiting.

Float semantics follow the original (float32 torch): thresholds are compared in the tensors'
dtype (torch casts a Python scalar to it), the free dims' bandwidths are computed in float32, and
the distance is evaluated with the same op sequence, so decisions match bit for bit on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClusteringConfig:
    primary_prob_thresh: float = 0.5
    secondary_prob_thresh: float = 0.3
    min_seediness_prob: float = 0.8
    max_instances: int | None = 20  # None: unlimited
    free_dim_stds: tuple[float, ...] = (0.3, 0.3)
    # "reference": the original's secondary pass, which picks the *farthest* instance for a
    # leftover pixel (its comment says most probable). "corrected": the most probable one.
    secondary: Literal["reference", "corrected"] = "reference"


def free_dim_bandwidths(stds: Sequence[float], dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Tensor:
    """1 / std^2 per free dim, computed in `dtype` as the original does (for std 0.2 that is
    24.999998, not 25: the difference flips decisions at the threshold)."""
    return 1.0 / torch.tensor(list(stds), dtype=dtype, device=device) ** 2


def _distance(emb: Tensor, center: Tensor, bandwidth: Tensor) -> Tensor:
    # The original's exact op sequence; the sum over the few embedding dims is per-row, so
    # evaluating all pixels instead of only the unassigned ones gives the same values.
    return (torch.pow(emb - center, 2) * bandwidth).sum(dim=-1).sqrt()


def cluster_clip(
    embeddings: Tensor,
    bandwidths: Tensor,
    seediness: Tensor,
    fg_mask: Tensor,
    cfg: ClusteringConfig,
    next_label: int = 1,
    host_reads: bool | None = None,
) -> Tensor:
    """Label a clip's pixels from [E, T, h, w] embeddings, [V, T, h, w] bandwidths, [1, T, h, w]
    (or [T, h, w]) seediness and a [T, h, w] foreground mask. Returns [T, h, w] int64: 0 background,
    -1 foreground left unassigned, instances numbered next_label, next_label + 1, ...

    host_reads (default: on the CPU, or without an instance cap): stop at the first seed below
    the threshold, which costs one host read per instance. Off, the loop always runs the cap's
    iterations with a device-side "still going" flag gating every update, so a GPU never waits
    on the host between instances; the labels are the same either way."""
    device = embeddings.device
    fg = fg_mask.to(device=device, dtype=torch.bool)
    out = torch.zeros(fg.shape, dtype=torch.int64, device=device)
    # Foreground pixels in (t, y, x) order, like the original's per-frame concatenation: the
    # order decides seediness ties (argmax takes the first).
    emb = embeddings.permute(1, 2, 3, 0)[fg]  # [P, E]
    num = emb.shape[0]
    if num == 0:
        return out
    bw = bandwidths.permute(1, 2, 3, 0)[fg]  # [P, V]
    seed = seediness.reshape(fg.shape)[fg]  # [P]
    free = free_dim_bandwidths(cfg.free_dim_stds, bw.dtype, device)

    labels = torch.full((num,), -1, dtype=torch.int64, device=device)
    unassigned = torch.ones(num, dtype=torch.bool, device=device)
    available = unassigned
    # Secondary-pass candidate per pixel, kept as a running extreme over instances instead of
    # the original's stack of distance maps. Strict comparisons keep the first instance on
    # ties, as torch's max(dim) does.
    pick_dist = torch.full((num,), float("-inf") if cfg.secondary == "reference" else float("inf"),
                           dtype=emb.dtype, device=device)
    pick_label = torch.full((num,), -1, dtype=torch.int64, device=device)
    neg_inf = torch.tensor(float("-inf"), dtype=seed.dtype, device=device)
    if host_reads is None:
        host_reads = device.type != "cuda" or cfg.max_instances is None
    # Every instance claims at least its seed pixel, so there are at most `num` of them.
    limit = num if cfg.max_instances is None else cfg.max_instances
    going = torch.ones((), dtype=torch.bool, device=device)
    count = 0
    while count < limit:
        masked = torch.where(unassigned, seed, neg_inf)
        idx = torch.argmax(masked).view(1)  # index_select below: a 0-d index would read the host
        # Compared in the seediness dtype as the original does (0.95 is 0.94999999 in float32);
        # -inf when nothing is left also stops.
        seeded = ~(masked.index_select(0, idx)[0] < cfg.min_seediness_prob)
        # The original's secondary pass uses the unassigned set from the start of its last
        # pass: after the cap that still includes the pixels the last instance took.
        if host_reads:
            available = unassigned
            if not bool(seeded):  # the one host read per instance
                break
        else:
            available = torch.where(going, unassigned, available)
            going = going & seeded
        label = next_label + count
        dist = _distance(emb, emb.index_select(0, idx)[0], torch.cat((bw.index_select(0, idx)[0], free)))
        claim = unassigned & (torch.exp(-0.5 * dist) > cfg.primary_prob_thresh)
        better = dist > pick_dist if cfg.secondary == "reference" else dist < pick_dist
        if not host_reads:
            claim, better = claim & going, better & going
        labels = torch.where(claim, label, labels)
        pick_dist = torch.where(better, dist, pick_dist)
        pick_label = torch.where(better, label, pick_label)
        unassigned = unassigned & ~claim
        count += 1

    if count:
        # Reference: the largest distance (the original's bug); corrected: the smallest. Without
        # host reads no instance may have been taken: then pick_label is -1 everywhere, which
        # leaves the labels as they are.
        second = available & (torch.exp(-0.5 * pick_dist) > cfg.secondary_prob_thresh)
        labels = torch.where(second, pick_label, labels)
    return out.masked_scatter_(fg, labels)
