"""YouTube-VIS results JSON: one entry per kept track, COCO RLE per frame or null."""

from __future__ import annotations

import json
from pathlib import Path

from pycocotools import mask as mask_utils

from service.pipeline.tracks import Track, VideoResult


def rle_to_json(rle: dict) -> dict:
    """pycocotools hands out bytes counts; JSON needs str."""
    counts = rle["counts"]
    return {"size": [int(x) for x in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def rle_box(rle: dict) -> list[float]:
    """[x, y, w, h] of a COCO RLE whose counts may be str (from JSON) or bytes (from pycocotools)."""
    counts = rle["counts"]
    return mask_utils.toBbox({"size": list(rle["size"]),
                              "counts": counts.encode() if isinstance(counts, str) else counts}).tolist()


def track_boxes(track: Track, num_frames: int) -> list[list[float] | None]:
    """Per-frame [x, y, w, h] of the track's mask, None where it has none."""
    return [rle_box(track.masks[f]) if f in track.masks else None for f in range(num_frames)]


def ytvis_entries(result: VideoResult, video_id: int = 1) -> list[dict]:
    # Boxes stay out of the file: the evaluation toolkit derives them, and the standard
    # results format has none; the API adds them with rle_box/track_boxes.
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


__all__ = ["rle_box", "rle_to_json", "track_boxes", "write_ytvis", "ytvis_entries"]
