"""KITTI-MOTS text: `frame track_id class_id height width rle` per mask.

Track ids are class_id * 1000 + the track's 1-based rank among the kept tracks, the
benchmark's convention for encoding the class in the id."""

from __future__ import annotations

from pathlib import Path

from service.pipeline.tracks import VideoResult


def mots_lines(result: VideoResult) -> list[str]:
    rows = []
    for index, track in enumerate(result.kept(), start=1):
        cls = track.voted_category()
        for f, rle in track.masks.items():
            counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
            rows.append((f, cls * 1000 + index, cls, rle["size"][0], rle["size"][1], counts))
    return [" ".join(map(str, r)) for r in sorted(rows, key=lambda r: (r[0], r[1]))]


def write_mots(result: VideoResult, path: Path) -> None:
    lines = mots_lines(result)
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
