from __future__ import annotations

import pytest

from service.pipeline.clips import clip_plan, context_range, last_use


@pytest.mark.parametrize("n", [1, 3, 7])
def test_shorter_than_a_clip_pads_with_frame_zero(n: int) -> None:
    assert clip_plan(n, 8, 4) == [[0] * (8 - n) + list(range(n))]


def test_exactly_one_clip() -> None:
    assert clip_plan(8, 8, 4) == [list(range(8))]


def test_one_more_than_a_clip_anchors_a_last_clip_at_the_end() -> None:
    assert clip_plan(9, 8, 4) == [list(range(8)), list(range(1, 9))]


def test_long_video() -> None:
    plan = clip_plan(1000, 16, 6)
    starts = [c[0] for c in plan]
    assert starts[:3] == [0, 10, 20]
    assert starts[:-1] == list(range(0, 981, 10))
    assert plan[-1] == list(range(984, 1000))
    assert sorted({f for c in plan for f in c}) == list(range(1000))
    assert all(len(c) == 16 for c in plan)


def test_regular_plan_ends_exactly() -> None:
    # 4 + 4k frames with T=8, O=4: the last regular clip already ends at N-1.
    assert clip_plan(12, 8, 4) == [list(range(8)), list(range(4, 12))]


def test_last_use() -> None:
    assert last_use(clip_plan(9, 8, 4)) == {0: 0, **{f: 1 for f in range(1, 9)}}


@pytest.mark.parametrize("n, t, o", [(0, 8, 4), (5, 8, 8), (5, 8, -1)])
def test_invalid(n: int, t: int, o: int) -> None:
    with pytest.raises(ValueError):
        clip_plan(n, t, o)


def test_context_range_covers_every_clip_sharing_a_frame() -> None:
    plan = clip_plan(29, 8, 4)  # starts 0, 4, ..., 20 and a final clip at 21
    assert context_range(plan, 0, 2) == range(3)
    assert context_range(plan, 4, 5) == range(3, 7)  # frame 23 is also in the anchored clip 6
    assert context_range(plan, 6, 7) == range(4, 7)
