"""`stemseg eval`: ground truth in, benchmark numbers out.

The ground truth is a YouTube-VIS annotation document (or a `stemseg synth` folder holding
one as annotations.json, with the videos it names). Predictions are YouTube-VIS results
entries: read from a file, or made here by running a model over the dataset's videos with the
same pipeline `stemseg segment` uses. Every metric is computed from those entries.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from service.evaluation.tracking import evaluate_davis, evaluate_mots
from service.evaluation.ytvis import bootstrap_ytvis, evaluate_ytvis

METRICS = ("ytvis", "davis", "mots")


def load_ground_truth(path: Path) -> tuple[dict, Path]:
    """The annotation document and the folder its video file names are relative to."""
    file = path / "annotations.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no YouTube-VIS annotation file (expected annotations.json)")
    try:
        doc = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a JSON document ({e})") from None
    missing = [k for k in ("videos", "annotations", "categories") if k not in doc]
    if missing:
        raise ValueError(f"{file}: not a YouTube-VIS annotation document (no {', '.join(missing)})")
    return doc, file.parent


def load_ground_truths(paths: Sequence[Path]) -> tuple[dict, Path]:
    """Several sets pooled into one document: videos and annotations renumbered in the order given
    (so results saved from the same pooled sets keep matching), video file names made absolute,
    `info` the list of the sets' own. One path: that set as it is."""
    if len(paths) == 1:
        return load_ground_truth(paths[0])
    pooled: dict = {"videos": [], "annotations": [], "categories": None, "info": []}
    for path in paths:
        doc, root = load_ground_truth(path)
        categories = sorted((c["id"], c["name"]) for c in doc["categories"])
        if pooled["categories"] is not None and categories != sorted(
                (c["id"], c["name"]) for c in pooled["categories"]):
            raise ValueError(f"{path}: its categories differ from the first set's; sets pool only with the same ones")
        pooled["categories"] = doc["categories"]
        ids = {}
        for v in sorted(doc["videos"], key=lambda v: v["id"]):
            ids[v["id"]] = len(pooled["videos"]) + 1
            video = {**v, "id": ids[v["id"]]}
            if "file_name" in v:
                video["file_name"] = str((root / v["file_name"]).resolve())
            pooled["videos"].append(video)
        for a in doc["annotations"]:
            if a["video_id"] in ids:
                pooled["annotations"].append({**a, "id": len(pooled["annotations"]) + 1,
                                              "video_id": ids[a["video_id"]]})
        pooled["info"].append(doc.get("info", {"path": str(path)}))
    return pooled, Path("/")


def predict(gt: dict, root: Path, engine, *, options=None,
            progress: Callable[[int], None] | None = None) -> list[dict]:
    """Run the pipeline over every video of the dataset; YouTube-VIS results entries."""
    from service.outputs.ytvis import ytvis_entries
    from service.pipeline.session import open_video

    entries: list[dict] = []
    for video in gt["videos"]:
        session = open_video(root / video["file_name"], engine, options=options)
        for _ in session.propagate():
            if progress:
                progress(1)
        entries.extend(ytvis_entries(session.result(), video_id=video["id"]))
    return entries


def evaluate(gt: dict, predictions: Iterable[dict], metrics: Iterable[str] = METRICS, *, bootstrap: int = 0) -> dict:
    """The metrics asked for; with bootstrap > 0 also the YouTube-VIS metrics' spread over that many
    resamplings of the videos (bootstrap_ytvis)."""
    predictions = list(predictions)
    out: dict = {}
    if "ytvis" in metrics:
        out.update(evaluate_ytvis(gt, predictions))
        if bootstrap:
            out["bootstrap"] = bootstrap_ytvis(gt, predictions, replicates=bootstrap)
    if "davis" in metrics:
        out.update(evaluate_davis(gt, predictions))
    if "mots" in metrics:
        mots = evaluate_mots(gt, predictions)
        out.update({k: v for k, v in mots.items() if k != "per_class"})
        out["per_class_mots"] = mots["per_class"]
    out["videos"] = len(gt["videos"])
    if "info" in gt:  # what `stemseg synth` made it from (seed, frames, size): reports say which set they scored
        out["dataset"] = gt["info"]
    return out


__all__ = ["METRICS", "evaluate", "load_ground_truth", "load_ground_truths", "predict"]
