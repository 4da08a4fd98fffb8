"""Live sources: the stream clip plan, the live session, real protocols served on loopback."""

from __future__ import annotations

import pytest
import torch
from frames import moving_frames

from service.model.checkpoint import load_model
from service.pipeline.clips import StreamPlan, clip_plan
from service.pipeline.live import stream_windows
from service.pipeline.runner import PipelineOptions, Segmenter
from service.video.decode import Frame


@pytest.mark.parametrize(("clip_len", "overlap"), [(8, 4), (16, 6), (8, 0), (5, 4)])
def test_stream_plan_ends_as_the_file_plan(clip_len: int, overlap: int) -> None:
    for n in range(1, 3 * clip_len + 3):
        plan = StreamPlan(clip_len, overlap)
        for i in range(n):
            plan.add_frame()
            # A frame's last clip is told only once no clip still to come can contain it.
            for f in range(i + 1):
                last = plan.last_use(f)
                if last is not None:
                    assert last == max(k for k, c in enumerate(clip_plan(n, clip_len, overlap)) if f in c)
        plan.end()
        assert plan.clips == clip_plan(n, clip_len, overlap)


def test_stream_windows_give_the_file_plans_tracks(small_weights) -> None:
    model = load_model(small_weights)
    cfg = model.cfg
    for n in (5, 8, 13, 22):
        images = moving_frames(n, 48, 64, seed=n)
        plan = clip_plan(n, cfg.clip_len, cfg.overlap)
        file_seg = Segmenter(model)
        windows = ((k, [Frame(i, None, images[i]) for i in clip]) for k, clip in enumerate(plan))
        expected = {f.index: (f.track_ids, f.rles, f.track_map) for f in file_seg.propagate(windows, plan, 48, 64)}

        stream = StreamPlan(cfg.clip_len, cfg.overlap)
        live_seg = Segmenter(model, pipeline=PipelineOptions.serial())
        got = {}
        for f in live_seg.propagate(stream_windows((Frame(i, None, im) for i, im in enumerate(images)), stream),
                                    stream, 48, 64):
            got[f.index] = (f.track_ids, f.rles, f.track_map)
        assert sorted(got) == list(range(n))
        for i in range(n):
            assert got[i][0] == expected[i][0] and got[i][1] == expected[i][1]
            assert torch.equal(got[i][2], expected[i][2])
        assert live_seg.result().num_frames == n
        assert [t.masks for t in live_seg.result().tracks] == [t.masks for t in file_seg.result().tracks]
