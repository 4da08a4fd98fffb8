"""Running a chain vector through our clustering and chaining, and comparing track maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from service.pipeline.clustering import ClusteringConfig, cluster_clip
from service.pipeline.track_matching import TrackChainer


def run_chain_vector(path: Path, secondary: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """Our [N, h, w] track labels for a chain_*.npz, and the reference's."""
    z = np.load(path)
    meta = json.loads(z["meta_json"].item())
    c = meta["clustering"]
    cfg = ClusteringConfig(
        primary_prob_thresh=c["primary_prob_thresh"], secondary_prob_thresh=c["secondary_prob_thresh"],
        min_seediness_prob=c["min_seediness_prob"], max_instances=c["max_instances"],
        free_dim_stds=tuple(meta["free_dim_stds"]), secondary=secondary,
    )
    fg = torch.from_numpy(z["fg_masks"]).bool()
    chainer = TrackChainer()
    ours = np.zeros(z["track_labels"].shape, dtype=np.int64)
    for k, frames in enumerate(z["clip_frames"].tolist()):
        labels = cluster_clip(
            torch.from_numpy(z["embeddings"][k]), torch.from_numpy(z["bandwidths"][k]),
            torch.from_numpy(z["seediness"][k]), fg[frames], cfg, next_label=chainer.next_track_id,
        )
        for f, track_map in chainer.add_clip(frames, labels):
            ours[f] = track_map.numpy()
    return ours, z["track_labels"]


def assert_same_up_to_renaming(ours: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to a one-to-one renaming of positive ids; 0 and -1 exactly."""
    assert ours.shape == ref.shape
    for special in (0, -1):
        diff = (ours == special) != (ref == special)
        assert not diff.any(), f"label {special} differs at {int(diff.sum())} pixels"
    pos = ref > 0
    pairs = np.unique(np.stack([ref[pos], ours[pos]], 1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1])), (
        f"not a one-to-one renaming: reference->ours pairs {pairs.tolist()}"
    )


def track_stats(track_labels: np.ndarray) -> tuple[dict[int, int], dict[int, int]]:
    """Per id (including -1): pixel count and lifetime (last frame - first frame)."""
    counts, lifetimes = {}, {}
    for tid in np.unique(track_labels):
        if tid == 0:
            continue
        frames = np.nonzero((track_labels == tid).any(axis=(1, 2)))[0]
        counts[int(tid)] = int((track_labels == tid).sum())
        lifetimes[int(tid)] = int(frames[-1] - frames[0])
    return counts, lifetimes
