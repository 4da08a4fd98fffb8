"""Outputs written in ranges of frames, then assembled: one video's outputs from many workers or
processes at once.

What is known when decides the shape. A frame's tracks (ids, RLE masks) are final as soon as its
clip is stitched, but everything the outputs *show* about a track is decided only by the last
clip: which tracks are kept (the longest-lived `max_tracks`), their order (the DAVIS index, the
MOTS id, the overlay colour), their category (class evidence summed over the whole video) and
their score (pixels relative to the largest kept track, printed in the overlay's labels). A
track seen in frame 10 can still be dropped, re-ranked or re-classed by frame 3,000, so no pixel
of a DAVIS PNG or of the overlay can be final before the end, and no label can be guessed early
without sometimes being wrong. So:

1. `Labels.decide` (at the end; cost per track, no frames): the final id, rank, class, score,
   colour and text of every kept track.
2. `render_range` (any worker or process, one per range, all at once): everything that costs per
   frame or per pixel: decoding the video, decoding masks, drawing, PNG and H.264 encoding. It
   writes DAVIS PNGs straight to their final names, and for the other formats a part per range:
   an overlay segment (its own H.264 stream starting with a keyframe), MOTS lines, and per track
   the YouTube-VIS segmentations of its frames as JSON text.
3. `assemble` (one place, short; cost per range and per track, never per pixel): overlay segments
   joined by remuxing their packets (no decoding or re-encoding), text parts concatenated.

The assembled files are byte for byte what the single writers give (`write_ytvis`, `write_mots`,
`write_davis`); the overlay differs only where each segment's encoder starts afresh (encoder
noise), and every decoded frame shows the same masks and labels.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service.outputs.davis import davis_palette
from service.outputs.labels import Labels
from service.outputs.names import NAMES, davis_frame
from service.outputs.overlay import OverlaySegment, draw_frame
from service.outputs.ytvis import rle_to_json
from service.pipeline.tracks import VideoResult

# frame -> {track id -> COCO RLE} for the frames of one range (kept tracks only are used).
RangeMasks = Mapping[int, Mapping[int, dict]]


def ranges(num_frames: int, size: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) frame ranges of at most `size` frames covering the video."""
    size = max(int(size), 1)
    return [(a, min(a + size, num_frames)) for a in range(0, num_frames, size)]


def range_masks(result: VideoResult, start: int, stop: int) -> dict[int, dict[int, dict]]:
    """The kept tracks' masks of one range of frames, from a whole VideoResult."""
    out: dict[int, dict[int, dict]] = {f: {} for f in range(start, stop)}
    for t in result.kept():
        for f in range(start, stop):
            if f in t.masks:
                out[f][t.id] = t.masks[f]
    return out


# -- the parts of one range ----------------------------------------------------------------------
def part_name(kind: str, start: int) -> str:
    """A range's part file: `kind` is "overlay", "mots" or "ytvis"; "done" marks a range complete."""
    return f"{kind}-{start:07d}" + {"overlay": ".mp4", "done": ""}.get(kind, ".txt")


def _atomic(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _write_text(path: Path, text: str) -> None:
    tmp = _atomic(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def render_range(labels: Labels, formats: Sequence[str], masks: RangeMasks, frames: Iterable[np.ndarray] | None,
                 start: int, stop: int, parts: Path) -> None:
    """Write frames [start, stop) of every format in `formats` under `parts` (see the module
    docstring). `frames`: the video's BGR frames of the range, needed for "overlay" only. Every
    file appears whole or not at all, and the range's `done` marker last, so a range cut short
    (a killed worker) is simply rendered again."""
    parts.mkdir(parents=True, exist_ok=True)
    kept = labels.tracks
    if "ytvis" in formats:
        # Per kept track, its segmentations over the range as the JSON text json.dumps would
        # give inside the whole list: assembling the file is then joining strings.
        lines = [", ".join(json.dumps(rle_to_json(masks[f][t.id])) if t.id in masks[f] else "null"
                           for f in range(start, stop)) for t in kept]
        _write_text(parts / part_name("ytvis", start), "".join(line + "\n" for line in lines))
    if "mots" in formats:
        rows = []
        for t in kept:
            for f in range(start, stop):
                rle = masks[f].get(t.id)
                if rle is not None:
                    counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
                    rows.append((f, t.mots_id, t.mots_class, int(rle["size"][0]), int(rle["size"][1]), counts))
        rows.sort(key=lambda r: (r[0], r[1]))
        _write_text(parts / part_name("mots", start), "".join(" ".join(map(str, r)) + "\n" for r in rows))
    if "overlay" in formats and frames is None:
        raise ValueError("the overlay format needs the video's frames")
    if "davis" in formats or "overlay" in formats:
        _render_pictures(labels, formats, masks, frames, start, stop, parts)
    _write_text(parts / part_name("done", start), "")


def _render_pictures(labels: Labels, formats: Sequence[str], masks: RangeMasks, frames: Iterable[np.ndarray] | None,
                     start: int, stop: int, parts: Path) -> None:
    """DAVIS PNGs and the overlay segment in one pass over the frames, each mask decoded once."""
    h, w = labels.height, labels.width
    davis = "davis" in formats
    overlay = "overlay" in formats
    painted = labels.davis_tracks
    # DAVIS colours, so the overlay matches the PNGs; index 0 is black background, hence cycling over 1..255.
    palette = np.array(davis_palette(), dtype=np.float32).reshape(256, 3)
    drawn = [labels.tracks[k] for k in labels.drawn]
    colours = [palette[k % 255 + 1] for k in labels.drawn]
    texts = [labels.overlay_text(k) for k in labels.drawn]
    empty = np.zeros((h, w), bool)
    needed = {t.id for t in painted} if davis else set()
    needed |= {t.id for t in drawn} if overlay else set()
    davis_dir = parts / NAMES["davis"]
    if davis:
        davis_dir.mkdir(parents=True, exist_ok=True)
    target = parts / part_name("overlay", start)
    tmp = _atomic(target)
    segment = OverlaySegment(tmp, h, w, labels.rate) if overlay else None
    try:
        try:
            # Exactly this range's frames, whether `frames` holds only them or the rest of the video.
            source = zip(range(start, stop), frames) if overlay else ((f, None) for f in range(start, stop))
            for f, bgr in source:
                decoded = {tid: mask_utils.decode(rle).astype(bool) for tid, rle in masks[f].items() if tid in needed}
                if davis:
                    _write_davis(davis_dir / davis_frame(f), decoded, painted, h, w)
                if overlay:
                    if bgr.shape != (h, w, 3):
                        raise ValueError(f"overlay frame {f} is {bgr.shape}, expected {(h, w, 3)}")
                    segment.write(draw_frame(bgr[:, :, ::-1], [decoded.get(t.id, empty) for t in drawn], texts,
                                             colours))
        finally:
            if segment is not None:
                segment.close()
        if overlay:
            if segment.frames != stop - start:
                raise RuntimeError(f"overlay got {segment.frames} frames for frames {start}-{stop - 1}")
            tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


_PALETTE = davis_palette()


def _write_davis(target: Path, decoded: dict[int, np.ndarray], painted: list, h: int, w: int) -> None:
    canvas = np.zeros((h, w), dtype=np.uint8)
    for k, t in enumerate(painted, start=1):
        if t.id in decoded:
            canvas[decoded[t.id]] = k
    img = Image.fromarray(canvas, mode="P")
    img.putpalette(_PALETTE)
    tmp = _atomic(target)
    try:
        img.save(tmp, format="PNG")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def range_done(parts: Path, start: int) -> bool:
    return (parts / part_name("done", start)).exists()


# -- assembly ------------------------------------------------------------------------------------
def assemble(labels: Labels, formats: Sequence[str], parts: Path, spans: Sequence[tuple[int, int]],
             out_dir: Path, video_id: int = 1) -> None:
    """Join the ranges' parts into the final files under out_dir (an existing directory); the
    parts are left as they were, for the caller to delete once the output is committed."""
    starts = [a for a, _ in spans]
    missing = [a for a in starts if not range_done(parts, a)]
    if missing:
        raise RuntimeError(f"frames from {missing[0]} were never rendered")
    if "ytvis" in formats:
        _assemble_ytvis(labels, [parts / part_name("ytvis", a) for a in starts], out_dir / NAMES["ytvis"], video_id)
    if "mots" in formats:
        _concatenate([parts / part_name("mots", a) for a in starts], out_dir / NAMES["mots"])
    if "davis" in formats:
        _link_all(parts / NAMES["davis"], out_dir / NAMES["davis"], [f for a, b in spans for f in range(a, b)])
    if "overlay" in formats:
        join_segments([parts / part_name("overlay", a) for a in starts], starts, labels.rate,
                      out_dir / NAMES["overlay"])


def _link_all(src: Path, dst: Path, frames: list[int]) -> None:
    """The PNGs hard-linked into the output (a syscall each, no copy), so the parts stay whole
    until the output is committed: a finishing step that fails can simply run again."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in frames:
        name = davis_frame(f)
        try:
            os.link(src / name, dst / name)
        except FileNotFoundError:
            raise RuntimeError(f"DAVIS frame {f} was never rendered") from None
        except OSError:  # a filesystem without hard links
            shutil.copyfile(src / name, dst / name)


def _assemble_ytvis(labels: Labels, paths: list[Path], target: Path, video_id: int) -> None:
    # Exactly json.dumps(ytvis_entries(...)): the same separators, values through json.dumps.
    per_range = [p.read_text().splitlines() for p in paths]
    with target.open("w") as out:
        out.write("[")
        for j, t in enumerate(labels.tracks):
            if j:
                out.write(", ")
            out.write(f'{{"video_id": {json.dumps(video_id)}, "track_id": {json.dumps(t.id)}, '
                      f'"score": {json.dumps(t.score)}, "category_id": {json.dumps(t.category)}, '
                      f'"category_name": {json.dumps(t.category_name)}, "segmentations": [')
            out.write(", ".join(lines[j] for lines in per_range))
            out.write("]}")
        out.write("]")


def _concatenate(paths: list[Path], target: Path) -> None:
    with target.open("wb") as out:
        for p in paths:
            with p.open("rb") as f:
                shutil.copyfileobj(f, out)


def join_segments(paths: Sequence[Path], starts: Sequence[int], rate: Fraction, target: Path) -> int:
    """One MP4 of the segments in order, their packets copied (no decoding or encoding) with time
    stamps moved to each segment's first frame; returns the packets written. The segments share
    one encoder configuration, so the first one's stream parameters describe them all; with
    B-frames each segment's decode delay is the same, so decode times stay increasing."""
    written = 0
    with av.open(str(target), mode="w", format="mp4") as out:
        ostream = None
        for path, start in zip(paths, starts):
            with av.open(str(path)) as seg:
                stream = seg.streams.video[0]
                if ostream is None:
                    ostream = out.add_stream_from_template(stream)
                    ostream.time_base = stream.time_base
                shift = Fraction(start) / rate / stream.time_base
                if shift.denominator != 1:
                    raise ValueError(f"segment start {start} is not a whole number of time-base units")
                for packet in seg.demux(stream):
                    if packet.dts is None:  # the demuxer's end-of-stream packet
                        continue
                    packet.pts += int(shift)
                    packet.dts += int(shift)
                    packet.stream = ostream
                    out.mux(packet)
                    written += 1
    return written
