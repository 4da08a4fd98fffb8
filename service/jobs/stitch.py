"""Advancing a job's stitch in clip order, from whichever worker finishes a clip.

Under a per-job Redis lock the stitcher state is loaded, every consecutive clip result that
exists is chained on, each clip's frame tracks are stored and announced, and the state is
saved. A clip's frame file is written before the state that says it is done, so a crash
between the two only repeats identical writes. When the last clip is in, the outputs are
written (atomically) and the job succeeds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

import numpy as np
import redis

from service.jobs.lifecycle import Jobs, JobStatus
from service.jobs.results import clip_from_bytes, frames_from_bytes, frames_to_bytes
from service.jobs.storage import LocalStorage
from service.model.presets import ModelConfig
from service.outputs import write_outputs
from service.pipeline.runner import Stitcher
from service.pipeline.tracks import VideoResult

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def clip_name(k: int) -> str:
    return f"clips/{k:05d}.npz"


def frames_name(k: int) -> str:
    return f"frames/{k:05d}.json"


class JobStitcher:
    def __init__(self, r: redis.Redis, jobs: Jobs, storage: LocalStorage, cfg: ModelConfig,
                 overlay_frames: Callable[[str], Iterable[np.ndarray]], lock_ttl_s: float = 120.0) -> None:
        self.r, self.jobs, self.storage, self.cfg = r, jobs, storage, cfg
        self.overlay_frames = overlay_frames
        self.lock_ms = int(lock_ttl_s * 1000)

    def advance(self, job_id: str, wait_for_clip: int | None = None, timeout_s: float = 60.0) -> None:
        """Stitch what can be stitched. With `wait_for_clip`, keep trying until that clip is
        stitched by us or by the lock holder (so a result never waits for a later one)."""
        deadline = time.monotonic() + timeout_s
        lock = self.jobs.keys.lock(job_id)
        while True:
            token = uuid.uuid4().hex
            if self.r.set(lock, token, nx=True, px=self.lock_ms):
                try:
                    self._advance_locked(job_id)
                finally:
                    self.r.eval(_RELEASE, 1, lock, token)
                return
            job = self.jobs.get(job_id)
            if job is None or wait_for_clip is None or job.get("stitched", 0) > wait_for_clip:
                return
            if time.monotonic() > deadline:
                return  # the holder's own loop will pick our clip up
            time.sleep(0.05)

    def _advance_locked(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or JobStatus(job["status"]).final:
            return
        st = (Stitcher.from_bytes(self.storage.read(job_id, "stitch.npz"))
              if self.storage.exists(job_id, "stitch.npz") else Stitcher(job.get("min_iou"), keep_masks=False))
        while st.next_clip < job["num_clips"] and self.storage.exists(job_id, clip_name(st.next_clip)):
            clip = clip_from_bytes(self.storage.read(job_id, clip_name(st.next_clip)))
            frames = st.add(clip)
            self.storage.write(job_id, frames_name(clip.index), frames_to_bytes(frames))
            self.storage.write(job_id, "stitch.npz", st.to_bytes())
            self.jobs.update(job_id, stitched=st.next_clip, frames_done=(frames[-1].index + 1) if frames else
                             job.get("frames_done", 0))
            for f in frames:
                self.jobs.event(job_id, "frame", {"frame": f.index, "track_ids": f.track_ids})
        if st.next_clip == job["num_clips"]:
            self._finish(job_id, job, st)

    def _finish(self, job_id: str, job: dict, st: Stitcher) -> None:
        for k in range(job["num_clips"]):
            for f in frames_from_bytes(self.storage.read(job_id, frames_name(k))):
                for tid, rle in zip(f["track_ids"], f["rles"]):
                    st.tracks[tid].masks[f["index"]] = rle
        result = VideoResult(num_frames=job["num_frames"], height=job["height"], width=job["width"],
                             fps=job.get("fps"), classes=dict(self.cfg.classes), max_tracks=self.cfg.max_tracks,
                             tracks=list(st.tracks.values()))
        video = str(self.storage.path(job_id, "video"))
        write_outputs(result, self.storage.path(job_id, "out"), job["formats"],
                      frames_for_overlay=lambda: self.overlay_frames(video))
        kept = result.kept()
        self.jobs.finish(job_id, tracks=len(kept))
        for t, score in zip(kept, result.scores(kept)):
            self.jobs.event(job_id, "track", {"id": t.id, "category_id": t.category(), "score": score,
                                              "first_frame": t.first_frame, "last_frame": t.last_frame})
