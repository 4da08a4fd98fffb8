"""YouTube-VIS results JSON: one entry per kept track, COCO RLE per frame or null."""

from __future__ import annotations

import json
from pathlib import Path

from service.pipeline.tracks import VideoResult


def rle_to_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(x) for x in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def ytvis_entries(result: VideoResult, video_id: int = 1) -> list[dict]:
    kept = result.kept()
    entries = []
    for track, score in zip(kept, result.scores(kept)):
        category = track.category()
        entries.append({
            "video_id": video_id, "track_id": track.id, "score": score, "category_id": category,
            "category_name": result.classes.get(category, str(category)),
            "segmentations": [rle_to_json(track.masks[f]) if f in track.masks else None
                              for f in range(result.num_frames)],
        })
    return entries


def write_ytvis(result: VideoResult, path: Path, video_id: int = 1) -> None:
    path.write_text(json.dumps(ytvis_entries(result, video_id)))


__all__ = ["rle_to_json", "write_ytvis", "ytvis_entries"]
