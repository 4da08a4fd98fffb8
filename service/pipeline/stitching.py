"""Clip-to-clip track chaining, online: each clip's labels are matched to the tracks on the
frames it shares with the previous clip, by IoU and the Hungarian solver, as the original does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def _ids(labels: Tensor) -> list[int]:
    # Rows and columns follow the iteration order of the Python set the original builds:
    # ties in the assignment are decided by it, and for ints it is not sorted order.
    return list(set(torch.unique(labels).tolist()) - {-1, 0})


def match_labels(
    previous: Tensor, current: Tensor, min_iou: float | None = None
) -> dict[int, int]:
    """new label -> existing track id, from the same frames labelled by both clips."""
    old_ids, new_ids = _ids(previous), _ids(current)
    if not old_ids or not new_ids:
        return {}
    old = previous.reshape(1, -1) == torch.tensor(old_ids, device=previous.device).view(-1, 1)
    new = current.reshape(1, -1) == torch.tensor(new_ids, device=current.device).view(-1, 1)
    inter = (old.float() @ new.float().T).cpu().numpy()
    union = old.sum(1).cpu().numpy()[:, None] + new.sum(1).cpu().numpy()[None, :] - inter
    # float32 like the original: ties in 1 - IoU decide identities.
    iou = (inter / union).astype(np.float32)
    rows, cols = linear_sum_assignment(np.float32(1) - iou)
    return {
        new_ids[c]: old_ids[r] for r, c in zip(rows, cols) if min_iou is None or iou[r, c] >= min_iou
    }


class TrackChainer:
    """Feed clips in order; get each frame's final track map once, as soon as it is known.

    A frame's labels are fixed by the first clip that contains it (later clips only use it to
    match), so only the previous clip's maps are kept.
    """

    def __init__(self, min_iou: float | None = None) -> None:
        self.min_iou = min_iou  # None: link every Hungarian pair, even at IoU 0 (the original)
        self._next = 1
        self._previous: dict[int, Tensor] = {}
        self.last_mapping: dict[int, int] = {}  # the last clip's renamed labels -> track ids

    @property
    def next_track_id(self) -> int:
        return self._next

    def add_clip(self, frame_indices: Sequence[int], labels: Tensor) -> list[tuple[int, Tensor]]:
        """labels: [T, h, w] from cluster_clip(next_label=next_track_id) for these frames."""
        frames = list(frame_indices)
        # A clip shorter than the video pads with copies of frame 0: the last copy is the frame
        # at its real place in the sequence.
        position = {f: i for i, f in enumerate(frames)}
        shared = [f for f in position if f in self._previous]
        fresh = sorted(f for f in position if f not in self._previous)
        out: list[tuple[int, Tensor]] = []
        self.last_mapping = {}
        if fresh:
            if shared:
                mapping = match_labels(
                    torch.stack([self._previous[f] for f in shared]),
                    torch.stack([labels[position[f]] for f in shared]),
                    self.min_iou,
                )
                self.last_mapping = mapping
                lut_keys = torch.tensor(list(mapping), dtype=torch.int64, device=labels.device)
                lut_vals = torch.tensor(list(mapping.values()), dtype=torch.int64, device=labels.device)
            for f in fresh:
                m = labels[position[f]]
                if shared and len(mapping):
                    hit = m.unsqueeze(-1) == lut_keys
                    m = torch.where(hit.any(-1), (hit.long() * lut_vals).sum(-1), m)
                out.append((f, m))
        self._previous = {f: self._previous[f] for f in shared} | dict(out)
        # Ids of labels that were renamed onto existing tracks are free again, as in the original.
        if out:
            self._next = max(self._next, int(torch.stack([m for _, m in out]).max()) + 1)
        return out

    def state(self) -> tuple[int, dict[int, Tensor]]:
        """What the next clip needs: the next free id and the last clip's track maps."""
        return self._next, dict(self._previous)

    def load_state(self, next_track_id: int, previous: dict[int, Tensor]) -> None:
        self._next, self._previous = next_track_id, dict(previous)
