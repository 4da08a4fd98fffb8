"""Live sources: network streams and cameras read at their own pace, with PyAV.

    reader = LiveReader("rtsp://camera/stream", LiveOptions.from_settings(get_settings()), clip_len=8)
    reader.start()                       # connects (LiveSourceError if it cannot), unless connect() has
    for item in reader:                  # LiveFrame, or RUN_END between runs, until the stream ends
        ...
    reader.stop()

A reader thread decodes frames as they arrive and hands them over through a queue bounded in
bytes, so a consumer that falls behind never grows memory without bound. What happens then is
the backlog policy: `drop` (default) throws away whole clips of arriving frames (counted) until
the model has emptied the queue; `buffer` stops reading the source until it has (the source's own
buffers, then the network's, take up the slack; a source that gives up is reconnected).

Runs. Frames come in runs of consecutive frames. A run ends where the source dropped and was
reconnected, where the drop policy threw frames away, or where the stream ended; the reader puts
RUN_END between runs. The pipeline plans each run like a video of its own, so tracks are not
chained across a gap: tracks after it get new ids.

Reconnects. When the source fails or ends, it is opened again up to `reconnect_attempts` times,
waiting `reconnect_backoff_s`, doubled after each failure up to `reconnect_backoff_max_s`; a
stream that ends for good (a finite HTTP stream, a closed server) therefore ends after those
attempts. `reconnect_attempts=0` ends at the first end of stream.

Recording. For the overlay, which is drawn once the last clip has decided every track's label,
the reader can copy the source's packets, without re-encoding, into one file per connection;
`recorded_frames()` decodes them again and yields exactly the frames that were handed over.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np

from service.errors import ClientError
from service.video.decode import DEFAULT_MAX_PIXELS, Frame, _reason, _rotation, _seconds, _to_bgr, _video_stream

log = logging.getLogger(__name__)

# Schemes handed to FFmpeg as network sources; any other "x://" is refused as unknown.
NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "rtp", "srt", "tcp")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CAMERA = re.compile(r"^/dev/video\d+$")
BacklogPolicy = Literal["drop", "buffer"]


class LiveSourceError(ClientError):
    """A live source that cannot be opened or read: one line naming the source (without its password)."""


def is_live_source(source: str) -> bool:
    """A URL of any scheme (checked when opened) or a V4L2 camera, rather than a file path."""
    return bool(_URL.match(source) or _CAMERA.match(source))


def redact(source: str) -> str:
    """The source as it may be printed: a password in the URL is replaced by ***."""
    if not _URL.match(source):
        return source
    try:
        parts = urlsplit(source)
    except ValueError:
        return source.split("://", 1)[0] + "://***"
    if parts.password is None:
        return source
    netloc = f"{parts.username}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class LiveOptions:
    """How a live source is read; every field is a setting (service.config, STEMSEG_LIVE_*)."""

    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    reconnect_attempts: int = 3
    reconnect_backoff_s: float = 1.0
    reconnect_backoff_max_s: float = 10.0
    backlog: BacklogPolicy = "drop"
    queue_bytes: int = 256 * 1024**2
    queue_frames: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_settings(cls, settings, **overrides) -> LiveOptions:
        values = {
            "rtsp_transport": settings.live_rtsp_transport, "open_timeout_s": settings.live_open_timeout_s,
            "read_timeout_s": settings.live_read_timeout_s, "reconnect_attempts": settings.live_reconnect_attempts,
            "reconnect_backoff_s": settings.live_reconnect_backoff_s,
            "reconnect_backoff_max_s": settings.live_reconnect_backoff_max_s, "backlog": settings.live_backlog,
            "queue_bytes": settings.live_queue_bytes, "queue_frames": settings.live_queue_frames,
            "max_pixels": settings.max_frame_pixels,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _ffmpeg_options(source: str, opts: LiveOptions) -> tuple[str | None, dict[str, str]]:
    """The demuxer (None: FFmpeg's guess) and the options FFmpeg needs for this source."""
    us = str(int(opts.read_timeout_s * 1e6))
    if _CAMERA.match(source):
        if "video4linux2" not in av.formats_available:
            raise LiveSourceError(f"{source}: this FFmpeg (PyAV's) has no video4linux2 input, so it cannot "
                                  "read cameras")
        return "video4linux2", {}
    scheme = source.split("://", 1)[0].lower()
    if scheme not in NETWORK_SCHEMES:
        raise LiveSourceError(f"{redact(source)}: unknown protocol {scheme!r} (live sources: "
                              f"{', '.join(NETWORK_SCHEMES)}, or /dev/videoN)")
    if scheme in ("rtsp", "rtsps"):
        # `timeout` is the RTSP demuxer's socket timeout; TCP interleaving survives NAT and loss.
        return None, {"rtsp_transport": opts.rtsp_transport, "timeout": us}
    options = {"rw_timeout": us}
    if scheme in ("udp", "rtp"):
        # A late reader must not stop the stream: overrun drops datagrams (the decoder then resyncs).
        options.update({"timeout": us, "overrun_nonfatal": "1", "fifo_size": "50000"})
    return None, options


def check_source(source: str) -> None:
    """Refuse at once what cannot be a live source here (an unknown scheme, a camera without
    video4linux2), before minutes of loading; whether it answers is known only when opened."""
    _ffmpeg_options(source, LiveOptions())


def _error_reason(e: BaseException, opts: LiveOptions, opening: bool) -> str:
    if isinstance(e, av.error.ProtocolNotFoundError):
        return "this FFmpeg (PyAV's) does not support the protocol"
    if isinstance(e, (av.error.ExitError, av.error.TimeoutError, TimeoutError)):
        limit = opts.open_timeout_s if opening else opts.read_timeout_s
        return f"no answer within {limit:g} s (timed out)"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return _reason(e)


def _unresolvable(source: str, wait_s: float = 2.0) -> bool:
    """Whether the URL's host name does not resolve (FFmpeg says only "Input/output error").
    Looked up on a thread of its own, so a resolver that does not answer costs at most wait_s."""
    try:
        host = urlsplit(source).hostname
    except ValueError:
        return False
    if not host:
        return False
    answer: list[bool] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, None)
            answer.append(False)
        except socket.gaierror:
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=look_up, name="stemseg-resolve", daemon=True)
    thread.start()
    thread.join(wait_s)
    return bool(answer and answer[0])


def open_source(source: str, opts: LiveOptions) -> av.container.InputContainer:
    """Open a live source (LiveSourceError in one line if it cannot be)."""
    fmt, options = _ffmpeg_options(source, opts)
    try:
        container = av.open(source, mode="r", format=fmt, options=options,
                            timeout=(opts.open_timeout_s, opts.read_timeout_s))
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        reason = _error_reason(e, opts, True)
        if fmt is None and isinstance(e, OSError) and _unresolvable(source):
            reason = "the host name does not resolve"
        raise LiveSourceError(f"{redact(source)}: cannot open ({reason})") from None
    try:
        _video_stream(container, redact(source))
    except Exception:
        container.close()
        raise
    return container


@dataclass
class LiveFrame:
    """A frame as handed over: its number within its run (`frame.index`), when it arrived."""

    frame: Frame
    run: int  # 0, 1, ...: a new run after each gap
    sequence: int  # frames decoded from the source so far, dropped ones included (0-based)
    arrival: float  # time.monotonic() when decoded
    wall: float  # time.time() then


class _RunEnd:
    def __repr__(self) -> str:
        return "RUN_END"


RUN_END = _RunEnd()


@dataclass
class LiveStats:
    frames_read: int = 0  # decoded from the source
    frames_handed: int = 0  # put in the queue
    frames_dropped: int = 0  # thrown away by the drop policy
    clips_dropped: int = 0  # ... in whole clips
    reconnects: int = 0
    gaps: list[dict] = field(default_factory=list)  # {"run": n, "cause": "reconnect" | "dropped" | ...}
    ended_by: str = ""  # "end of stream", "duration", "stopped", "source lost: ..."


class _ByteQueue:
    """FIFO bounded by the bytes and the number of the frames it holds (markers are free); one
    producer, one consumer."""

    def __init__(self, max_bytes: int, max_frames: int) -> None:
        self.max_bytes, self.max_frames = max_bytes, max_frames
        self.items: deque = deque()
        self.bytes = self.frames = 0
        self.cond = threading.Condition()

    @staticmethod
    def _size(item) -> int:
        return item.frame.image.nbytes if isinstance(item, LiveFrame) else 0

    def fits(self, item) -> bool:
        # One item always fits, so a frame larger than the bound still passes, alone.
        return not self.frames or (self.bytes + self._size(item) <= self.max_bytes and self.frames < self.max_frames)

    def put(self, item, *, block: bool, stop: threading.Event) -> bool:
        with self.cond:
            while not self.fits(item):
                if not block or stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.items.append(item)
            self.bytes += self._size(item)
            self.frames += 1
            self.cond.notify_all()
            return True

    def put_marker(self, item) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def get(self, stop: threading.Event):
        """The next item; _DONE once `stop` is set and nothing is left (the reader may be blocked
        in a read until its timeout: its last items are not waited for)."""
        with self.cond:
            while not self.items:
                if stop.is_set():
                    return _DONE
                self.cond.wait(0.1)
            item = self.items.popleft()
            self.bytes -= self._size(item)
            self.frames -= isinstance(item, LiveFrame)
            self.cond.notify_all()
            return item


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class LiveReader:
    """Reads one live source on a thread into a bounded queue; see the module docstring."""

    def __init__(self, source: str, options: LiveOptions, *, clip_len: int | None = None,
                 duration_s: float | None = None, record_dir: Path | None = None) -> None:
        """`clip_len` (the unit the drop policy drops in) may be set after connect(), before start()."""
        self.source, self.options, self.clip_len = source, options, clip_len
        self.name = redact(source)
        self.duration_s = duration_s
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self.stats = LiveStats()
        self.fps: float | None = None
        self.stopping = threading.Event()
        self._queue = _ByteQueue(options.queue_bytes, options.queue_frames)
        self._thread: threading.Thread | None = None
        self._container: av.container.InputContainer | None = None
        self._started_at: float | None = None
        # Per connection: (recording path or None, decode ordinals handed over).
        self.recordings: list[tuple[Path | None, list[int]]] = []
        self._run, self._run_frames, self._run_open = 0, 0, False
        self._size: tuple[int, int] | None = None
        self._dropping = 0  # frames still to drop of the clip being dropped

    # -- consumer side -----------------------------------------------------------------------
    def connect(self) -> None:
        """Open the source (LiveSourceError here if it cannot be), without reading it yet."""
        if self._container is None:
            self._container = open_source(self.source, self.options)

    def start(self) -> None:
        """Open the source unless connect() has, and start reading it."""
        if not self.clip_len:
            raise ValueError("set the reader's clip_len (the model's) before starting it")
        self.connect()
        self._thread = threading.Thread(target=self._read, name="stemseg-live", daemon=True)
        self._thread.start()

    def stop(self, why: str = "stopped") -> None:
        """Stop reading; the frames already queued are still handed over, then the iterator ends."""
        if not self.stopping.is_set():
            self.stats.ended_by = self.stats.ended_by or why
            self.stopping.set()

    def __iter__(self) -> Iterator[LiveFrame | _RunEnd]:
        while True:
            item = self._queue.get(self.stopping)
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=self.options.read_timeout_s + 5)
        elif self._container is not None:  # connected, never started
            self._container.close()
            self._container = None

    # -- reader thread ------------------------------------------------------------------------
    def _read(self) -> None:
        container, connection = self._container, 0
        try:
            while True:
                why = self._read_connection(container, connection)
                if self._run_open:  # the consumer can finish this run's clips while we reconnect
                    self._end_run()
                if self.stopping.is_set():
                    break
                container = self._reconnect(why)
                if container is None:
                    break
                connection += 1
                self.stats.gaps.append({"after_frames": self.stats.frames_handed, "cause": f"reconnect ({why})"})
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._queue.put_marker(_Failure(e))
            return
        self.stats.ended_by = self.stats.ended_by or "end of stream"
        self._queue.put_marker(_DONE)

    def _end_run(self) -> None:
        self._queue.put_marker(RUN_END)
        self._run_open = False
        self._run_frames = 0
        self._run += 1

    def _reconnect(self, why: str) -> av.container.InputContainer | None:
        opts = self.options
        delay = opts.reconnect_backoff_s
        for attempt in range(opts.reconnect_attempts):
            if self.stopping.wait(delay):
                return None
            delay = min(delay * 2, opts.reconnect_backoff_max_s)
            try:
                container = open_source(self.source, opts)
            except LiveSourceError as e:
                log.warning("live source %s: reconnect %d/%d failed: %s", self.name, attempt + 1,
                            opts.reconnect_attempts, e)
                continue
            self.stats.reconnects += 1
            log.warning("live source %s: reconnected after %s", self.name, why)
            return container
        if opts.reconnect_attempts:
            why = f"source lost ({why}; {opts.reconnect_attempts} reconnect attempts failed)"
        self.stats.ended_by = self.stats.ended_by or why
        return None

    def _read_connection(self, container, connection: int) -> str:
        """Decode one connection until it fails or ends; why it ended."""
        recorder = _Recorder(self.record_dir, connection, container) if self.record_dir is not None else None
        handed: list[int] = []
        self.recordings.append((recorder.path if recorder else None, handed))
        ordinal = 0
        try:
            # Frame threads would hold back a frame per thread: latency. Slices are decoded alike.
            stream = _video_stream(container, self.name)
            stream.thread_type = "SLICE"
            tb = stream.time_base
            # FFmpeg's guess from the first frames' spacing; a live stream's average is only an estimate.
            rate = stream.guessed_rate or stream.average_rate
            if self.fps is None and rate:
                self.fps = float(rate)
            try:
                for packet in container.demux(stream):
                    frames = packet.decode()  # before muxing, which may take the packet's data
                    if recorder is not None:
                        recorder.mux(packet)
                    for av_frame in frames:
                        self._take(av_frame, stream, tb, ordinal, handed)
                        ordinal += 1
                        if self.stopping.is_set():
                            return "stopped"
                    if self.stopping.is_set():
                        return "stopped"
            except av.FFmpegError as e:
                why = f"read failed: {_error_reason(e, self.options, False)}"
            else:
                return "end of stream"  # the demuxer's last, empty packet has flushed the decoder
            # Frames the decoder still holds (reordering delay) are as real as the others.
            try:
                for av_frame in stream.codec_context.decode(None):
                    self._take(av_frame, stream, tb, ordinal, handed)
                    ordinal += 1
            except av.FFmpegError:
                pass
            return why
        finally:
            if recorder is not None:
                recorder.close()
            container.close()

    def _take(self, av_frame: av.VideoFrame, stream, tb, ordinal: int, handed: list[int]) -> None:
        """One decoded frame: hand it over, or drop it under the drop policy."""
        now = time.monotonic()
        if self._started_at is None:
            self._started_at = now
        size = (av_frame.width, av_frame.height)
        if size[0] * size[1] > self.options.max_pixels:
            raise LiveSourceError(f"{self.name}: frames of {size[0]}x{size[1]} exceed the limit "
                                  f"of {self.options.max_pixels} pixels")
        if self._size is None:
            self._size = size
        elif size != self._size:
            # The outputs (DAVIS PNGs, the overlay) have one frame size: the stream ends here.
            self.stop(f"the frame size changed from {self._size[0]}x{self._size[1]} to {size[0]}x{size[1]}")
            return
        self.stats.frames_read += 1
        image = _to_bgr(av_frame, _rotation(av_frame, stream))
        item = LiveFrame(Frame(self._run_frames, _seconds(av_frame.pts, tb), image), self._run,
                         self.stats.frames_read - 1, now, time.time())
        if self._dropping == 0 and self.options.backlog == "drop" and not self._queue.fits(item):
            self._dropping = self.clip_len
            if self._run_open:
                self._end_run()
                self.stats.gaps.append({"after_frames": self.stats.frames_handed, "cause": "dropped"})
        if self._dropping:
            # Whole clips, until the model has caught up with the queue: the next run then starts
            # with the newest frames, instead of short runs that each cost a padded clip.
            if self._dropping == self.clip_len:
                self.stats.clips_dropped += 1
            self._dropping -= 1
            self.stats.frames_dropped += 1
            if self._dropping == 0 and self._queue.frames:
                self._dropping = self.clip_len
        elif self._queue.put(item, block=True, stop=self.stopping):
            self._run_open = True
            self._run_frames += 1
            self.stats.frames_handed += 1
            handed.append(ordinal)
        if self.duration_s is not None and now - self._started_at >= self.duration_s:
            self.stop("duration")


class _Recorder:
    """The connection's video packets copied, not re-encoded, into a Matroska file.

    Only the packets' order matters to decoding them again (decoders order their output by the
    bitstream, not by timestamps), and live packets may lack timestamps (RTSP gives no dts, with
    B-frames pts go back): each packet is stamped with its position instead. A packet the muxer
    still refuses ends the recording; the overlay then says so (recorded_frames)."""

    def __init__(self, directory: Path, connection: int, container) -> None:
        self.path = Path(directory) / f"connection-{connection:04d}.mkv"
        self.failed: str | None = None
        self._count = 0
        self._out = av.open(str(self.path), mode="w", format="matroska")
        self._stream = self._out.add_stream_from_template(_video_stream(container, "source"))

    def mux(self, packet: av.Packet) -> None:
        if packet.size == 0 or self.failed:  # the demuxer's flush packet
            return
        packet.stream = self._stream
        packet.time_base = Fraction(1, 1000)
        packet.pts = packet.dts = self._count
        self._count += 1
        try:
            self._out.mux(packet)
        except av.FFmpegError as e:
            self.failed = _reason(e)
            log.warning("recording the stream for the overlay failed: %s", self.failed)

    def close(self) -> None:
        try:
            self._out.close()
        except av.FFmpegError as e:
            self.failed = self.failed or _reason(e)


def recorded_frames(recordings: list[tuple[Path | None, list[int]]],
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[np.ndarray]:
    """The frames a LiveReader handed over, decoded again from its recordings, in order (BGR)."""
    for path, handed in recordings:
        if not handed:
            continue
        if path is None:
            raise LiveSourceError("the stream was not recorded, so its frames cannot be drawn again")
        wanted = iter(handed)
        want = next(wanted)
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for ordinal, frame in enumerate(container.decode(stream)):
                    if ordinal == want:
                        yield _to_bgr(frame, _rotation(frame, stream))
                        want = next(wanted, None)
                        if want is None:
                            break
        except (av.FFmpegError, IndexError) as e:
            raise LiveSourceError(f"the stream's recording for the overlay cannot be read ({_reason(e)}): "
                                  "leave out the overlay format for this source") from None
        if want is not None:
            raise LiveSourceError(f"the recording {path.name} holds fewer frames than were read from the stream")


__all__ = ["RUN_END", "LiveFrame", "LiveOptions", "LiveReader", "LiveSourceError", "LiveStats", "check_source",
           "is_live_source",
           "open_source", "recorded_frames", "redact"]
