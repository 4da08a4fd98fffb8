"""DAVIS J&F and MOTS (HOTA, sMOTSA, MOTSA) through the `trackeval` package's metric classes.

trackeval's dataset classes read the benchmarks' own folder layouts; ours are a YouTube-VIS
document and results entries, so this module converts them to the per-sequence dicts that
`JAndF`, `HOTA` and `CLEAR` evaluate, and lets trackeval do all the scoring and combining.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from service.evaluation.ytvis import as_rle

DAVIS_MAX_PROPOSALS = 20  # the DAVIS 2017 unsupervised protocol scores at most 20 objects per video


def _metrics():
    try:
        from trackeval.metrics import CLEAR, HOTA, JAndF
    except ImportError as e:  # an optional extra: say how to get it rather than crash
        raise RuntimeError(f"DAVIS and MOTS metrics need trackeval ({e.name} missing): "
                           "pip install 'stemseg-serve[eval]'") from None
    return CLEAR, HOTA, JAndF


def _by_video(gt: dict, predictions: Iterable[dict]) -> dict[int, tuple[dict, list[dict], list[dict]]]:
    gts, dts = defaultdict(list), defaultdict(list)
    for a in gt["annotations"]:
        gts[a["video_id"]].append(a)
    for p in predictions:
        dts[p["video_id"]].append(p)
    return {v["id"]: (v, gts[v["id"]], dts[v["id"]]) for v in gt["videos"]}


def _sequence(length: int, gts: Sequence[dict], dts: Sequence[dict], *, with_masks: bool) -> dict:
    """trackeval's per-sequence data: ids per frame (0-based), and either masks or IoUs."""
    g_rles = [[as_rle(s) for s in a["segmentations"]] for a in gts]
    d_rles = [[as_rle(s) for s in p["segmentations"]] for p in dts]
    data: dict = {"num_timesteps": length, "num_gt_ids": len(gts), "num_tracker_ids": len(dts),
                  "gt_ids": [], "tracker_ids": [], "gt_dets": [], "tracker_dets": [], "similarity_scores": []}
    for t in range(length):
        g_idx = [i for i, r in enumerate(g_rles) if r[t] is not None]
        d_idx = [i for i, r in enumerate(d_rles) if r[t] is not None]
        g_t, d_t = [g_rles[i][t] for i in g_idx], [d_rles[i][t] for i in d_idx]
        data["gt_ids"].append(np.array(g_idx, int))
        data["tracker_ids"].append(np.array(d_idx, int))
        data["gt_dets"].append(g_t)
        data["tracker_dets"].append(d_t)
        iou = mask_utils.iou(d_t, g_t, [0] * len(g_t)) if g_t and d_t else np.zeros((len(d_t), len(g_t)))
        data["similarity_scores"].append(np.asarray(iou, float).reshape(len(d_t), len(g_t)).T)  # [gt, tracker]
    data["num_gt_dets"] = sum(len(x) for x in data["gt_ids"])
    data["num_tracker_dets"] = sum(len(x) for x in data["tracker_ids"])
    if not with_masks:
        del data["gt_dets"], data["tracker_dets"]
    return data


def evaluate_davis(gt: dict, predictions: Iterable[dict]) -> dict:
    """DAVIS 2017 unsupervised J&F: each video's (at most 20, best scored) predicted objects are
    matched to its ground-truth objects by the Hungarian method on mean J&F, as that protocol does."""
    _, _, JAndF = _metrics()
    metric = JAndF()
    metric.optim_type = "J&F"
    per_video = {}
    for vid, (video, gts, dts) in _by_video(gt, predictions).items():
        if not gts:
            continue  # J&F is defined per ground-truth object
        dts = sorted(dts, key=lambda p: -p["score"])[:DAVIS_MAX_PROPOSALS]
        per_video[vid] = metric.eval_sequence(_sequence(video["length"], gts, dts, with_masks=True))
    if not per_video:
        return {"J&F": -1.0, "J-Mean": -1.0, "F-Mean": -1.0}
    res = metric.combine_sequences(per_video)
    return {"J&F": float(res["J&F"]), "J-Mean": float(res["J-Mean"]), "F-Mean": float(res["F-Mean"]),
            "J-Recall": float(res["J-Recall"]), "F-Recall": float(res["F-Recall"])}


def evaluate_mots(gt: dict, predictions: Iterable[dict]) -> dict:
    """HOTA, sMOTSA and MOTSA (CLEAR with mask IoU) per class, as KITTI MOTS scores cars and
    pedestrians apart, then averaged over the classes that have ground truth."""
    CLEAR, HOTA, _ = _metrics()
    hota, clear = HOTA(), CLEAR({"PRINT_CONFIG": False})
    videos = _by_video(gt, predictions)
    per_class = {}
    scored = {a["category_id"] for a in gt["annotations"]}
    for c in (c for c in gt["categories"] if c["id"] in scored):
        h_res, c_res = {}, {}
        for vid, (video, gts, dts) in videos.items():
            data = _sequence(video["length"], [a for a in gts if a["category_id"] == c["id"]],
                             [p for p in dts if p["category_id"] == c["id"]], with_masks=False)
            h_res[vid], c_res[vid] = hota.eval_sequence(data), clear.eval_sequence(data)
        h, m = hota.combine_sequences(h_res), clear.combine_sequences(c_res)
        per_class[c["name"]] = {"HOTA": float(np.mean(h["HOTA"])), "DetA": float(np.mean(h["DetA"])),
                                "AssA": float(np.mean(h["AssA"])), "sMOTSA": float(m["sMOTA"]),
                                "MOTSA": float(m["MOTA"]), "IDSW": int(m["IDSW"])}
    if not per_class:
        return {"HOTA": -1.0, "sMOTSA": -1.0, "MOTSA": -1.0, "per_class": {}}
    metrics = ("HOTA", "DetA", "AssA", "sMOTSA", "MOTSA")
    return {**{k: float(np.mean([v[k] for v in per_class.values()])) for k in metrics}, "per_class": per_class}


__all__ = ["evaluate_davis", "evaluate_mots"]
