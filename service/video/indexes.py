"""What a container's own index says it holds, read before FFmpeg opens the file.

FFmpeg builds its whole index while opening some containers: every sample of an MP4/MOV's
sample tables (about 80 bytes each in memory) and every entry of an AVI's idx1 and OpenDML
indexes (about 24 bytes each). A few kilobytes of tables can claim millions of frames, so the
counts are taken from the box and chunk headers here, in constant memory, and the probe
refuses the file before FFmpeg allocates anything (``service.video.decode``).

The check fails closed. A file is walked as ISO BMFF whenever FFmpeg's own mov probe would
take it (any box type that probe scores, anywhere in the chain of top-level boxes it reads,
not only a first ``ftyp``), the walk descends into every container box FFmpeg parses, and a
file the walk cannot follow to the end (nesting too deep, too many boxes inside the movie
header, a compressed movie header) raises ``Unindexable``, which the probe turns into a
refusal: it is never handed to FFmpeg uncounted.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

_CHECK_EVERY = 256

# Top-level box types that make FFmpeg's mov probe (libavformat/mov.c mov_probe) score a file.
_MOV_PROBE_TAGS = {b"moov", b"mdat", b"pnot", b"udta", b"ftyp", b"ediw", b"wide", b"free", b"junk", b"pict",
                   b"\x82\x82\x7f\x7d", b"skip", b"uuid", b"prfl"}
# FFmpeg probes with the first 1 MiB (PROBE_BUF_MAX); twice that covers it.
_PROBE_BYTES = 2 * 1024 * 1024
# Boxes FFmpeg parses as lists of boxes (mov_read_default and the readers that call it): any of
# them can hold a trak or a sample table. Every other box is skipped by its size, as FFmpeg does.
_BOX_PARENTS = {b"moov", b"hoov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf", b"edts", b"dinf",
                b"mvex", b"udta", b"ilst", b"sinf", b"schi", b"tref", b"wave", b"clip", b"matt", b"iprp",
                b"ipco", b"mfra"}
# Boxes within the top-level ones; the top level itself is skipped by size and is only timed.
_MAX_BOXES = 1_000_000
_MAX_BOX_DEPTH = 10  # FFmpeg gives up past 10 ("atoms too deeply nested")
_ID3 = b"ID3"


class Unindexable(ValueError):
    """The container's index cannot be counted without letting FFmpeg build it: `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _id3_length(head: bytes) -> int:
    """Bytes of an ID3v2 tag at the start (FFmpeg skips it before probing), else 0."""
    if len(head) < 10 or not head.startswith(_ID3) or head[3] == 0xFF or head[4] == 0xFF:
        return 0
    if any(b & 0x80 for b in head[6:10]):
        return 0
    size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
    return 10 + size + (10 if head[5] & 0x10 else 0)


def probes_as_mov(buf: bytes) -> bool:
    """Whether FFmpeg's mov probe gives `buf` (a file's first bytes) any score: its walk over the
    chain of top-level boxes, stepping 4 bytes past a size too small to be a box."""
    offset, n = 0, len(buf)
    while offset + 8 <= n:
        size = struct.unpack_from(">I", buf, offset)[0]
        minsize = 8
        if size == 1 and offset + 16 <= n:
            size, minsize = struct.unpack_from(">Q", buf, offset + 8)[0], 16
        elif size == 0:
            size = n - offset
        if size < minsize:
            offset += 4
            continue
        if buf[offset + 4:offset + 8] in _MOV_PROBE_TAGS:
            return True
        offset += size
    return False


def _iso_sample_counts(f, start: int, end: int, check_time: Callable[[], None]) -> tuple[int, int]:
    """(most samples of a video track, samples of all tracks) as an MP4/MOV/3GP file's sample
    tables (stsz/stz2) and fragments (trun) list them. Reads box headers only and follows
    FFmpeg's rules: a box past the end is cut to it, a size too small ends its list."""
    video_tracks: set[int] = set()
    per_track: dict[int, int] = {}
    state = {"track": 0, "boxes": 0, "top": 0}

    def header(pos: int, end: int) -> tuple[int, bytes, int] | None:
        """(size, type, header length) of the box at pos, None where FFmpeg stops the list."""
        f.seek(pos)
        head = f.read(16)
        if len(head) < 8:
            return None
        size, kind = struct.unpack(">I4s", head[:8])
        length = 8
        if size == 1 and pos + 16 <= end and len(head) == 16:
            size, length = struct.unpack(">Q", head[8:16])[0], 16
        elif size == 0:
            size = end - pos
        if size < length:
            return None
        return min(size, end - pos), kind, length

    def walk(start: int, end: int, depth: int) -> None:
        if depth > _MAX_BOX_DEPTH:
            raise Unindexable(f"its boxes are nested more than {_MAX_BOX_DEPTH} deep")
        pos = start
        while pos + 8 <= end:
            if depth:
                state["boxes"] += 1
                if state["boxes"] > _MAX_BOXES:
                    raise Unindexable(f"its movie header holds more than {_MAX_BOXES} boxes")
                count = state["boxes"]
            else:
                state["top"] += 1
                count = state["top"]
            if count % _CHECK_EVERY == 0:
                check_time()
            box = header(pos, end)
            if box is None:
                return
            size, kind, length = box
            body, stop = pos + length, pos + size
            if kind == b"cmov":
                raise Unindexable("its movie header is compressed (cmov), which is not supported")
            if kind in _BOX_PARENTS or (kind == b"free" and _starts_with(body, stop, b"mvhd")):
                # a `free` that holds an mvhd is read as the movie header when no moov is found
                if kind in (b"trak", b"traf"):
                    state["track"] = 0
                walk(body, stop, depth + 1)
            elif kind == b"meta":
                # FFmpeg looks for the hdlr 4 bytes at a time (QuickTime meta has no version field)
                at = _find_aligned(body, stop, b"hdlr", check_time)
                if at is not None:
                    walk(at - 4, stop, depth + 1)
            elif kind in (b"tkhd", b"tfhd", b"hdlr", b"stsz", b"stz2", b"trun"):
                f.seek(body)
                data = f.read(min(24, stop - body))
                if kind == b"tkhd" and len(data) >= 24:
                    state["track"] = struct.unpack(">I", data[20:24] if data[0] == 1 else data[12:16])[0]
                elif kind == b"tfhd" and len(data) >= 8:
                    state["track"] = struct.unpack(">I", data[4:8])[0]
                elif kind == b"hdlr" and len(data) >= 12 and data[8:12] == b"vide":
                    video_tracks.add(state["track"])
                elif kind in (b"stsz", b"stz2") and len(data) >= 12:
                    n = struct.unpack(">I", data[8:12])[0]
                    per_track[state["track"]] = per_track.get(state["track"], 0) + n
                elif kind == b"trun" and len(data) >= 8:
                    n = struct.unpack(">I", data[4:8])[0]
                    per_track[state["track"]] = per_track.get(state["track"], 0) + n
            pos += size

    def _starts_with(body: int, stop: int, kind: bytes) -> bool:
        if stop - body < 8:
            return False
        f.seek(body + 4)
        return f.read(4) == kind

    def _find_aligned(body: int, stop: int, tag: bytes, check_time: Callable[[], None]) -> int | None:
        # where a `tag` 4-aligned from `body` starts (FFmpeg then reads the box 4 bytes before it)
        block = 1 << 20
        for at in range(body, stop - 4, block):
            check_time()
            f.seek(at)
            data = f.read(min(block + 3, stop - at))
            i = data.find(tag)
            while i >= 0:
                if i % 4 == 0 and at + i + 4 <= stop:
                    return at + i
                i = data.find(tag, i + 1)
        return None

    walk(start, end, 0)
    video = max((per_track.get(t, 0) for t in video_tracks), default=0)
    return video, sum(per_track.values())


# RIFF forms FFmpeg's AVI probe takes (libavformat/avidec.c avi_headers).
_AVI_FORMS = {(b"RIFF", b"AVI "), (b"RIFF", b"AVIX"), (b"RIFF", b"AVI\x19"), (b"ON2 ", b"ON2f"),
              (b"RIFF", b"AMV "), (b"RF64", b"AVI ")}


def _avi_index_counts(f, end: int, check_time: Callable[[], None]) -> tuple[int, int]:
    """(video frames, index entries) an AVI's indexes list: the frames of its video streams'
    OpenDML super indexes (`indx`, what FFmpeg follows into every `ix##` chunk) and the entries
    of its `idx1`. FFmpeg reads all of them while opening. Chunks inside the header lists count
    together against one cap; the top level is skipped by size and only timed."""
    seen = {"inner": 0, "top": 0}

    def chunks(start: int, stop: int, top: bool = False):
        pos = start
        while pos + 8 <= stop:
            key = "top" if top else "inner"
            seen[key] += 1
            if not top and seen[key] > _MAX_BOXES:
                raise Unindexable(f"its header lists more than {_MAX_BOXES} chunks")
            if seen[key] % _CHECK_EVERY == 0:
                check_time()
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                return
            cid, size = struct.unpack("<4sI", head)
            yield cid, pos + 8, size
            pos += 8 + size + (size & 1)

    video = entries = 0
    for cid, body, size in chunks(12, end, top=True):
        if cid == b"idx1":
            entries += size // 16
        elif cid == b"LIST" and f.read(4) == b"hdrl":
            for sid, sbody, ssize in chunks(body + 4, body + size):
                f.seek(sbody)
                if sid != b"LIST" or f.read(4) != b"strl":
                    continue
                kind = b""
                for iid, ibody, isize in chunks(sbody + 4, sbody + ssize):
                    f.seek(ibody)
                    if iid == b"strh":
                        kind = f.read(4)
                    elif iid == b"indx" and kind == b"vids" and isize >= 24:
                        head = f.read(8)
                        if len(head) < 8:
                            continue
                        n = struct.unpack("<HBBI", head)[3]
                        f.seek(ibody + 24)
                        n = min(n, max(isize - 24, 0) // 16)
                        table = f.read(16 * n)
                        video += sum(struct.unpack_from("<QII", table, 16 * i)[2] for i in range(len(table) // 16))
    return video, entries


def declared_counts(path: str | Path, check_time: Callable[[], None]) -> tuple[int, int] | None:
    """(frames of the video track, samples or index entries of all tracks) as an ISO BMFF or AVI
    file's index states them; None for containers FFmpeg does not index while opening.
    `check_time` is called now and then (it raises when the caller's time is up). Raises
    Unindexable where the walk cannot be finished."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(_PROBE_BYTES)
        if len(head) >= 12 and (head[:4], head[8:12]) in _AVI_FORMS:
            return _avi_index_counts(f, size, check_time)
        skip = _id3_length(head)
        if probes_as_mov(head[skip:]):
            return _iso_sample_counts(f, skip, size, check_time)
    return None
