"""Segment a video from Python in two calls: open it with a model, then iterate its frames' tracks.

    from service.pipeline.session import load, open_video

    model = load()                                   # the shipped model; or load("youtube_vis.pth")
    video = open_video("examples/sample.mp4", model)
    for frame in video.propagate():                  # FrameTracks, in frame order, as clips are chained
        frame.index, frame.track_ids, frame.masks()  # masks(): [tracks, H, W] bool at the video's size
    result = video.result()                          # VideoResult: every track, scores, RLE masks

The shape is SAM 2's (`init_state`, then `propagate_in_video`): opening probes the video (bad
files fail here, before any work) and makes the clip plan; propagating decodes clip windows,
runs the network and clustering, and chains clips (`service.pipeline.runner.Segmenter`). The CLI's
`segment` and `bench` and `stemseg eval` all go through this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from service.config import get_settings
from service.model.engine_spec import EngineSpec
from service.model.engines import Engine, build_engine
from service.pipeline.clips import clip_plan
from service.pipeline.handover import FrameTracks
from service.pipeline.runner import PipelineOptions, Segmenter, SegmenterOptions
from service.pipeline.timing import StageTimer
from service.pipeline.tracks import VideoResult
from service.video import VideoInfo, iter_clip_windows, iter_frames, probe


def load(weights: str | Path | None = None, *, preset: str | None = None, device: str = "auto",
         min_dim: int | None = None, autocast: str | None = None, compile: bool | str = False,
         tf32: bool | None = None) -> Engine:
    """The torch engine for a weights file, an official name fetched with `stemseg weights fetch`, or
    (None) the shipped model; on `device` ("auto": CUDA when usable). `autocast` ("bf16", "fp16")
    and `compile` (a torch.compile mode), and on CUDA `tf32=True`, trade exact fp32 outputs for speed.
    `tf32` sets PyTorch's process-wide TF32 flags (False: off for matmuls and convolutions alike);
    None leaves them as the calling program has them."""
    if isinstance(compile, bool):
        compile = "default" if compile else "off"
    return build_engine(EngineSpec(weights=weights, preset=preset, device=device, min_dim=min_dim,
                                   autocast=autocast or "off", compile=compile, tf32=tf32))


class VideoSession:
    """One video opened with one model: its probe and clip plan, ready to propagate."""

    def __init__(self, path: str | Path, engine: Engine, *, options: SegmenterOptions | None = None,
                 timer: StageTimer | None = None, max_pixels: int | None = None,
                 pipeline: PipelineOptions | None = None) -> None:
        self.path = Path(path)
        self.engine = engine
        self.max_pixels = max_pixels or get_settings().max_frame_pixels
        self.info: VideoInfo = probe(self.path, max_pixels=self.max_pixels)
        self.plan = clip_plan(self.info.num_frames, engine.cfg.clip_len, engine.cfg.overlap)
        self.segmenter = Segmenter(engine, device=engine.device, options=options, timer=timer, pipeline=pipeline)

    @property
    def timer(self) -> StageTimer:
        return self.segmenter.timer

    def propagate(self, *, preload: bool = False) -> Iterator[FrameTracks]:
        """Every frame's tracks once, in frame order. Decoding is charged to the timer's "decode"
        stage; with preload every frame is decoded before the network runs (benchmarks)."""
        timer = self.segmenter.timer
        if preload:
            with timer("decode"):
                frames = {f.index: f for f in iter_frames(self.path, max_pixels=self.max_pixels)}
            windows = ((k, [frames[i] for i in clip]) for k, clip in enumerate(self.plan))
        else:
            windows = timer.wrap("decode", iter_clip_windows(self.path, self.plan, max_pixels=self.max_pixels))
        yield from self.segmenter.propagate(windows, self.plan, self.info.height, self.info.width)

    def result(self) -> VideoResult:
        """The tracks after propagate() has run to the end."""
        return self.segmenter.result(fps=self.info.fps)

    def frames(self) -> Iterator[np.ndarray]:
        """The video's frames again (BGR uint8), e.g. for the overlay output."""
        return (f.image for f in iter_frames(self.path, max_pixels=self.max_pixels))


def open_video(path: str | Path, engine: Engine, *, options: SegmenterOptions | None = None,
               timer: StageTimer | None = None, max_pixels: int | None = None,
               pipeline: PipelineOptions | None = None) -> VideoSession:
    """Probe a video (VideoError for a bad file) and plan its clips for `engine`; `pipeline` says
    how the work is scheduled (threads, batching), never what comes out."""
    return VideoSession(path, engine, options=options, timer=timer, max_pixels=max_pixels, pipeline=pipeline)


def segment(path: str | Path, engine: Engine, *, options: SegmenterOptions | None = None) -> VideoResult:
    """Both calls at once, for when only the final tracks matter."""
    video = open_video(path, engine, options=options)
    for _ in video.propagate():
        pass
    return video.result()


__all__ = ["FrameTracks", "SegmenterOptions", "VideoSession", "load", "open_video", "segment"]
