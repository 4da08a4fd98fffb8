from __future__ import annotations

import torch

from service.pipeline.stitching import TrackChainer, match_labels


def _clip(t: int, regions: dict[int, tuple[slice, slice]], h: int = 4, w: int = 6) -> torch.Tensor:
    m = torch.zeros(t, h, w, dtype=torch.int64)
    for label, (ys, xs) in regions.items():
        m[:, ys, xs] = label
    return m


def test_first_clip_labels_are_track_ids_and_frames_come_once_in_order() -> None:
    ch = TrackChainer()
    out = ch.add_clip([0, 1, 2, 3], _clip(4, {1: (slice(0, 2), slice(0, 3)), 2: (slice(2, 4), slice(3, 6))}))
    assert [f for f, _ in out] == [0, 1, 2, 3]
    assert ch.next_track_id == 3
    out2 = ch.add_clip([2, 3, 4, 5], _clip(4, {3: (slice(0, 2), slice(0, 3)), 4: (slice(2, 4), slice(3, 6))}))
    assert [f for f, _ in out2] == [4, 5]  # shared frames were already final


def test_matched_labels_renamed_unmatched_stay_new() -> None:
    ch = TrackChainer()
    ch.add_clip([0, 1], _clip(2, {1: (slice(0, 2), slice(0, 3))}))
    labels = _clip(2, {2: (slice(0, 2), slice(0, 3))})
    labels[1, 3, 5] = 3  # a new object appears on the non-shared frame only
    out = dict(ch.add_clip([1, 2], labels))
    assert out[2][0, 0] == 1 and out[2][3, 5] == 3
    assert ch.next_track_id == 4


def test_zero_iou_pairs_link_in_reference_mode_but_not_with_min_iou() -> None:
    prev = _clip(1, {1: (slice(0, 2), slice(0, 2))})
    cur = _clip(1, {5: (slice(2, 4), slice(4, 6))})  # disjoint
    assert match_labels(prev, cur) == {5: 1}
    assert match_labels(prev, cur, min_iou=0.1) == {}


def test_hungarian_prefers_best_overlap() -> None:
    prev = _clip(1, {1: (slice(0, 4), slice(0, 3)), 2: (slice(0, 4), slice(3, 6))})
    cur = _clip(1, {7: (slice(0, 4), slice(3, 6)), 8: (slice(0, 4), slice(0, 3))})
    assert match_labels(prev, cur) == {7: 2, 8: 1}


def test_unassigned_and_background_are_never_matched() -> None:
    prev = torch.full((1, 2, 2), -1, dtype=torch.int64)
    cur = torch.zeros(1, 2, 2, dtype=torch.int64)
    assert match_labels(prev, cur) == {}


def test_video_shorter_than_a_clip_uses_the_last_copy_of_frame_zero() -> None:
    labels = torch.zeros(4, 2, 2, dtype=torch.int64)
    labels[1, 0, 0] = 9  # an early padded copy
    labels[2, 1, 1] = 4  # frame 0 at its real place
    out = TrackChainer().add_clip([0, 0, 0, 1], labels)
    assert [f for f, _ in out] == [0, 1]
    assert out[0][1][1, 1] == 4 and out[0][1][0, 0] == 0
