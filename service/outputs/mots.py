"""KITTI-MOTS text: `frame track_id class_id height width rle` per mask.

Track ids are class_id * 1000 + index, index being the track's 1-based position in
result.kept() (the benchmark's convention for carrying the class in the id; the kept
order is longest-lived first). Frames where a track has no mask give no line."""

from __future__ import annotations

from pathlib import Path

from service.pipeline.tracks import VideoResult


def mots_lines(result: VideoResult) -> list[str]:
    """The file's lines, sorted by frame then track id."""
    rows = []
    for index, track in enumerate(result.kept(), start=1):
        cls = track.voted_category()
        for f, rle in track.masks.items():
            counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
            rows.append((f, cls * 1000 + index, cls, int(rle["size"][0]), int(rle["size"][1]), counts))
    return [" ".join(map(str, r)) for r in sorted(rows, key=lambda r: (r[0], r[1]))]


def write_mots(result: VideoResult, path: Path) -> None:
    lines = mots_lines(result)
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
