"""Streaming video decoding with PyAV.

Frames are numbered 0.. in presentation order, one per decoded picture: no resampling to a
constant rate, so a variable-frame-rate video keeps every frame exactly once. Images are 8-bit
BGR with the container's rotation applied. Nothing holds more than a clip window of frames.

Frame count. ``probe`` counts the video packets in one demux pass (no decoding), leaving out
packets the demuxer marks as discarded (an MP4 edit list that starts mid-GOP: the decoder
drops those frames too). Packet count and decoded count can still disagree at the start of a
stream (a file cut mid-GOP: H.264/HEVC decoders skip everything before the first keyframe or
drop RASL pictures; a stream without reorder info may lose an out-of-order picture), so the
first ``_VERIFY_PACKETS`` packets are decoded and their frames' pts compared with the packets'
pts. If they differ (also AVI with B-frames, whose pts are made up), or packets lack pts (raw
streams), the whole video is decoded once to count frames and note their pts; ``read_frames``
then decodes from the start instead of seeking. The count is the number of frames ``iter_frames`` yields.

Damaged and truncated files are refused, never passed off as a shorter video: a demux error,
a container that lists more frames (MP4/MOV sample tables) or a longer video track (Matroska
DURATION tag) than the file holds, a cut-off last packet, or a decoding error. A truncated
file whose container states neither (e.g. WebM from MediaRecorder) cannot be told from a
complete one and is used as far as it decodes.

Bounded probing. Memory and time of a probe do not grow with what a file claims to hold: with
``max_frames`` the demux pass stops once the packets pass it (plus the few that a decoder may
drop at the start), so does a decode that counts frames, and every loop checks a deadline
(``budget_s``); both raise ``OverLimit``. An MP4/MOV's sample tables and an AVI's indexes are
counted from their headers before FFmpeg opens the file (``service.video.indexes``), because
FFmpeg builds its whole index (24-80 bytes an entry) while opening. ``read_frames``'s index cache
is bounded in bytes (``configure_cache``) and an entry is dropped with its file (``forget``).

Rotation: the display matrix, which FFmpeg attaches to every decoded frame (PyAV's
``VideoFrame.rotation``, degrees counterclockwise), rounded to a multiple of 90 and applied
with ``np.rot90``; mirroring in the matrix is ignored.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from service.errors import ClientError
from service.video.indexes import Unindexable, declared_counts

try:
    from av.stream import Disposition

    _ATTACHED_PIC = Disposition.attached_pic
except ImportError:  # PyAV < 13: dispositions are plain ints
    _ATTACHED_PIC = 0x400  # AV_DISPOSITION_ATTACHED_PIC

DEFAULT_MAX_PIXELS = 4096 * 2160
_VERIFY_PACKETS = 48  # enough to cover the start-of-stream cases above, cheap to decode
_NO_PTS = np.iinfo(np.int64).min


class VideoError(ClientError):
    """A file that cannot be used as a video: `path` and the one-line `reason` apart, so a face
    that knows the file by another name (the upload, the job's video) says it without the path."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(self.about(self.path))

    def about(self, name: str) -> str:
        """The message with the file called `name`."""
        return f"{name}: {self.reason}"

    def __reduce__(self):  # crosses process and thread boundaries with both parts
        return type(self), (self.path, self.reason)


class OverLimit(VideoError):
    """The file passes a limit before it is fully read: `kind` is "frames" (more than `limit`
    frames), "samples" (its container lists more than `limit` samples in all tracks) or "time"
    (probing took longer than `limit` seconds)."""

    def __init__(self, path: str | os.PathLike, reason: str, kind: str, limit: float) -> None:
        super().__init__(path, reason)
        self.kind, self.limit = kind, limit

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.kind, self.limit)


class Unindexed(VideoError):
    """Frames cannot be placed from the packets' timestamps (raw streams, made-up pts): reading
    one means decoding from the start. `normalise` remuxes such a file into one that can be."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int  # display size, after rotation
    height: int
    num_frames: int  # exactly the number of frames iter_frames yields
    fps: float | None  # average
    rotation: int  # degrees counterclockwise applied to every frame: 0, 90, 180 or 270
    codec: str
    pix_fmt: str | None
    duration_s: float | None  # of the video track


@dataclass
class Frame:
    index: int  # 0-based, presentation order
    pts_seconds: float | None  # the decoder's; AVI with B-frames has no true ones (order is still right)
    image: np.ndarray  # [H, W, 3] uint8 BGR, rotated for display


@dataclass(frozen=True)
class _Index:
    """What probe learns about a stream; read_frames uses it to seek."""

    pts: np.ndarray  # [N] pts of frame i as iter_frames numbers it
    seekable: bool  # pts are the sorted, unique packet pts verified against decoding
    pos: np.ndarray  # [N] demux position of frame i's packet (seekable only)
    all_pts: np.ndarray  # [P] pts of every packet in demux order, to place a seek's landing
    key_pos: np.ndarray  # keyframe packets: demux position, pts, dts (_NO_PTS if none)
    key_pts: np.ndarray
    key_dts: np.ndarray
    width: int  # decoded size, before rotation
    height: int


def _reason(e: BaseException) -> str:
    return (str(getattr(e, "strerror", None) or e).splitlines() or [type(e).__name__])[0]


def _check_path(path: str | Path) -> os.stat_result:
    p = Path(path)
    if not p.exists():
        raise VideoError(p, "no such file")
    if not p.is_file():
        raise VideoError(p, "not a file")
    st = p.stat()
    if st.st_size == 0:
        raise VideoError(p, "the file is empty")
    return st


def _open(path: str | Path) -> av.container.InputContainer:
    p = Path(path)
    _check_path(p)
    try:
        return av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(p, f"not a readable video, or damaged/truncated ({_reason(e)})") from None


def _video_stream(container: av.container.InputContainer, path: str | Path) -> av.video.stream.VideoStream:
    # A cover picture (audio files with artwork) is a one-packet "video" stream: not a video.
    videos = [s for s in container.streams.video if not s.disposition & _ATTACHED_PIC]
    if not videos:
        kinds = sorted({s.type for s in container.streams} & {"audio", "subtitle"})
        if not kinds:  # also what a cut-off MP4 header leaves: a stream of unknown type
            raise VideoError(path, "no video stream found (not a video, or the file is damaged or "
                                   "truncated)")
        extra = " and a cover picture" if container.streams.video else ""
        raise VideoError(path, f"no video stream (the file has only {' and '.join(kinds)} streams{extra})")
    if videos[0].codec_context is None:  # an MP4 cut inside its moov box: a track without codec parameters
        raise VideoError(path, "the video stream has no codec parameters (the file is damaged or truncated)")
    return videos[0]


def _rotation(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> int:
    r = getattr(frame, "rotation", None)
    if r is None:  # PyAV without frame side data: the demuxers' legacy tag, clockwise
        try:
            r = -float(stream.metadata.get("rotate", 0) or 0)
        except ValueError:
            r = 0
    return round(r / 90) * 90 % 360


def _to_bgr(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    image = frame.to_ndarray(format="bgr24")  # any pix_fmt/bit depth/range -> 8-bit BGR via swscale
    if rotation:
        image = np.rot90(image, k=rotation // 90)  # counterclockwise, as the display matrix
    return np.ascontiguousarray(image)  # odd widths come back with padded rows


def _check_size(path: str | Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise VideoError(path, f"frames of {width}x{height} exceed the limit of {max_pixels} pixels")


def _seconds(ts: int | None, tb) -> float | None:
    return None if ts is None or tb is None else float(ts * tb)


def _declared_end(stream: av.video.stream.VideoStream) -> float | None:
    """End of the video track as the container states it, in seconds, where it does."""
    tag = stream.metadata.get("DURATION")  # Matroska/WebM, written at the end of muxing
    if tag:
        try:
            h, m, s = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class _Bounds:
    """How far one probe may go: stop once more than `stop_at` packets or frames are seen,
    raise once `deadline` (time.monotonic()) passes."""

    max_frames: int | None = None
    deadline: float | None = None
    budget_s: float | None = None
    max_samples: int | None = None

    @classmethod
    def of(cls, max_frames: int | None, budget_s: float | None, max_samples: int | None) -> _Bounds:
        return cls(max_frames, None if budget_s is None else time.monotonic() + budget_s, budget_s, max_samples)

    @property
    def stop_at(self) -> int | None:
        # Packets a decoder may drop at the start of a stream: more than the limit in packets
        # is not yet more than the limit in frames. The exact count is the caller's to check.
        return None if self.max_frames is None else self.max_frames + _VERIFY_PACKETS

    def over_frames(self, path, n: int) -> None:
        if self.stop_at is not None and n > self.stop_at:
            raise OverLimit(path, f"the video has more than {self.max_frames} frames", "frames", self.max_frames)

    def check_time(self, path) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OverLimit(path, f"probing the video took longer than {self.budget_s:g} s", "time",
                            self.budget_s)


_UNBOUNDED = _Bounds()
_CHECK_EVERY = 256  # packets between deadline checks

def _check_declared(path: str | Path, bounds: _Bounds) -> None:
    """Refuse a file whose index lists too many frames or samples before FFmpeg reads it all
    (MP4/MOV sample tables, AVI indexes: FFmpeg holds about 24-80 bytes an entry)."""
    if bounds.max_frames is None and bounds.max_samples is None:
        return
    try:
        counts = declared_counts(path, lambda: bounds.check_time(path))
    except Unindexable as e:  # never handed to FFmpeg uncounted: it would build the index it hides
        raise VideoError(path, f"the container's index cannot be checked: {e.reason}") from None
    except struct.error:
        raise VideoError(path, "the container's index cannot be checked: its headers are damaged") from None
    except OSError:  # unreadable: opening it says so
        return
    if counts is None:
        return
    video, total = counts
    bounds.over_frames(path, video)
    if bounds.max_samples is not None and total > bounds.max_samples:
        raise OverLimit(path, f"the container lists {total} samples or index entries in all its tracks, more than "
                              f"{bounds.max_samples}", "samples", bounds.max_samples)


def _decode_all(container, stream, path, limit: int | None,
                bounds: _Bounds = _UNBOUNDED) -> tuple[tuple | None, array]:
    """Decode the first `limit` packets (all if None) and drain the decoder. Returns the first
    frame's (width, height, rotation, pix_fmt) and the pts of every frame (None as _NO_PTS)."""
    first, pts, fed, cut = None, array("q"), 0, False

    def take(frame: av.VideoFrame) -> None:
        nonlocal first
        if first is None:
            first = (frame.width, frame.height, _rotation(frame, stream), frame.format.name)
        pts.append(_NO_PTS if frame.pts is None else frame.pts)

    try:
        for packet in container.demux(stream):
            if limit is not None and fed >= limit:
                cut = True
                break
            fed += bool(packet.size)
            for frame in packet.decode():  # the size-0 packets at the end drain the decoder
                take(frame)
            if fed % _CHECK_EVERY == 0:
                bounds.check_time(path)
                bounds.over_frames(path, len(pts))
        if cut:
            for frame in stream.decode(None):
                take(frame)
        bounds.over_frames(path, len(pts))
    except av.FFmpegError as e:
        raise VideoError(path, f"the video cannot be decoded past frame {len(pts)} "
                               f"(damaged or truncated: {_reason(e)})") from None
    return first, pts


@dataclass
class _Packets:
    """One demux pass over the video stream, in demux order."""

    pts: np.ndarray  # _NO_PTS where missing
    dts: np.ndarray
    duration: np.ndarray  # 0 where unknown
    key: np.ndarray
    kept: np.ndarray  # not marked discard (edit lists): the decoder outputs these
    corrupt_last: bool


def _demux_pass(container, stream, path, bounds: _Bounds = _UNBOUNDED) -> _Packets:
    # Compact arrays: 8 bytes a packet (a list of Python ints takes about five times that).
    pts, dts, dur, key, discard = array("q"), array("q"), array("q"), array("b"), array("b")
    kept, corrupt = 0, False
    try:
        for p in container.demux(stream):
            if not p.size:
                continue  # the demuxer's end-of-stream flush packet
            pts.append(_NO_PTS if p.pts is None else p.pts)
            dts.append(_NO_PTS if p.dts is None else p.dts)
            dur.append(p.duration or 0)
            key.append(p.is_keyframe)
            discard.append(p.is_discard)
            kept += not p.is_discard
            corrupt = p.is_corrupt
            if len(pts) % _CHECK_EVERY == 0:
                bounds.check_time(path)
            bounds.over_frames(path, kept)
    except av.FFmpegError as e:
        raise VideoError(path, f"the file is damaged: reading stopped after {len(pts)} video packets "
                               f"({_reason(e)})") from None
    ints = [np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64) for a in (pts, dts, dur)]
    flags = [np.frombuffer(a, dtype=np.int8).astype(bool) if len(a) else np.zeros(0, bool) for a in (key, discard)]
    return _Packets(*ints, flags[0], ~flags[1], corrupt)


def _check_complete(path, packets: _Packets, declared: int, declared_end: float | None, tb) -> float | None:
    """Refuse a file that holds fewer frames than its container states; returns the end of the
    video track in seconds where the packets tell."""
    if packets.corrupt_last:
        raise VideoError(path, "the file is truncated (its last video packet is cut off)")
    if declared > packets.pts.size:
        raise VideoError(path, f"the file is truncated or damaged: the container lists {declared} "
                               f"frames, only {packets.pts.size} are present")
    pts = packets.pts[packets.kept]
    if not pts.size:
        hint = " (the file is truncated)" if declared or declared_end else ""
        raise VideoError(path, f"the video stream has no frames{hint}")
    if (pts == _NO_PTS).any() or tb is None:
        return None
    steps = np.diff(np.sort(pts))
    step = int(np.median(steps)) if steps.size else 0
    durations = packets.duration[packets.kept]
    end = float((pts + np.where(durations > 0, durations, step)).max() * tb)  # unknown: a typical one
    # More than about a frame short of what the container states: frames are missing.
    if declared_end is not None and step and declared_end - end > 1.5 * float(step * tb) + 1e-3:
        raise VideoError(path, f"the file is truncated: the video track should last {declared_end:.2f} s, "
                               f"it ends at {end:.2f} s")
    return end


def _decoded(path: str, limit: int | None = None, bounds: _Bounds = _UNBOUNDED) -> tuple[tuple | None, array]:
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # as iter_frames, so the frames counted are the frames it yields
        return _decode_all(container, stream, path, limit, bounds)


def _scan(path: str, max_pixels: int, bounds: _Bounds = _UNBOUNDED,
          decode_to_count: bool = True) -> tuple[_Index, VideoInfo]:
    _check_path(path)
    _check_declared(path, bounds)
    with _open(path) as container:
        stream = _video_stream(container, path)
        cc = stream.codec_context
        if cc.width and cc.height:  # refuse before decoding anything huge
            _check_size(path, cc.width, cc.height, max_pixels)
        packets = _demux_pass(container, stream, path, bounds)
        tb = stream.time_base
        # Only MP4/MOV sample tables count frames; AVI's "frames" are time-base ticks.
        declared = (stream.frames or 0) if "mp4" in container.format.name.split(",") else 0
        end = _check_complete(path, packets, declared, _declared_end(stream), tb)
        codec = cc.name
        fps = float(stream.average_rate) if stream.average_rate else None
        container_duration = container.duration / av.time_base if container.duration else None

    # Packets are frames if the decoder agrees where streams tend to differ: at the start.
    frame_pts = np.sort(packets.pts[packets.kept])
    seekable, first, got = False, None, None
    if end is not None and np.unique(frame_pts).size == frame_pts.size:
        limit = min(_VERIFY_PACKETS, packets.pts.size)
        first, got = _decoded(path, limit, bounds)
        expect = np.sort(packets.pts[:limit][packets.kept[:limit]])
        seekable = np.array_equal(np.array(got, dtype=np.int64), expect)
        if not seekable and limit < packets.pts.size:
            got = None
    if not seekable:
        if not decode_to_count:
            raise Unindexed(path, "the video's frames cannot be placed without decoding it from the start")
        if got is None:
            first, got = _decoded(path, None, bounds)
        frame_pts = np.array(got, dtype=np.int64)
    if first is None or frame_pts.size == 0:
        raise VideoError(path, "the video stream has no decodable frames")
    width, height, rotation, pix_fmt = first
    _check_size(path, width, height, max_pixels)

    n = int(frame_pts.size)
    if end is not None:
        duration = end - float(frame_pts.min() * tb)
    elif n > 1 and (frame_pts != _NO_PTS).all():
        duration = float((frame_pts.max() - frame_pts.min()) * tb) * n / (n - 1)
    else:
        duration = container_duration
    if fps is None and duration:
        fps = n / duration
    keys = np.flatnonzero(packets.key)
    order = np.flatnonzero(packets.kept)[np.argsort(packets.pts[packets.kept], kind="stable")]
    index = _Index(pts=frame_pts, seekable=seekable, pos=order if seekable else np.zeros(0, np.int64),
                   all_pts=packets.pts, key_pos=keys, key_pts=packets.pts[keys], key_dts=packets.dts[keys],
                   width=width, height=height)
    for a in (index.pts, index.pos, index.all_pts, index.key_pos, index.key_pts, index.key_dts):
        a.flags.writeable = False  # shared through the cache
    w, h = (height, width) if rotation in (90, 270) else (width, height)
    info = VideoInfo(str(path), w, h, n, fps, rotation, codec, pix_fmt,
                     duration if duration is not None and math.isfinite(duration) else None)
    return index, info


class _IndexCache:
    """read_frames' indexes by (path, mtime, size, max_pixels), least recently used first out,
    bounded by the bytes of their arrays: an index is 8-40 bytes a frame, so a count of entries
    would bound nothing. Shared by a worker's task threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[tuple[_Index, VideoInfo], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: tuple) -> tuple[_Index, VideoInfo] | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key: tuple, value: tuple[_Index, VideoInfo]) -> None:
        index = value[0]
        size = 512 + sum(a.nbytes for a in (index.pts, index.pos, index.all_pts, index.key_pos, index.key_pts,
                                              index.key_dts))
        with self._lock:
            if key in self._entries:
                return
            if size > self.max_bytes:
                return  # used once and not kept
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, n) = self._entries.popitem(last=False)
                self._bytes -= n

    def forget(self, path: str | Path) -> None:
        """Drop the entries of this file, or of every file under this directory."""
        root = str(path).rstrip("/")
        with self._lock:
            for key in [k for k in self._entries if k[0] == root or k[0].startswith(root + "/")]:
                self._bytes -= self._entries.pop(key)[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


DEFAULT_CACHE_BYTES = 64 * 1024**2
_cache = _IndexCache(DEFAULT_CACHE_BYTES)


def configure_cache(max_bytes: int) -> None:
    """Bound read_frames' index cache (bytes); entries over it are dropped, oldest first."""
    with _cache._lock:
        _cache.max_bytes = max_bytes
        while _cache._bytes > max_bytes and _cache._entries:
            _, (_, n) = _cache._entries.popitem(last=False)
            _cache._bytes -= n


def forget(path: str | Path) -> None:
    """Drop what the cache holds about this file (or every file under this directory): call it
    when the file is deleted or replaced."""
    _cache.forget(path)


def clear_cache() -> None:
    _cache.clear()


def cache_bytes() -> int:
    return _cache.bytes


def _index(path: str | Path, max_pixels: int) -> tuple[_Index, VideoInfo]:
    st = _check_path(path)
    key = (str(path), st.st_mtime_ns, st.st_size, max_pixels)
    hit = _cache.get(key)
    if hit is None:
        hit = _scan(str(path), max_pixels)
        _cache.put(key, hit)
    return hit


def probe(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, max_frames: int | None = None,
          budget_s: float | None = None, max_samples: int | None = None) -> VideoInfo:
    """Validate a video and count its frames exactly (see the module docstring for how), so a
    clip plan can be made up front and bad files are refused before any work starts.

    With `max_frames`, `budget_s` or `max_samples`, reading stops (OverLimit) as soon as the
    video has more frames than `max_frames` (the count returned may still be a little over it:
    compare), probing has taken `budget_s` seconds, or an MP4/MOV lists more than `max_samples`
    samples in all its tracks. Nothing is cached: a probe is for admitting a file once."""
    return _scan(str(path), max_pixels, _Bounds.of(max_frames, budget_s, max_samples))[1]


def check_indexable(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, max_frames: int | None = None,
                    budget_s: float | None = None, max_samples: int | None = None) -> VideoInfo:
    """As probe, but a video whose frames cannot be placed without decoding from the start
    raises Unindexed instead of being decoded to count them (see `service.video.normalise`)."""
    return _scan(str(path), max_pixels, _Bounds.of(max_frames, budget_s, max_samples), decode_to_count=False)[1]


def iter_frames(path: str | Path, *, threads: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                expected: int | None = None) -> Iterator[Frame]:
    """Every frame in presentation order, decoded on the fly. With `expected` (probe's count),
    a video that ends early raises VideoError instead of passing for a shorter one; without it
    a truncated file that ``probe`` would refuse is decoded as far as it goes."""
    n, size = 0, None
    with _open(path) as container:
        stream = _video_stream(container, path)
        if threads:
            stream.thread_type = "AUTO"
        tb = stream.time_base
        try:
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.width, frame.height)
                    _check_size(path, *size, max_pixels)
                elif (frame.width, frame.height) != size:
                    raise VideoError(path, f"the frame size changes from {size[0]}x{size[1]} to "
                                           f"{frame.width}x{frame.height} at frame {n}, which is not supported")
                yield Frame(n, _seconds(frame.pts, tb), _to_bgr(frame, _rotation(frame, stream)))
                n += 1
        except av.FFmpegError as e:
            raise VideoError(path, f"decoding failed at frame {n} "
                                   f"(damaged or truncated: {_reason(e)})") from None
    if n == 0:
        raise VideoError(path, "the video stream has no decodable frames")
    if expected is not None and n < expected:
        raise VideoError(path, f"the video ends at frame {n} of {expected} (damaged or truncated)")


def iter_clip_windows(path: str | Path, plan: Sequence[Sequence[int]], *, threads: bool = True,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[int, list[Frame]]]:
    """(clip index, its frames in plan order), decoding once and holding only the frames that
    the current or a later clip still needs. Clips must not go back before frames already
    dropped, as clip_plan's never do."""
    if not plan:
        return
    last = {f: k for k, clip in enumerate(plan) for f in clip}
    frames = iter_frames(path, threads=threads, max_pixels=max_pixels, expected=max(last) + 1)
    held: dict[int, Frame] = {}
    try:
        for k, clip in enumerate(plan):
            for f in clip:
                while f not in held:
                    frame = next(frames, None)
                    if frame is None or frame.index > f:
                        raise VideoError(path, f"frame {f} is not available (the video ends or the plan "
                                               "goes back to a frame already dropped)")
                    if frame.index in last:
                        held[frame.index] = frame
            yield k, [held[f] for f in clip]
            for f in [f for f in held if last[f] <= k]:
                del held[f]
    finally:
        frames.close()


def read_frames(path: str | Path, indices: Sequence[int], *, threads: bool = True,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Frame]:
    """The frames at these indices (as iter_frames numbers them, same pixels), in the order
    asked, by seeking to a keyframe before the earliest one and decoding forward."""
    if not len(indices):
        return []
    wanted = sorted({int(i) for i in indices})
    got: dict[int, Frame] = {}
    frames = _wanted_frames(path, wanted, threads, max_pixels)
    try:
        for frame in frames:
            got[frame.index] = frame
            if len(got) == len(wanted):
                break
    finally:
        frames.close()
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VideoError(path, f"could not decode frames {missing[:5]} (damaged file)")
    return [got[i] for i in indices]


def iter_frame_range(path: str | Path, start: int, stop: int, *, threads: bool = True,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Frame]:
    """Frames start..stop-1 in order, one at a time: read_frames' single seek without holding
    the range in memory (writers of one range of a long video)."""
    held: dict[int, Frame] = {}
    nxt = start
    frames = _wanted_frames(path, list(range(start, stop)), threads, max_pixels)
    try:
        for frame in frames:
            held[frame.index] = frame
            while nxt in held:
                yield held.pop(nxt)
                nxt += 1
            if nxt == stop:
                return
    finally:
        frames.close()
    if nxt < stop:
        raise VideoError(path, f"could not decode frames {list(range(nxt, min(stop, nxt + 5)))} (damaged file)")


class _SeekFailed(Exception):
    """The seek cannot be trusted (no pts-to-index map, or it landed late): count from the start."""


def _wanted_frames(path: str | Path, wanted: list[int], threads: bool, max_pixels: int) -> Iterator[Frame]:
    """The wanted frames (sorted, distinct) as the decoder gives them: after one seek where it
    can be trusted (or from where this thread's last read of the file stopped, when that is no
    farther back), else counting from the start."""
    if not wanted:
        return
    index, info = _index(path, max_pixels)
    if wanted[0] < 0:
        raise ValueError(f"frame indices must be >= 0, got {wanted[0]}")
    if wanted[-1] >= info.num_frames:
        raise VideoError(path, f"frame {wanted[-1]} asked for, the video has {info.num_frames}")
    if index.seekable:
        reader = _reader_for(path, index, wanted, threads)
        seeking = reader.read(wanted)
        kept = False
        try:
            try:
                first = next(seeking, None)
            except _SeekFailed:
                seeking.close()
            else:
                if first is not None:
                    yield first
                yield from seeking
                kept = True
                return
        except GeneratorExit:  # the caller has what it wanted: the decoder is as good as before
            kept = True
            raise
        finally:
            _keep_reader(reader) if kept and reader.resumable else reader.close()
    keep = set(wanted)
    yield from (f for f in iter_frames(path, threads=threads, max_pixels=max_pixels) if f.index in keep)


def _start_key(index: _Index, wanted: list[int]) -> int | None:
    """The last keyframe that is decoded before every wanted frame and shown no later than the
    first one: then no wanted frame is a leading picture of it (open GOPs)."""
    ok = np.flatnonzero((index.key_pos <= index.pos[wanted].min()) & (index.key_pts <= index.pts[wanted[0]]))
    return int(ok[-1]) if ok.size else None


# A worker's tasks of one job read consecutive stretches of its video, and two workers take
# every other task: with long GOPs (x264's default is 250 frames) each read would seek back to
# the same keyframe and decode what the last read already passed. So each thread keeps its last
# decoder open and carries on from it when the keyframe a seek would land on is no later than
# where it stopped, holding its last few frames (up to 48, 64 MiB) for the overlap of the
# next task. One open file per thread; it is closed when the thread reads another file.
_warm = threading.local()
_BEHIND_FRAMES, _BEHIND_BYTES = 48, 64 * 1024**2  # decoded frames a kept decoder holds (yuv420p bytes)


def _file_key(path: str | Path, threads: bool) -> tuple:
    st = os.stat(path)
    return str(path), st.st_ino, st.st_mtime_ns, st.st_size, threads


def _reader_for(path: str | Path, index: _Index, wanted: list[int], threads: bool) -> _Reader:
    start = _start_key(index, wanted)
    key = _file_key(path, threads)
    warm: _Reader | None = getattr(_warm, "reader", None)
    _warm.reader = None
    if warm is not None:
        if warm.key == key and warm.index is index and warm.can_continue_to(wanted, start):
            return warm
        warm.close()
    reader = _Reader(path, index, threads, key)
    try:
        reader.seek(start)
    except BaseException:
        reader.close()
        raise
    return reader


def _read_seeking(path: str | Path, index: _Index, wanted: list[int], threads: bool) -> Iterator[Frame]:
    """The wanted frames after one seek, on a decoder of their own; raises _SeekFailed before
    the first frame if the seek cannot be trusted."""
    reader = _Reader(path, index, threads, _file_key(path, threads))
    try:
        reader.seek(_start_key(index, wanted))
        yield from reader.read(wanted)
    finally:
        reader.close()


def _keep_reader(reader: _Reader) -> None:
    old = getattr(_warm, "reader", None)
    if old is not None and old is not reader:
        old.close()
    _warm.reader = reader


def release_reader() -> None:
    """Close this thread's kept decoder (a worker with nothing to do gives its file back)."""
    reader = getattr(_warm, "reader", None)
    _warm.reader = None
    if reader is not None:
        reader.close()


class _Reader:
    """An open decoder of a seekable file that reads stretches of frames in order, carrying on
    from where the last stretch stopped (frames still in the decoder included)."""

    def __init__(self, path: str | Path, index: _Index, threads: bool, key: tuple) -> None:
        self.path, self.index, self.key = path, index, key
        self.container = _open(path)
        try:
            self.stream = _video_stream(self.container, path)
        except BaseException:
            self.container.close()
            raise
        if threads:
            self.stream.thread_type = "AUTO"
        self.codec = self.stream.codec_context
        self.tb = self.stream.time_base
        self.skipping = False
        self.target_pts = 0
        self.last = -1  # the last frame the decoder gave (presentation order), -1 before any
        # The last frames it gave, undecoded to BGR: consecutive tasks overlap by a clip's
        # context, which would otherwise send the next read back to the keyframe.
        self.behind: OrderedDict[int, av.VideoFrame] = OrderedDict()
        self._behind_max = max(1, min(_BEHIND_FRAMES, _BEHIND_BYTES // max(1, index.width * index.height * 3 // 2)))
        self.resumable = True  # false once the demuxer ended or an error left the decoder unknown
        self._start_pos, self._landed = 0, True
        self._decoded = self._decode()

    def seek(self, start: int | None) -> None:
        index = self.index
        if start is not None and index.key_pos[start] > 0:
            self._start_pos, self._landed = int(index.key_pos[start]), False
            # Demuxers index by dts (MP4) or pts (Matroska): the smaller one never lands late.
            ts = int(index.key_pts[start])
            if index.key_dts[start] != _NO_PTS:
                ts = min(ts, int(index.key_dts[start]))
            try:
                self.container.seek(ts, stream=self.stream, backward=True, any_frame=False)
            except av.FFmpegError:
                raise _SeekFailed from None

    def can_continue_to(self, wanted: list[int], start: int | None) -> bool:
        """Whether carrying on gives the wanted frames with no more decoding than seeking would:
        those up to where it stopped are still held, and the keyframe a seek would land on is
        no later than that."""
        if not self.resumable or self.last < 0 or any(i not in self.behind for i in wanted if i <= self.last):
            return False
        return start is None or self.index.key_pts[start] <= self.index.pts[self.last]

    def close(self) -> None:
        self.resumable = False
        self._decoded.close()
        self.container.close()

    def _decode(self) -> Iterator[tuple[int, av.VideoFrame]]:
        index, codec = self.index, self.codec
        for packet in self.container.demux(self.stream):
            # Frames shown before the first wanted one are decoded only as references: a
            # non-reference frame among them (most B-frames) is skipped, which changes no other
            # frame's pixels. With long GOPs that is much of the work of a read mid-video.
            if packet.pts is not None and (packet.pts < self.target_pts) != self.skipping:
                self.skipping = not self.skipping
                codec.skip_frame = "NONREF" if self.skipping else "DEFAULT"
            if packet.size and not self._landed:
                if packet.pts is None:
                    raise _SeekFailed
                at = np.flatnonzero(index.all_pts == packet.pts)
                if not at.size or at.max() > self._start_pos:
                    raise _SeekFailed  # landed after the keyframe we need
                self._landed = True
            for frame in packet.decode():
                i = int(np.searchsorted(index.pts, frame.pts)) if frame.pts is not None else -1
                if 0 <= i < index.pts.size and index.pts[i] == frame.pts:
                    self.last = max(self.last, i)
                    self.behind[i] = frame
                    if len(self.behind) > self._behind_max:
                        self.behind.popitem(last=False)
                    yield i, frame

    def read(self, wanted: list[int]) -> Iterator[Frame]:
        """The wanted frames (sorted, all after `last`) as decoded; raises _SeekFailed before the
        first frame if the seek cannot be trusted."""
        index, path = self.index, self.path
        self.target_pts = int(index.pts[wanted[0]])
        keep, got = set(wanted), set()
        for i in wanted:  # those already decoded (can_continue_to saw them held)
            if i > self.last:
                break
            got.add(i)
            frame = self.behind[i]
            yield Frame(i, _seconds(frame.pts, self.tb), _to_bgr(frame, _rotation(frame, self.stream)))
        if len(got) == len(keep):
            return
        try:
            for i, frame in self._decoded:
                if i in keep and i not in got:
                    if (frame.width, frame.height) != (index.width, index.height):
                        raise VideoError(path, f"the frame size changes at frame {i}, which is not supported")
                    got.add(i)
                    yield Frame(i, _seconds(frame.pts, self.tb), _to_bgr(frame, _rotation(frame, self.stream)))
                if len(got) == len(keep):
                    return
            self.resumable = False  # the demuxer ended
        except (av.FFmpegError, VideoError, _SeekFailed) as e:
            self.resumable = False
            if isinstance(e, av.FFmpegError):
                raise VideoError(path, f"decoding failed (damaged or truncated: {_reason(e)})") from None
            raise
