from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_checks import assert_same_up_to_renaming, run_chain_vector, track_stats

from service.pipeline.track_matching import TrackChainer, label_order, match_labels

REFERENCE_DIR = Path(os.environ.get("STEMSEG_REFERENCE_DIR", Path(__file__).parent / "fixtures" / "reference"))
CHAINS = sorted(REFERENCE_DIR.glob("chain_*.npz"))


def _clip(t: int, regions: dict[int, tuple[slice, slice]], h: int = 4, w: int = 6) -> torch.Tensor:
    m = torch.zeros(t, h, w, dtype=torch.int64)
    for label, (ys, xs) in regions.items():
        m[:, ys, xs] = label
    return m


LEFT, RIGHT = (slice(0, 4), slice(0, 3)), (slice(0, 4), slice(3, 6))


def test_first_clip_labels_are_track_ids_and_frames_come_once_in_order() -> None:
    ch = TrackChainer()
    out = ch.add_clip([0, 1, 2, 3], _clip(4, {1: LEFT, 2: RIGHT}))
    assert [f for f, _ in out] == [0, 1, 2, 3]
    assert ch.next_track_id == 3
    out2 = ch.add_clip([2, 3, 4, 5], _clip(4, {3: LEFT, 4: RIGHT}))
    assert [f for f, _ in out2] == [4, 5]  # shared frames were already final
    assert all(m.dtype == torch.int64 and m.shape == (4, 6) for _, m in out + out2)
    assert ch.add_clip([4, 5], _clip(2, {3: LEFT})) == []


def test_matched_labels_renamed_unmatched_stay_new() -> None:
    ch = TrackChainer()
    ch.add_clip([0, 1], _clip(2, {1: LEFT}))
    labels = _clip(2, {2: LEFT})
    labels[1, 3, 5] = 3  # a new object appears on the non-shared frame only
    labels[1, 0, 5] = -1
    out = dict(ch.add_clip([1, 2], labels))
    assert out[2][0, 0] == 1 and out[2][3, 5] == 3 and out[2][0, 5] == -1 and out[2][0, 4] == 0
    assert ch.last_mapping == {2: 1}
    assert ch.next_track_id == 4


def test_ids_of_renamed_labels_are_given_out_again() -> None:
    # The original numbers a clip from the highest id in finalised frames + 1; labels renamed
    # onto existing tracks never reach a frame, so their ids are free again.
    ch = TrackChainer()
    ch.add_clip([0, 1], _clip(2, {1: LEFT, 2: RIGHT}))
    ch.add_clip([1, 2], _clip(2, {3: LEFT, 4: RIGHT}))
    assert ch.next_track_id == 3


def test_zero_iou_pairs_link_in_reference_mode_but_not_with_min_iou() -> None:
    prev = _clip(1, {1: (slice(0, 2), slice(0, 2))})
    cur = _clip(1, {5: (slice(2, 4), slice(4, 6))})  # disjoint
    assert match_labels(prev, cur) == {5: 1}
    assert match_labels(prev, cur, min_iou=0.1) == {}
    ch = TrackChainer(min_iou=0.1)
    ch.add_clip([0, 1], torch.cat([prev, prev]))
    out = dict(ch.add_clip([1, 2], torch.cat([cur, cur])))
    assert out[2][2, 4] == 5 and ch.next_track_id == 6


def test_hungarian_prefers_best_overlap() -> None:
    prev = _clip(1, {1: LEFT, 2: RIGHT})
    cur = _clip(1, {7: RIGHT, 8: LEFT})
    assert match_labels(prev, cur) == {7: 2, 8: 1}


def test_unassigned_and_background_are_never_matched() -> None:
    prev = torch.full((1, 2, 2), -1, dtype=torch.int64)
    cur = torch.zeros(1, 2, 2, dtype=torch.int64)
    assert match_labels(prev, cur) == {}


def test_label_order_is_the_originals_set_order() -> None:
    # The original iterates set(sorted foreground labels) - {-1}; a set that also held 0 (the
    # background, which it never sees) can iterate differently, e.g. for these ids.
    ids = [40, 41, 43, 45, 46, 48, 50, 51, 54, 55, 56, 61, 63, 66, 73]
    assert label_order(torch.tensor([0, *ids, 0])) == list(set(ids) - {-1})
    ids = [181, 182, 184, 185, 189, 190, 192, 193]
    assert label_order(torch.tensor([0, -1, *ids])) == list(set([-1, *ids]) - {-1})  # noqa: C405 (as the original)
    assert label_order(torch.tensor([8, 1])) == [8, 1]  # not sorted


def test_ties_go_to_the_first_id_in_set_order_with_float32_costs() -> None:
    # Track 1 overlaps the new label c slightly better than track 8 (IoU 0.448337679 vs
    # 0.448337647), but the float32 costs are equal, and 8 comes first in the set {1, 8}.
    sizes = [(1, 9, 2751), (8, 9, 2252), (1, -1, 1133), (8, -1, 20)]
    prev = torch.cat([torch.full((n,), a) for a, _, n in sizes])
    cur = torch.cat([torch.full((n,), b) for _, b, n in sizes])
    assert match_labels(prev.view(1, 1, -1), cur.view(1, 1, -1)) == {9: 8}


def test_video_shorter_than_a_clip_uses_the_last_copy_of_frame_zero() -> None:
    labels = torch.zeros(4, 2, 2, dtype=torch.int64)
    labels[1, 0, 0] = 9  # an early padded copy
    labels[2, 1, 1] = 4  # frame 0 at its real place
    ch = TrackChainer()
    out = ch.add_clip([0, 0, 0, 1], labels)
    assert [f for f, _ in out] == [0, 1]
    assert out[0][1][1, 1] == 4 and out[0][1][0, 0] == 0
    assert ch.next_track_id == 10  # the original's container saw every copy


def test_state_round_trip() -> None:
    a, b = TrackChainer(), TrackChainer()
    a.add_clip([0, 1, 2], _clip(3, {1: LEFT}))
    b.load_state(*a.state())
    nxt = _clip(3, {2: LEFT, 3: RIGHT})
    assert [(f, m.tolist()) for f, m in a.add_clip([1, 2, 3], nxt)] == [
        (f, m.tolist()) for f, m in b.add_clip([1, 2, 3], nxt)
    ]


@pytest.mark.parametrize("path", CHAINS, ids=[p.name for p in CHAINS])
def test_chain_vector(path: Path) -> None:
    ours, ref = run_chain_vector(path)
    assert_same_up_to_renaming(ours, ref)
    # Stronger: our numbering is the original's, so ids and per-id statistics match exactly.
    meta = json.loads(np.load(path)["meta_json"].item())
    counts, lifetimes = track_stats(ours)
    assert counts == {int(k): v for k, v in meta["track_point_counts"].items()}
    assert lifetimes == {int(k): v for k, v in meta["track_lifetimes"].items()}
    assert np.array_equal(ours, ref)


def test_chain_vectors_present() -> None:
    assert CHAINS, f"no chain_*.npz in {REFERENCE_DIR}"
