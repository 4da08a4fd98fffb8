"""Clip-to-clip track chaining, online: each clip's labels are matched to the tracks on the
frames it shares with the previous clip, by IoU and the Hungarian solver, as the original does.

Details that decide identities on ties, reproduced from the original:
- rows and columns of the assignment are ordered as Python iterates the set of ids the original
  builds (`label_order`), which for ints is not sorted order and depends on the values;
- IoU is float32 and the cost is float32 `1 - IoU`;
- a clip's instances are numbered from one more than the highest track id in any frame
  finalised so far (`next_track_id`): ids of new labels that were renamed onto existing tracks
  are given out again, so later ids, and with them the set order, follow the original's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def label_order(labels: Tensor) -> list[int]:
    """The ids in `labels` (0 and -1 left out) in the order the original's assignment uses.

    The original builds `set(sorted unique labels of the foreground pixels) - {-1}`. Set
    iteration order depends on the table's size and history, so the set is built from exactly
    that list: foreground pixels never carry 0, and putting 0 in would change the order.
    """
    ids = [i for i in torch.unique(labels).tolist() if i != 0]
    return list(set(ids) - {-1})


def _index_in(values: Tensor, ids: list[int]) -> Tensor:
    """Position of each value in `ids`, -1 where absent."""
    keys = torch.tensor(ids, dtype=values.dtype, device=values.device)
    order = torch.argsort(keys)
    pos = torch.searchsorted(keys[order], values).clamp(max=len(ids) - 1)
    return torch.where(keys[order][pos] == values, order[pos], -1)


def match_labels(previous: Tensor, current: Tensor, min_iou: float | None = None) -> dict[int, int]:
    """new label -> existing track id, from the same frames labelled by both clips.

    With `min_iou` None every pair the Hungarian solver returns is linked, even at IoU 0 (the
    original); otherwise pairs below it stay apart.
    """
    old_ids, new_ids = label_order(previous), label_order(current)
    if not old_ids or not new_ids:
        return {}
    n_old, n_new = len(old_ids), len(new_ids)
    p = _index_in(previous.reshape(-1), old_ids)
    c = _index_in(current.reshape(-1), new_ids)
    # Exact integer counts: intersections per pair (the extra last bin collects the rest).
    pair = torch.where((p >= 0) & (c >= 0), p * n_new + c, n_old * n_new)
    inter = torch.bincount(pair, minlength=n_old * n_new + 1)[:-1].view(n_old, n_new)
    area_old = torch.bincount(p + 1, minlength=n_old + 1)[1:]
    area_new = torch.bincount(c + 1, minlength=n_new + 1)[1:]
    union = area_old[:, None] + area_new[None, :] - inter
    # float32 like the original: ties in 1 - IoU decide identities.
    iou = inter.to(torch.float32) / union.to(torch.float32)
    cost = (1.0 - iou).cpu().numpy()
    iou = iou.cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return {new_ids[j]: old_ids[i] for i, j in zip(rows.tolist(), cols.tolist())
            if min_iou is None or iou[i, j] >= min_iou}


def _rename(labels: Tensor, mapping: dict[int, int]) -> Tensor:
    if not mapping:
        return labels
    keys = sorted(mapping)
    vals = torch.tensor([mapping[k] for k in keys], dtype=labels.dtype, device=labels.device)
    idx = _index_in(labels, keys)
    return torch.where(idx >= 0, vals[idx.clamp(min=0)], labels)


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
        """The id to number the next clip's instances from (cluster_clip's next_label)."""
        return self._next

    def add_clip(self, frame_indices: Sequence[int], labels: Tensor) -> list[tuple[int, Tensor]]:
        """labels: [T, h, w] from cluster_clip(next_label=next_track_id) for these frames.

        Returns (frame index, [h, w] int64 track map) for the frames this clip is the first to
        contain, in frame order.
        """
        frames = list(frame_indices)
        if len(frames) != labels.shape[0]:
            raise ValueError(f"{len(frames)} frame indices for {labels.shape[0]} label maps")
        # A video shorter than a clip is padded in front with copies of frame 0: the last copy
        # sits at frame 0's real place in the sequence, and the original keeps its labels too
        # (it writes every copy in turn).
        position = {f: i for i, f in enumerate(frames)}
        shared = [f for f in position if f in self._previous]
        fresh = sorted(f for f in position if f not in self._previous)
        self.last_mapping = {}
        if shared and fresh:
            self.last_mapping = match_labels(
                torch.stack([self._previous[f] for f in shared]),
                torch.stack([labels[position[f]] for f in shared]),
                self.min_iou,
            )
        out: list[tuple[int, Tensor]] = []
        if fresh:
            # Every position of a fresh frame, padded copies included, counts towards the next
            # id, as the original's track container sees them all.
            is_fresh = torch.tensor([f not in self._previous for f in frames], device=labels.device)
            renamed = _rename(labels, self.last_mapping)
            self._next = max(self._next, int(renamed[is_fresh].max()) + 1)
            out = [(f, renamed[position[f]]) for f in fresh]
        self._previous = {f: self._previous[f] for f in shared} | dict(out)
        return out

    def state(self) -> tuple[int, dict[int, Tensor]]:
        """What the next clip needs: the next free id and the last clip's track maps."""
        return self._next, dict(self._previous)

    def load_state(self, next_track_id: int, previous: dict[int, Tensor]) -> None:
        self._next, self._previous = next_track_id, dict(previous)
