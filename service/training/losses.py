"""STEm-Seg's training losses, on one clip's head outputs at stride 4.

For every instance the centre is the mean embedding of its pixels and the bandwidth the mean
predicted bandwidth (free dimensions fixed); every pixel's probability of belonging to it is
the same function clustering uses at inference, exp(-0.5 * distance). A Lovász hinge on those
probabilities trains the embeddings and bandwidths; seediness regresses towards each pixel's
probability under its own instance (zero on background); bandwidths are pulled towards their
instance mean; the semseg head gets cross-entropy over classes and a foreground BCE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss (Berman et al., 2018)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_hinge(logits: Tensor, labels: Tensor) -> Tensor:
    """Flat logits and {0, 1} labels -> the Lovász hinge."""
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, perm = torch.sort(errors, descending=True)
    return torch.dot(F.relu(errors_sorted), lovasz_grad(labels[perm]))


@dataclass
class LossWeights:
    embedding: float = 1.0
    seediness: float = 1.0
    smoothness: float = 10.0
    semseg: float = 1.0
    foreground: float = 1.0


def _foreground_loss(logit: Tensor, classes: Tensor, full: Tensor | None) -> Tensor:
    if full is None:
        return F.binary_cross_entropy_with_logits(logit.reshape(-1), (classes.reshape(-1) > 0).float())
    up = F.interpolate(logit.unsqueeze(1), scale_factor=4.0, mode="bilinear", align_corners=False)[:, 0]
    return F.binary_cross_entropy_with_logits(up, full.to(up.dtype))


def clip_losses(emb: Tensor, bw: Tensor, seed: Tensor, semseg: Tensor, instances: Tensor, classes: Tensor,
                free_dim_stds: tuple[float, ...], w: LossWeights | None = None,
                foreground: Tensor | None = None) -> dict[str, Tensor]:
    """emb [E,T,h,w], bw [V,T,h,w] (exp(x)*10), seed [1,T,h,w], semseg [C+1,T,h,w];
    instances [T,h,w] (0 background, k>0 instance), classes [T,h,w] (0 background).

    `foreground` [T,4h,4w] bool, when given, is the full-size target of the foreground logit
    upsampled x4 as inference does: it teaches outlines finer than the stride-4 grid."""
    w = w or LossWeights()
    E = emb.shape[0]
    e = emb.reshape(E, -1).T  # [P, E]
    b = bw.reshape(bw.shape[0], -1).T
    if free_dim_stds:
        free = torch.tensor([1 / s**2 for s in free_dim_stds], device=b.device, dtype=b.dtype)
        b_full = torch.cat((b, free.expand(b.shape[0], -1)), 1)
    else:
        b_full = b
    ids = instances.reshape(-1)
    seed_flat = seed.reshape(-1)
    seed_target = torch.zeros_like(seed_flat)
    lov, smooth = [], []
    for k in torch.unique(ids).tolist():
        if k == 0:
            continue
        member = ids == k
        centre = e[member].mean(0)
        width = b_full[member].mean(0)
        d = ((e - centre).pow(2) * width).sum(1).clamp_min(1e-8).sqrt()
        prob = torch.exp(-0.5 * d)
        lov.append(lovasz_hinge(2 * prob - 1, member.float()))
        seed_target[member] = prob[member].detach()
        smooth.append((b[member] / 10 - width[: b.shape[1]].detach() / 10).pow(2).mean())
    zero = emb.sum() * 0
    out = {
        "embedding": w.embedding * (torch.stack(lov).mean() if lov else zero),
        "seediness": w.seediness * F.mse_loss(seed_flat, seed_target),
        "smoothness": w.smoothness * (torch.stack(smooth).mean() if smooth else zero),
        "semseg": w.semseg * F.cross_entropy(semseg[:-1].reshape(semseg.shape[0] - 1, -1).T, classes.reshape(-1)),
        "foreground": w.foreground * _foreground_loss(semseg[-1], classes, foreground),
    }
    out["total"] = sum(out.values())
    return out
