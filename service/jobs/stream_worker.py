"""A worker's stream slot: takes a live stream off its queue and runs the CLI's live pipeline on it
(service.video.live.LiveReader, service.pipeline.live.LiveSession) until the source ends, the
stream is deleted (the record says `stopping`), `max_duration_s` has passed since it started, or
the worker stops.

While it runs, a watcher thread renews the queue entry's lease (so no other worker takes the
stream) and reads the record, stopping the reader as soon as a DELETE shows; the slot publishes
each frame's tracks as a `frame` event and the counters (frames, drops, latency, frames/s) into
the record, a few times a second. When the tenure ends its outputs are written by the CLI's
writer (`write_outputs`, the folder `stemseg segment` writes) into the stream's folder in the store,
`segments/NNNN/` (one folder per tenure), and its kept tracks announced as `track` events.

A worker killed mid-stream stops renewing the lease: after the visibility timeout another worker
takes the entry, finds the stream still running, records a gap ("worker lost": the frames the
dead worker had not yet published, and its outputs, are lost) and continues with the next frame
numbers and new track ids, after the highest the stream has given. A worker stopped by SIGTERM
writes its tenure's outputs, records a gap ("worker stopped") and leaves the entry to the next.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.config import Settings
from service.jobs.queue import Task
from service.jobs.redis_clients import REDIS_ERRORS
from service.jobs.storage import Storage, scratch_root
from service.jobs.stream_record import LATENCY_BUCKETS, StreamRecord, StreamStatus
from service.jobs.streams import Streams
from service.model.engines import Engine
from service.outputs import write_outputs
from service.outputs.names import MANIFEST
from service.pipeline.live import LiveFrameTracks, LiveSession
from service.video.live import LiveOptions, LiveReader, LiveSourceError, recorded_frames

log = logging.getLogger("stemseg.streams")

_RECORD_S = 0.25  # the record's counters are written this far apart (frame events at once)
_FPS_WINDOW_S = 5.0  # frames/s is measured over this much of the recent past


class _Tenure:
    """What this worker publishes of one stream, its totals continuing the record's."""

    def __init__(self, rec: StreamRecord, names: dict[int, str]) -> None:
        self.rec, self.names = rec, names
        self.frame_base = rec.frames_seen
        self.counts = list(rec.latency_counts)
        self.latency_sum = rec.latency_sum_s
        self.next_track_id = rec.next_track_id
        self.pending: list[tuple[str, dict]] = []
        self.published = 0
        self.recent: deque[tuple[float, int]] = deque()
        self.last_latency: float | None = None
        self.gaps_seen = 0
        self.unpublished_since: float | None = None

    def add(self, frame: LiveFrameTracks, tenure: int) -> None:
        data = frame.to_json(self.names)
        data.update(frame=self.frame_base + frame.index, tenure=tenure, tenure_frame=frame.index)
        data.pop("latency_s")  # measured when published (below): the event's own latency
        self.pending.append(("frame", data))
        if frame.track_ids:
            self.next_track_id = max(self.next_track_id, max(frame.track_ids) + 1)

    def flush(self, streams: Streams, reader: LiveReader, arrivals: list[float], record: bool = True) -> None:
        """Publish the pending events; with `record`, the counters too."""
        now_mono, now = time.monotonic(), time.time()
        events = self.pending
        for (_, data), arrival in zip(events, arrivals):
            latency = max(now_mono - arrival, 0.0)
            data["latency_s"] = round(latency, 4)
            self.counts[bisect_left(LATENCY_BUCKETS, latency)] += 1
            self.latency_sum += latency
            self.last_latency = latency
        stats = reader.stats
        for gap in stats.gaps[self.gaps_seen:]:  # the reader's own: reconnects and dropped clips
            events.append(("gap", {"after_frame": self.frame_base + gap["after_frames"], "cause": gap["cause"],
                                   "at": now, "tenure": self.rec.tenure}))
        new_gaps = [data for kind, data in events if kind == "gap"]
        self.gaps_seen = len(stats.gaps)
        self.published += sum(1 for kind, _ in events if kind == "frame")
        self.pending = []
        rec = self.rec
        if new_gaps:
            rec.gaps = [*rec.gaps, *new_gaps]
        if not (record or new_gaps):
            self._publish(streams, events, frames_seen=self.frame_base + self.published,
                          next_track_id=self.next_track_id)
            return
        self.recent.append((now_mono, self.published))
        while self.recent and now_mono - self.recent[0][0] > _FPS_WINDOW_S:
            self.recent.popleft()
        first_t, first_n = self.recent[0]
        fps = (self.published - first_n) / (now_mono - first_t) if now_mono > first_t else None
        fields: dict[str, Any] = {
            "frames_seen": self.frame_base + self.published,
            "frames_read": self._base("frames_read") + stats.frames_read,
            "frames_dropped": self._base("frames_dropped") + stats.frames_dropped,
            "clips_dropped": self._base("clips_dropped") + stats.clips_dropped,
            "reconnects": self._base("reconnects") + stats.reconnects,
            "latency_s": None if self.last_latency is None else round(self.last_latency, 4),
            "frames_per_second": None if fps is None else round(fps, 3),
            "latency_counts": self.counts, "latency_sum_s": round(self.latency_sum, 6),
            "next_track_id": self.next_track_id, "gaps": rec.gaps}
        self._publish(streams, events, **fields)

    def _publish(self, streams: Streams, events: list[tuple[str, dict]], **fields: Any) -> None:
        """Events and counters into Redis; with Redis out of reach the stream goes on and what it
        would have published meanwhile is dropped (the lease lapses too if the outage outlasts the
        visibility timeout: another worker then takes the stream over, and this one stops)."""
        try:
            streams.events(self.rec.id, events, **fields)
            self.unpublished_since = None
        except REDIS_ERRORS as e:
            if self.unpublished_since is None:
                self.unpublished_since = time.monotonic()
                log.warning("stream %s: Redis out of reach (%s); its events are dropped until it is back",
                            self.rec.id, e)

    def _base(self, name: str) -> int:
        return getattr(self.rec, name)


def _lost_without_progress(rec: StreamRecord) -> int:
    """Workers lost in a row without publishing a frame, the one just lost (the record's tenure)
    first: a tenure made no progress when it ended at the frame it started from."""
    starts = [0] + [g["after_frame"] for g in rec.gaps]  # where each tenure started, the last the current
    ends = [g["after_frame"] for g in rec.gaps] + [rec.frames_seen]
    causes = [g["cause"] for g in rec.gaps] + ["worker lost"]
    n = 0
    for start, end, cause in zip(reversed(starts), reversed(ends), reversed(causes)):
        if cause != "worker lost" or end != start:
            break
        n += 1
    return n


class StreamRunner:
    """Runs stream tasks for one worker (see the module docstring); `running` counts its streams."""

    def __init__(self, settings: Settings, engine: Engine, streams: Streams, storage: Storage, name: str,
                 stopping: threading.Event) -> None:
        self.settings, self.engine, self.streams, self.storage = settings, engine, streams, storage
        self.name, self.stopping = name, stopping
        self.running = 0
        self._lock = threading.Lock()

    def execute(self, task: Task, consumer: str) -> bool:
        """Run one stream task; True when its queue entry is to be acknowledged (the stream has
        ended, or is gone), False to leave it to the next worker (this one is stopping)."""
        rec = self.streams.get(task.job_id)
        if rec is None or rec.final:
            return True
        if rec.status == StreamStatus.STOPPING:  # deleted while its worker was lost
            self.streams.transition(rec.id, StreamStatus.STOPPED)
            return True
        if rec.preset != self.engine.cfg.name:
            self.streams.transition(rec.id, StreamStatus.FAILED, ended_by="failed", error=(
                f"the stream was created for the {rec.preset!r} model; the workers run {self.engine.cfg.name!r}"))
            return True
        gap = None
        # Running, with no gap left by a worker that stopped cleanly: its worker is gone, a takeover.
        if rec.status == StreamStatus.RUNNING and not (rec.gaps and rec.gaps[-1]["cause"] == "worker stopped"
                                                       and rec.gaps[-1]["tenure"] == rec.tenure):
            lost = _lost_without_progress(rec)
            # Deliveries bound crashes without progress only: a stream that runs for days outlives
            # any number of workers restarted or lost while it made progress.
            if lost >= self.settings.max_deliveries:
                self.streams.transition(rec.id, StreamStatus.FAILED, ended_by="failed", error=(
                    f"{lost} workers in a row were lost on this stream without publishing a frame (worker crashes)"))
                return True
            gap = {"after_frame": rec.frames_seen, "cause": "worker lost", "at": time.time(), "tenure": rec.tenure}
        rec = self.streams.take_over(rec.id, self.name, gap)
        if rec is None:
            return True
        if rec.status == StreamStatus.QUEUED and not self.streams.transition(rec.id, StreamStatus.RUNNING,
                                                                             started_at=time.time()):
            return True  # deleted meanwhile
        rec = self.streams.get(rec.id)
        if rec is None or rec.final:
            return True
        with self._lock:
            self.running += 1
        try:
            return self._run(task, consumer, rec)
        finally:
            with self._lock:
                self.running -= 1

    def _run(self, task: Task, consumer: str, rec: StreamRecord) -> bool:
        s, streams = self.settings, self.streams
        remaining = rec.max_duration_s - (time.time() - (rec.started_at or time.time()))
        if remaining <= 0:
            streams.transition(rec.id, StreamStatus.ENDED, ended_by="max_duration_s")
            return True
        directory = rec.directory
        record_dir = None
        if "overlay" in rec.formats:  # the source's packets, copied for the overlay: local, removed at the end
            record_dir = Path(tempfile.mkdtemp(prefix=f"stream-{rec.id[:8]}-", dir=scratch_root()))
        reader = LiveReader(rec.url, LiveOptions.from_settings(s), clip_len=self.engine.cfg.clip_len,
                            duration_s=remaining, record_dir=record_dir)
        why: dict[str, str] = {}
        watcher = threading.Thread(target=self._watch, args=(task, consumer, rec.id, rec.tenure, reader, why),
                                   daemon=True, name=f"stream-watch-{rec.id[:8]}")
        try:
            try:
                reader.connect()
            except LiveSourceError as e:
                streams.transition(rec.id, StreamStatus.FAILED, error=str(e), ended_by="failed")
                return True
            watcher.start()
            session = LiveSession(reader, self.engine, first_track_id=rec.next_track_id)
            tenure = _Tenure(rec, dict(self.engine.cfg.classes))
            last = time.monotonic()
            reader.start()
            try:
                for frame in session.propagate():
                    if why.get("stop") == "taken over":
                        break  # what it would still publish is the new holder's to say
                    # Each frame's event goes out as soon as its tracks are final.
                    tenure.add(frame, rec.tenure)
                    due = time.monotonic() - last >= _RECORD_S
                    tenure.flush(streams, reader, [frame.arrival], record=due)
                    if due:
                        last = time.monotonic()
            except LiveSourceError as e:
                reader.close()
                tenure.flush(streams, reader, [])
                streams.transition(rec.id, StreamStatus.FAILED, error=str(e), ended_by="failed")
                return True
            finally:
                reader.close()
            if why.get("stop") == "taken over":
                log.warning("stream %s was taken over by another worker; this one stops", rec.id)
                return False
            tenure.flush(streams, reader, [])
            result = session.result()
            tracks: list[dict] = []
            if result.num_frames:
                folder = f"segments/{rec.tenure:04d}"
                # Written locally (with shared paths: in place), then published, its manifest last.
                with self._out_dir(directory, folder) as out:
                    write_outputs(result, out, rec.formats, replace=True, max_pixels=s.max_frame_pixels,
                                  frames_for_overlay=lambda: recorded_frames(reader.recordings, s.max_frame_pixels))
                    self.storage.publish(directory, folder, out, last=[MANIFEST])
                kept = result.kept()
                tracks = [{"id": t.id, "category_id": t.category(), "category": result.classes.get(t.category()),
                           "score": round(score, 4), "first_frame": tenure.frame_base + t.first_frame,
                           "last_frame": tenure.frame_base + t.last_frame, "tenure": rec.tenure}
                          for t, score in zip(kept, result.scores(kept))]
                now = streams.get(rec.id)
                if now is not None:
                    streams.update(rec.id, outputs=[*now.outputs, {
                        "tenure": rec.tenure, "path": folder, "frames": result.num_frames,
                        "first_frame": tenure.frame_base, "tracks": len(tracks)}])
        finally:
            why.setdefault("done", "yes")
            if record_dir is not None:
                shutil.rmtree(record_dir, ignore_errors=True)
        return self._end(rec, reader, why, [("track", t) for t in tracks])

    @contextmanager
    def _out_dir(self, directory: str, folder: str) -> Iterator[Path]:
        """An absent folder to write an output folder into: `folder` itself with shared paths,
        else one in local scratch space (as the jobs' finishing step, service.jobs.coordinator)."""
        if self.storage.shared_paths:
            out = self.storage.path(directory, folder)  # type: ignore[attr-defined]
            out.parent.mkdir(parents=True, exist_ok=True)
            yield out
            return
        with self.storage.scratch(directory, folder) as scratch:
            yield scratch / "out"

    def _end(self, rec: StreamRecord, reader: LiveReader, why: dict[str, str], events: list) -> bool:
        streams = self.streams
        now = streams.get(rec.id)
        if now is None or now.final:
            return True
        if why.get("stop") == "taken over":
            return False  # the entry is the other worker's now: neither acknowledged nor ended here
        if now.status == StreamStatus.STOPPING or why.get("stop") == "deleted":
            streams.transition(rec.id, StreamStatus.STOPPED, events=events)
            return True
        if why.get("stop") == "worker stopping":
            # The stream goes on with the next worker; the gap is this tenure's end.
            gap = {"after_frame": now.frames_seen, "cause": "worker stopped", "at": time.time(), "tenure": rec.tenure}
            streams.update(rec.id, gaps=[*now.gaps, gap])
            streams.events(rec.id, [*events, ("gap", gap)])
            return False
        ended = reader.stats.ended_by or "end of stream"
        streams.transition(rec.id, StreamStatus.ENDED, events=events,
                           ended_by="max_duration_s" if ended == "duration" else ended)
        return True

    def _watch(self, task: Task, consumer: str, stream_id: str, tenure: int, reader: LiveReader,
               why: dict[str, str]) -> None:
        """Renew the lease and look at the record until the tenure ends; stop the reader when the
        stream is deleted, another worker has taken it over, or this worker stops."""
        period = min(0.5, max(self.settings.visibility_timeout_s / 4, 0.1))
        while "done" not in why:
            try:
                status = self.streams.get(stream_id)
                if status is None or status.status in (StreamStatus.STOPPING, StreamStatus.STOPPED):
                    why.setdefault("stop", "deleted")
                    reader.stop("deleted")
                elif status.tenure != tenure:
                    # Another worker took it over (this one's lease lapsed: Redis out of reach
                    # longer than the visibility timeout): it is that worker's stream now.
                    why.setdefault("stop", "taken over")
                    reader.stop("taken over")
                elif self.stopping.is_set():
                    why.setdefault("stop", "worker stopping")
                    reader.stop("worker stopping")
                if why.get("stop") != "taken over":  # a claim now would take the entry from its new holder
                    self.streams.queue.touch(consumer, task.id)
            except Exception:
                log.warning("stream %s: could not renew its lease or read its record", stream_id, exc_info=True)
            time.sleep(period)


__all__ = ["StreamRunner"]
