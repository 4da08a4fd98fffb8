"""What a container's own index says it holds, read before FFmpeg opens the file.

FFmpeg builds its whole index while opening some containers: every sample of an MP4/MOV's
sample tables (about 80 bytes each in memory) and every entry of an AVI's idx1 and OpenDML
indexes (about 24 bytes each). A few kilobytes of tables can claim millions of frames, so the
counts are taken from the box and chunk headers here, in constant memory, and the probe
refuses the file before FFmpeg allocates anything (``service.video.decode``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

_CHECK_EVERY = 256

# ISO BMFF boxes walked for sample counts; everything else is skipped by its size.
_BOX_PARENTS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"}
_ISO_FIRST = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp"}
_MAX_BOXES = 1_000_000
_MAX_BOX_DEPTH = 8


def _iso_sample_counts(path: str | Path, check_time: Callable[[], None]) -> tuple[int, int] | None:
    """(most samples of a video track, samples of all tracks) as an MP4/MOV/3GP file's sample
    tables (stsz/stz2) and fragments (trun) list them; None if the file is not ISO BMFF. Reads
    box headers only; a damaged box tree stops the walk (FFmpeg then says what is wrong)."""
    video_tracks: set[int] = set()
    per_track: dict[int, int] = {}
    state = {"track": 0, "boxes": 0}

    def walk(f, start: int, end: int, depth: int) -> bool:
        if depth > _MAX_BOX_DEPTH:  # moov/trak/mdia/minf/stbl is 5 deep; more is a hostile file
            return False
        pos = start
        while pos + 8 <= end:
            state["boxes"] += 1
            if state["boxes"] > _MAX_BOXES:
                return False
            if state["boxes"] % _CHECK_EVERY == 0:
                check_time()
            f.seek(pos)
            head = f.read(16)
            if len(head) < 8:
                return False
            size, kind = struct.unpack(">I4s", head[:8])
            header = 8
            if size == 1:
                if len(head) < 16:
                    return False
                size, header = struct.unpack(">Q", head[8:16])[0], 16
            elif size == 0:
                size = end - pos
            if size < header or pos + size > end:
                return False
            body = pos + header
            if kind in _BOX_PARENTS:
                if kind in (b"trak", b"traf"):
                    state["track"] = 0
                if not walk(f, body, pos + size, depth + 1):
                    return False
            elif kind in (b"tkhd", b"tfhd", b"hdlr", b"stsz", b"stz2", b"trun"):
                f.seek(body)
                data = f.read(24)
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
        return True

    size = os.stat(path).st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8 or first[4:8] not in _ISO_FIRST:
            return None
        walk(f, 0, size, 0)
    video = max((per_track.get(t, 0) for t in video_tracks), default=0)
    return video, sum(per_track.values())


def _avi_index_counts(path: str | Path) -> tuple[int, int] | None:
    """(video frames, index entries) an AVI's indexes list: the frames of its video streams'
    OpenDML super indexes (`indx`, what FFmpeg follows into every `ix##` chunk) and the entries
    of its `idx1`; None if the file is not AVI. FFmpeg reads all of them while opening."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"AVI ":
            return None
        video = entries = 0
        end = os.stat(path).st_size

        def chunks(start: int, stop: int):
            pos, seen = start, 0
            while pos + 8 <= stop and seen < _MAX_BOXES:
                f.seek(pos)
                cid, size = struct.unpack("<4sI", f.read(8))
                yield cid, pos + 8, size
                pos += 8 + size + (size & 1)
                seen += 1

        for cid, body, size in chunks(12, end):
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
                            _, _, _, n = struct.unpack("<HBBI", f.read(8))
                            f.seek(ibody + 24)
                            n = min(n, max(isize - 24, 0) // 16)
                            table = f.read(16 * n)
                            video += sum(struct.unpack_from("<QII", table, 16 * i)[2] for i in range(len(table) // 16))
    return video, entries


def declared_counts(path: str | Path, check_time: Callable[[], None]) -> tuple[int, int] | None:
    """(frames of the video track, samples or index entries of all tracks) as an ISO BMFF or AVI
    file's index states them; None for other containers. `check_time` is called now and then
    (it raises when the caller's time is up). A truncated header raises struct.error or OSError."""
    return _iso_sample_counts(path, check_time) or _avi_index_counts(path)
