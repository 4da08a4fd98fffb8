"""Dynamic batching across concurrent jobs gives every job exactly its unbatched tracks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from frames import moving_frames

from service.model.batching import DynamicBatcher
from service.pipeline.clips import clip_plan
from service.pipeline.runner import PipelineOptions, Segmenter


class _Frame:
    def __init__(self, index: int, image: np.ndarray) -> None:
        self.index, self.image = index, image


def _segment(engine, images: list[np.ndarray], pipeline: PipelineOptions | None = None):
    plan = clip_plan(len(images), engine.cfg.clip_len, engine.cfg.overlap)
    seg = Segmenter(engine, pipeline=pipeline)
    windows = ((k, [_Frame(i, images[i]) for i in clip]) for k, clip in enumerate(plan))
    frames = list(seg.propagate(windows, plan, *images[0].shape[:2]))
    return [(f.index, f.track_ids, f.rles, f.track_map) for f in frames]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a, b))


def _concurrently(fn, n: int, timeout_s: float) -> None:
    """fn(0) ... fn(n-1) on n threads started together; the first error is raised here, and a
    thread still running after timeout_s is a failure (a hung caller must not pass for done)."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait()
            fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"{len(hung)} of {n} callers still running after {timeout_s} s"


@pytest.mark.parametrize("preset", ["kitti_mots", pytest.param("youtube_vis", marks=pytest.mark.slow)])
def test_four_concurrent_jobs_batched_equal_their_unbatched_runs(small_model, preset: str) -> None:
    model = small_model(preset)
    # Four different videos (shifted content, different lengths), one resolution.
    videos = [moving_frames(n, 48, 64)[shift:] for n, shift in ((17, 0), (21, 3), (13, 1), (25, 5))]
    expected = [_segment(model, v) for v in videos]
    assert any(f[1] for e in expected for f in e), "the test needs tracks to be meaningful"

    batcher = DynamicBatcher(model, max_batch=16, max_delay_s=0.05)
    got: list = [None] * len(videos)

    def job(i: int) -> None:
        got[i] = _segment(batcher, videos[i], PipelineOptions(post_workers=1))

    try:
        _concurrently(job, len(videos), 300)
    finally:
        batcher.close()
    for i, (a, b) in enumerate(zip(got, expected)):
        assert _same(a, b), f"job {i} differs from its unbatched run"
    stats = batcher.stats
    # Requests really were merged: fewer forwards than requests, for both halves of the network.
    for op in ("backbone", "heads"):
        assert stats.forwards[op] < stats.requests[op], stats


def test_batches_respect_max_batch_and_only_merge_equal_shapes(small_model) -> None:
    model = small_model("kitti_mots")
    batcher = DynamicBatcher(model, max_batch=6, max_delay_s=0.2)
    inputs = [torch.randn(n, 3, h, 64) for n, h in ((4, 64), (4, 64), (2, 96), (3, 64))]
    out: list = [None] * len(inputs)

    def call(i: int) -> None:
        with torch.inference_mode():
            out[i] = batcher.frame_features(inputs[i])

    try:
        _concurrently(call, len(inputs), 60)
    finally:
        batcher.close()
    with torch.inference_mode():
        for x, got in zip(inputs, out):
            ref = model.frame_features(x)
            assert [g.shape for g in got] == [r.shape for r in ref]
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    assert batcher.stats.requests["backbone"] == 4
    # No two of the 64-high requests (4, 4, 3 frames) fit in 6 together, and the 96-high one never joins
    # them: exactly four forwards. Ignoring max_batch would give fewer, merging across shapes would fail.
    assert batcher.stats.items["backbone"] == 13 and batcher.stats.forwards["backbone"] == 4


def test_an_engine_error_reaches_every_caller_of_that_forward() -> None:
    class Broken:
        cfg = None
        device = torch.device("cpu")
        calls = 0

        def frame_features(self, images):
            Broken.calls += 1
            raise RuntimeError("out of memory")

    # Three callers, one shape, a long delay and room for all: one forward, and each caller must
    # get its failure (none left waiting, none handed a result).
    batcher = DynamicBatcher(Broken(), max_batch=4, max_delay_s=1.0)
    raised: list[str] = []

    def call(i: int) -> None:
        try:
            batcher.frame_features(torch.zeros(1, 3, 32, 32))
        except RuntimeError as e:
            raised.append(str(e))

    try:
        _concurrently(call, 3, 30)
    finally:
        batcher.close()
    assert raised == ["out of memory"] * 3 and Broken.calls == 1
