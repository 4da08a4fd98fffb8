"""Instance clustering of a clip's spatio-temporal embeddings, as the original does it.

Seeds are taken greedily by seediness; each claims the unassigned foreground pixels whose
Gaussian probability under the seed's embedding and bandwidth exceeds a threshold. Everything
is vectorised over pixels; the loop runs once per instance with a single host read (the seed's
seediness, which decides whether to stop).
"""

from __future__ import annotations

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


def _probs(emb: Tensor, centers: Tensor, bandwidths: Tensor) -> Tensor:
    """[P, E] pixels against [K, E] instances -> [P, K] probabilities exp(-0.5 * distance)."""
    d = ((emb.unsqueeze(1) - centers.unsqueeze(0)).pow(2) * bandwidths.unsqueeze(0)).sum(-1).sqrt()
    return torch.exp(-0.5 * d)


def cluster_clip(
    embeddings: Tensor,
    bandwidths: Tensor,
    seediness: Tensor,
    fg_mask: Tensor,
    cfg: ClusteringConfig,
    next_label: int = 1,
) -> Tensor:
    """Label a clip's pixels: [E|V|1, T, h, w] maps and a [T, h, w] foreground mask -> [T, h, w]
    int64 with 0 background, -1 foreground left unassigned, instances numbered from next_label."""
    device = embeddings.device
    fg = fg_mask.to(device=device, dtype=torch.bool)
    labels = torch.zeros(fg.shape, dtype=torch.int64, device=device)
    labels[fg] = -1
    if not bool(fg.any()):
        return labels
    emb = embeddings.permute(1, 2, 3, 0)[fg]  # [P, E]
    bw = bandwidths.permute(1, 2, 3, 0)[fg]  # [P, V]
    seed = seediness.reshape(fg.shape)[fg]  # [P]
    if cfg.free_dim_stds:
        free = torch.tensor([1.0 / s**2 for s in cfg.free_dim_stds], dtype=bw.dtype, device=device)
        bw = torch.cat((bw, free.expand(bw.shape[0], -1)), 1)

    pix_labels = torch.full((emb.shape[0],), -1, dtype=torch.int64, device=device)
    unassigned = torch.ones(emb.shape[0], dtype=torch.bool, device=device)
    centers, widths = [], []
    neg_inf = torch.tensor(float("-inf"), dtype=seed.dtype, device=device)
    while True:
        masked = torch.where(unassigned, seed, neg_inf)
        idx = torch.argmax(masked)
        # The one host read per instance: stop when no unassigned pixel is seed-worthy.
        if float(masked[idx]) < cfg.min_seediness_prob:
            break
        center, width = emb[idx], bw[idx]
        claim = unassigned & (_probs(emb, center[None], width[None])[:, 0] > cfg.primary_prob_thresh)
        pix_labels[claim] = next_label + len(centers)
        centers.append(center)
        widths.append(width)
        if cfg.max_instances is not None and len(centers) >= cfg.max_instances:
            # The original stops before updating its unassigned set, so the secondary pass
            # below still sees (and may relabel) the pixels this last instance just took.
            break
        unassigned &= ~claim  # when none are left, the next seediness read is -inf and stops

    if centers and bool(unassigned.any()):
        left = unassigned.nonzero()[:, 0]
        probs = _probs(emb[left], torch.stack(centers), torch.stack(widths))  # [L, K]
        if cfg.secondary == "reference":
            # Largest distance = smallest probability: the original's bug, reproduced.
            pick = torch.argmin(probs, 1)
        else:
            pick = torch.argmax(probs, 1)
        best = probs.gather(1, pick[:, None])[:, 0]
        ok = best > cfg.secondary_prob_thresh
        pix_labels[left[ok]] = next_label + pick[ok]

    labels[fg] = pix_labels
    return labels
