"""Segmenting a live source as it arrives: each frame's tracks as soon as its clip is chained.

    reader = LiveReader(url, LiveOptions.from_settings(settings), clip_len=engine.cfg.clip_len)
    session = LiveSession(reader, engine)
    reader.start()
    for frame in session.propagate():        # LiveFrameTracks, in arrival order
        frame.index, frame.track_ids, frame.latency_s
    result = session.result()                # VideoResult of every frame handed over

Each run of consecutive frames (service.video.live: a run ends at a reconnect or a dropped clip)
is planned like a file of the same frames (service.pipeline.clips.StreamPlan): the same clips and
overlaps, the last clip planned when the run ends, so a file played live gives the file's tracks.
A frame's clip can be clustered only once no clip still to come contains any of its frames, so
a frame is emitted one clip length (and up to one clip step more) after its clip's frames have
arrived, plus the processing. Track ids of a run continue after the previous run's highest: a
gap cuts chaining, it never joins two objects into one id.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from service.model.engines import Engine
from service.pipeline.clips import StreamPlan
from service.pipeline.runner import PipelineOptions, Segmenter, SegmenterOptions
from service.pipeline.timing import StageTimer
from service.pipeline.tracks import Track, VideoResult
from service.video.decode import Frame
from service.video.live import RUN_END, LiveFrame, LiveReader


@dataclass
class LiveFrameTracks:
    index: int  # over every frame handed over, from 0 (the outputs' frame number)
    run: int
    sequence: int  # the source's frame number, dropped frames counted
    pts_seconds: float | None  # the source's timestamp
    wall: float  # unix time of its arrival
    arrival: float  # time.monotonic() of its arrival
    emitted: float  # time.monotonic() when its tracks were final
    track_ids: list[int]
    rles: list[dict]
    # So far: the class the track's evidence up to this frame gives, and its pixels relative to
    # the largest track's so far. The outputs' are decided at the end, over the whole stream.
    categories: list[int]
    scores: list[float]

    @property
    def latency_s(self) -> float:
        return self.emitted - self.arrival

    def to_json(self, class_names: dict[int, str] | None = None) -> dict:
        """One JSON line's worth: RLE counts as text, as results.json has them."""
        tracks = []
        for tid, cat, score, rle in zip(self.track_ids, self.categories, self.scores, self.rles):
            counts = rle["counts"]
            entry = {"id": tid, "category_id": cat}
            if class_names is not None:
                entry["category"] = class_names.get(cat)
            text = counts.decode() if isinstance(counts, bytes) else counts
            entry.update(score=round(score, 4), rle={"size": list(rle["size"]), "counts": text})
            tracks.append(entry)
        return {"frame": self.index, "run": self.run, "source_frame": self.sequence, "pts": self.pts_seconds,
                "time": round(self.wall, 6), "latency_s": round(self.latency_s, 4), "tracks": tracks}


def stream_windows(frames: Iterable[Frame], plan: StreamPlan) -> Iterator[tuple[int, list[Frame]]]:
    """Clip windows of frames as they arrive, planning each clip as its last frame comes in and
    the final one when `frames` ends; holds only the frames a clip still to come may need."""
    held: dict[int, Frame] = {}
    done = -1
    for frame in frames:
        held[frame.index] = frame
        for k in plan.add_frame():
            yield k, [held[f] for f in plan[k]]
            done = k
        for f in [f for f in held if (last := plan.last_use(f)) is not None and last <= done]:
            del held[f]
    for k in plan.end():
        yield k, [held[f] for f in plan[k]]


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


class LiveSession:
    """One live source through one model; see the module docstring."""

    def __init__(self, reader: LiveReader, engine: Engine, *, options: SegmenterOptions | None = None,
                 timer: StageTimer | None = None, first_track_id: int = 1) -> None:
        """`first_track_id`: where track ids start (the service's takeover of a stream continues
        after the ids its previous worker gave)."""
        self.reader, self.engine = reader, engine
        self.options = options
        self.timer = timer or StageTimer(engine.device)
        # Inline post-processing: a finished clip is emitted at once, not when the next one arrives.
        self.pipeline = PipelineOptions.serial()
        self.latencies: list[float] = []
        self._tracks: list[Track] = []
        self._frames = 0
        self._next_id = first_track_id
        self._height = self._width = 0
        self.runs = 0
        self.clips = 0

    def propagate(self) -> Iterator[LiveFrameTracks]:
        """Every frame handed over, with its tracks, in arrival order, until the source ends."""
        items = iter(self.reader)
        while True:
            first = next(items, None)
            while first is RUN_END:
                first = next(items, None)
            if first is None:
                return
            yield from self._run(first, items)

    def _run(self, first: LiveFrame, items: Iterator) -> Iterator[LiveFrameTracks]:
        meta: dict[int, LiveFrame] = {}

        def frames() -> Iterator[Frame]:
            item = first
            while isinstance(item, LiveFrame):
                # The image goes to the pipeline; what the frame's line needs stays here.
                meta[item.frame.index] = LiveFrame(Frame(item.frame.index, item.frame.pts_seconds, None),
                                                   item.run, item.sequence, item.arrival, item.wall)
                yield item.frame
                item = next(items, None)

        height, width = first.frame.image.shape[:2]
        if self.runs == 0:
            self._height, self._width = height, width
        self.runs += 1
        offset_frames, offset_ids = self._frames, self._next_id - 1
        seg = Segmenter(self.engine, options=self.options, timer=self.timer, pipeline=self.pipeline)
        plan = StreamPlan(self.engine.cfg.clip_len, self.engine.cfg.overlap)
        for ft in seg.propagate(stream_windows(frames(), plan), plan, height, width):
            lf = meta.pop(ft.index)
            tracks = seg.tracks
            top = max((t.pixels for t in tracks.values()), default=0)
            cats = [tracks[t].category() for t in ft.track_ids]
            scores = [tracks[t].pixels / top if top else 0.0 for t in ft.track_ids]
            out = LiveFrameTracks(offset_frames + ft.index, lf.run, lf.sequence, lf.frame.pts_seconds, lf.wall,
                                  lf.arrival, time.monotonic(), [t + offset_ids for t in ft.track_ids], ft.rles,
                                  cats, scores)
            self.latencies.append(out.latency_s)
            yield out
        self.clips += len(plan)
        self._absorb(seg.result(), offset_frames, offset_ids)

    def _absorb(self, run: VideoResult, offset_frames: int, offset_ids: int) -> None:
        """A finished run's tracks, renumbered into the whole stream's frames and ids."""
        for t in run.tracks:
            track = Track(t.id + offset_ids, t.first_frame + offset_frames, t.last_frame + offset_frames,
                          t.pixels, t.class_logit_sum, t.class_votes,
                          {f + offset_frames: rle for f, rle in t.masks.items()})
            self._tracks.append(track)
            self._next_id = max(self._next_id, track.id + 1)
        self._frames += run.num_frames

    def result(self) -> VideoResult:
        """Every frame handed over and every track, once propagate() has ended."""
        cfg = self.engine.cfg
        return VideoResult(num_frames=self._frames, height=self._height, width=self._width, fps=self.reader.fps,
                           classes=dict(cfg.classes), max_tracks=cfg.max_tracks, tracks=list(self._tracks))

    def summary(self) -> dict:
        """What the run measured: frames, drops, reconnects, latency from arrival to emission."""
        stats = self.reader.stats
        return {
            "source": self.reader.name, "frames": self._frames, "runs": self.runs, "clips": self.clips,
            "frames_read": stats.frames_read, "frames_dropped": stats.frames_dropped,
            "clips_dropped": stats.clips_dropped, "reconnects": stats.reconnects, "gaps": stats.gaps,
            "ended_by": stats.ended_by, "backlog_policy": self.reader.options.backlog,
            "latency_s": {"p50": _percentile(self.latencies, 50), "p95": _percentile(self.latencies, 95),
                          "max": round(max(self.latencies), 4) if self.latencies else None},
        }


__all__ = ["LiveFrameTracks", "LiveSession", "stream_windows"]
