"""Moving a job on from whichever worker finished a piece of it.

A job is three kinds of work on the one task queue: clip tasks (network and clustering, any
worker, any order), stitching (in clip order, by whoever holds the job's lease when a clip
lands), and output tasks (one range of frames each, any worker, all at once), then a short
finishing step. The order of events:

1. A clip task writes its clips' results, then calls `clips_written`: under the job's lease the
   stitcher state is loaded, every consecutive clip result that exists is chained on, each
   clip's frame tracks are stored (`frames/{k}.json`, before the state that says the clip is
   done, so a crash between the two only repeats identical writes) and announced in one Redis
   round trip. Nobody waits for the lease: its holder looks again after releasing it, so a clip
   written while it held the lease is never left behind.
2. The lease holder that chains the last clip decides the labels (service.outputs.labels: a pass
   over the tracks' accumulators, no frames), stores them and enqueues the output tasks.
3. An output task renders its range (service.outputs.render: decode, draw, encode, the per-frame
   cost), then calls `range_rendered`; the one that finds every range done finishes the job
   under the lease: parts joined (remux and concatenation, no per-pixel work), the output
   committed atomically, and the job marked succeeded with its tracks announced in the same
   Redis step, fenced by the lease's token so no second worker can finish it. An output task
   that finds the lease held (the stitcher that queued it, still releasing) leaves the finishing
   to the holder, which looks again once it has released it.

Every step is idempotent, so a task redelivered after a crash (SIGKILL mid-render included)
repeats its work and the job ends with the same files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import redis

from service.jobs import files
from service.jobs.encoding import (
    clip_from_bytes,
    frames_from_bytes,
    frames_to_bytes,
    stitcher_from_bytes,
    stitcher_to_bytes,
)
from service.jobs.file_cache import FileCache
from service.jobs.lease import Lease
from service.jobs.lifecycle import Jobs
from service.jobs.record import JobRecord
from service.jobs.storage import Storage
from service.model.presets import ModelConfig
from service.outputs.labels import Labels
from service.outputs.names import MANIFEST
from service.outputs.render import RangeMasks, assemble, part_name, ranges, render_range
from service.outputs.write import publish_output
from service.pipeline.clips import clip_plan
from service.pipeline.runner import first_clip
from service.pipeline.stitcher import Stitcher
from service.pipeline.tracks import VideoResult
from service.video import iter_frame_range

log = logging.getLogger("stemseg.coordinator")


class LeaseLost(Exception):
    """The job's lease lapsed while this worker held it (it stalled): another worker carries on."""


class JobCoordinator:
    def __init__(self, r: redis.Redis, jobs: Jobs, storage: Storage, cfg: ModelConfig, *,
                 render_frames: int = 120, lock_ttl_s: float = 20.0, max_pixels: int | None = None,
                 record: Callable[[str, dict], None] | None = None, videos: FileCache | None = None) -> None:
        self.r, self.jobs, self.storage, self.cfg = r, jobs, storage, cfg
        # Local copies of job videos (the overlay decodes them); with shared paths, the files themselves.
        self.videos = videos or FileCache.of(storage, 0)
        self.render_frames = render_frames
        self.lock_ttl_s = lock_ttl_s
        self.max_pixels = max_pixels
        self.record = record or (lambda job_id, entry: None)

    def _lease(self, job_id: str) -> Lease:
        return Lease(self.r, self.jobs.keys.lock(job_id), self.lock_ttl_s)

    # -- stitching ---------------------------------------------------------------------------
    def clips_written(self, job_id: str) -> None:
        """Stitch what can be stitched, if nobody else is at it (they look again after releasing)."""
        while True:
            lease = self._lease(job_id)
            if not lease.acquire():
                return
            with lease:
                self._stitch(job_id, lease)
            job = self.jobs.get(job_id)
            if job is None or job.final:
                return
            if job.outputs_queued:
                # An output task that ended while this worker held the lease left the finishing
                # to the holder (range_rendered does not wait): look now that it is released.
                self.range_rendered(job_id)
                return
            nxt = job.stitched
            if nxt >= job.num_clips or not self.storage.exists(job_id, files.clip_file(nxt)):
                return  # else a clip landed while the lease was held: stitch it too

    def _stitch(self, job_id: str, lease: Lease) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.final:
            return
        st = (stitcher_from_bytes(self.storage.read(job_id, files.STITCH_STATE))
              if self.storage.exists(job_id, files.STITCH_STATE) else Stitcher(job.min_iou, keep_masks=False))
        while st.next_clip < job.num_clips and self.storage.exists(job_id, files.clip_file(st.next_clip)):
            started = time.time()
            clip = clip_from_bytes(self.storage.read(job_id, files.clip_file(st.next_clip)))
            frames = st.add(clip)
            self.storage.write(job_id, files.frames_file(clip.index), frames_to_bytes(frames))
            self.storage.write(job_id, files.STITCH_STATE, stitcher_to_bytes(st))
            self.jobs.update(job_id, stitched=st.next_clip, frames_done=(frames[-1].index + 1) if frames else
                             job.frames_done)
            self.jobs.events(job_id, [("frame", {"frame": f.index, "track_ids": f.track_ids}) for f in frames])
            self.record(job_id, {"kind": "stitch", "clip": clip.index, "start": started, "end": time.time()})
        if st.next_clip == job.num_clips and not job.outputs_queued:
            self._hand_out_outputs(job_id, job, st, lease)

    def _hand_out_outputs(self, job_id: str, job: JobRecord, st: Stitcher, lease: Lease) -> None:
        """The labels are final now: store them and enqueue one output task per range of frames."""
        result = VideoResult(num_frames=job.num_frames, height=job.height, width=job.width, fps=job.fps,
                             classes=dict(self.cfg.classes), max_tracks=self.cfg.max_tracks,
                             tracks=list(st.tracks.values()))
        labels = Labels.decide(result)
        self.storage.write(job_id, files.LABELS, labels.to_json().encode())
        # At most render_frames per task, and at least four tasks per live worker where the video
        # allows (16 frames or more each), so the last round of tasks leaves no worker idle for long.
        # A cut already recorded (by a stitcher that died before queuing all of it) is kept, so a
        # repeat queues the very same ranges.
        if job.render_frames is not None:
            size = job.render_frames
        else:
            workers = max(self.jobs.live_workers(), 1)
            size = min(self.render_frames, max(16, math.ceil(job.num_frames / (4 * workers))))
        spans = ranges(job.num_frames, size)
        if not lease.held:
            raise LeaseLost(f"the lease of job {job_id} lapsed before its outputs were handed out")
        self.jobs.enqueue_outputs(job_id, spans, size)
        self.record(job_id, {"kind": "stitched", "end": time.time(), "ranges": len(spans)})

    # -- outputs -----------------------------------------------------------------------------
    def render(self, job_id: str, job: JobRecord, start: int, stop: int) -> None:
        """Render frames [start, stop) of the job's formats (an output task)."""
        labels = Labels.from_json(self.storage.read(job_id, files.LABELS).decode())
        formats = job.formats
        masks = self._range_masks(job_id, job, start, stop)
        frames = None
        with ExitStack() as stack:
            if "overlay" in formats:
                video = stack.enter_context(self.videos.local(job_id, files.VIDEO))
                kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
                frames = (f.image for f in iter_frame_range(video, start, stop, **kwargs))
            # Rendered locally, then published with the range's `done` marker last (with shared
            # paths the scratch folder is the render folder itself and publishing costs nothing).
            parts = stack.enter_context(self.storage.scratch(job_id, files.RENDER))
            render_range(labels, formats, masks, frames, start, stop, parts)
            self.storage.publish(job_id, files.RENDER, parts, last=[part_name("done", start)])

    def _range_masks(self, job_id: str, job: JobRecord, start: int, stop: int) -> RangeMasks:
        owner = first_clip(clip_plan(job.num_frames, job.plan.clip_len, job.plan.overlap))
        masks: dict[int, dict[int, dict]] = {f: {} for f in range(start, stop)}
        for k in sorted({owner[f] for f in range(start, stop)}):
            for frame in frames_from_bytes(self.storage.read(job_id, files.frames_file(k))):
                if start <= frame["index"] < stop:
                    masks[frame["index"]] = dict(zip(frame["track_ids"], frame["rles"]))
        return masks

    def range_rendered(self, job_id: str) -> None:
        """After an output task: if every range is rendered, finish the job (unless someone is)."""
        job = self.jobs.get(job_id)
        if job is None or job.final or not self._all_rendered(job_id, job):
            return
        lease = self._lease(job_id)
        if not lease.acquire():
            return  # the holder finishes it, or its own redelivered task will
        with lease:
            self._finish(job_id, lease)

    def _spans(self, job: JobRecord) -> list[tuple[int, int]]:
        return ranges(job.num_frames, job.render_frames)

    def _all_rendered(self, job_id: str, job: JobRecord) -> bool:
        return all(self.storage.exists(job_id, f"{files.RENDER}/{part_name('done', a)}") for a, _ in self._spans(job))

    @contextmanager
    def _out_dir(self, job_id: str) -> Iterator[Path]:
        """Where the finishing step writes the output folder: the job's own `out` with shared
        paths, else an absent folder in local scratch space, published once it is complete."""
        if self.storage.shared_paths:
            yield self.storage.path(job_id, files.OUT)  # type: ignore[attr-defined]
            return
        with self.storage.scratch(job_id, files.OUT) as scratch:
            yield scratch / files.OUT

    def _finish(self, job_id: str, lease: Lease) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.final:
            return
        started = time.time()
        labels = Labels.from_json(self.storage.read(job_id, files.LABELS).decode())
        with self.storage.fetch(job_id, files.RENDER) as parts, self._out_dir(job_id) as out:

            def fill(tmp, formats: list[str]) -> None:
                assemble(labels, formats, parts, self._spans(job), tmp)
                if not lease.held:  # checked right before the only step that replaces what others see
                    raise LeaseLost(f"the lease of job {job_id} lapsed while finishing")

            publish_output(out, job.formats, fill, replace=True)
            # The manifest last: a folder is served only once the job has succeeded, below, and
            # then every file it lists is already there.
            self.storage.publish(job_id, files.OUT, out, last=[MANIFEST])
        stitched = (stitcher_from_bytes(self.storage.read(job_id, files.STITCH_STATE)).tracks)
        tracks = [{"id": t.id, "category_id": t.category, "score": t.score,
                   "first_frame": stitched[t.id].first_frame, "last_frame": stitched[t.id].last_frame}
                  for t in labels.tracks]
        if self.jobs.finish(job_id, tracks, fence=lease.fence):
            self.storage.delete(job_id, files.RENDER)
            self.record(job_id, {"kind": "finish", "start": started, "end": time.time(), "worker": os.getpid()})
