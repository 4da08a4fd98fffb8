"""YouTube-VIS video AP: COCO's evaluation with IoU measured over a whole video.

The protocol is the one of the YouTube-VIS toolkit (its fork of cocoapi): a prediction and a
ground-truth track overlap by the sum over frames of their mask intersections divided by the
sum of their unions; matching, the ten IoU thresholds 0.50:0.05:0.95, the 101 recall points
and the detection limits (1, 10, 100 per video) are COCO's. Only the "all" area range is
scored: the synthetic and user datasets have no size buckets worth reporting.

`tests/test_eval.py` proves this equals pycocotools' COCOeval (segm) on one-frame videos.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)


def as_rle(seg: dict | None) -> dict | None:
    if seg is None:
        return None
    counts = seg["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as some annotation files hold
        return mask_utils.frPyObjects(seg, *seg["size"])
    return {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def video_iou(dets: Sequence[Sequence[dict | None]], gts: Sequence[Sequence[dict | None]]) -> np.ndarray:
    """[D, G] IoU of whole tracks: sum of per-frame intersections over sum of unions."""
    out = np.zeros((len(dets), len(gts)))
    if not dets or not gts:
        return out
    inter = np.zeros_like(out)
    frames = len(gts[0])
    det_area = np.array([[mask_utils.area(r) if r is not None else 0 for r in d] for d in dets], float)
    gt_area = np.array([[mask_utils.area(r) if r is not None else 0 for r in g] for g in gts], float)
    for t in range(frames):
        d_idx = [i for i, d in enumerate(dets) if d[t] is not None]
        g_idx = [j for j, g in enumerate(gts) if g[t] is not None]
        if d_idx and g_idx:
            iou = mask_utils.iou([dets[i][t] for i in d_idx], [gts[j][t] for j in g_idx], [0] * len(g_idx))
            a_d, a_g = det_area[d_idx, t][:, None], gt_area[g_idx, t][None, :]
            # IoU = I / (A + B - I) gives I back; pixel counts are integers, so rounding makes the
            # division below the same exact double that pycocotools computes for one frame.
            inter[np.ix_(d_idx, g_idx)] += np.rint(iou * (a_d + a_g) / (1.0 + iou))
    union = det_area.sum(1)[:, None] + gt_area.sum(1)[None, :] - inter
    np.divide(inter, union, out=out, where=union > 0)
    return out


@dataclass
class _Match:
    scores: np.ndarray  # [D] detection scores, in the order matched
    matched: np.ndarray  # [T, D] bool
    ignored: np.ndarray  # [T, D] bool: matched to an ignored (crowd) ground truth
    num_gt: int  # ground truths that count


def _match(ious: np.ndarray, scores: np.ndarray, gt_crowd: np.ndarray, max_det: int) -> _Match:
    """COCOeval.evaluateImg for one video, one category, area "all"."""
    g_order = np.argsort(gt_crowd, kind="mergesort")  # ignored ground truths last
    d_order = np.argsort(-scores, kind="mergesort")[:max_det]
    ious = ious[np.ix_(d_order, g_order)] if ious.size else np.zeros((len(d_order), len(g_order)))
    crowd = gt_crowd[g_order]
    matched = np.zeros((len(IOU_THRESHOLDS), len(d_order)), bool)
    ignored = np.zeros_like(matched)
    for t, thr in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(len(g_order), bool)
        for d in range(len(d_order)):
            best, m = min(thr, 1 - 1e-10), -1
            for g in range(len(g_order)):
                if taken[g] and not crowd[g]:
                    continue
                if m > -1 and not crowd[m] and crowd[g]:
                    break  # a real match beats any crowd region after it
                if ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m == -1:
                continue
            taken[m] = True
            matched[t, d] = True
            ignored[t, d] = crowd[m]
    return _Match(scores[d_order], matched, ignored, int((~crowd).sum()))


def _precision_recall(matches: list[_Match]) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate for one category: precision [T, R] and recall [T], -1 when undefined."""
    precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_POINTS)))
    recall = -np.ones(len(IOU_THRESHOLDS))
    num_gt = sum(m.num_gt for m in matches)
    if num_gt == 0:
        return precision, recall
    scores = np.concatenate([m.scores for m in matches]) if matches else np.zeros(0)
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([m.matched for m in matches], axis=1)[:, order]
    ignored = np.concatenate([m.ignored for m in matches], axis=1)[:, order]
    tps = np.cumsum(matched & ~ignored, axis=1, dtype=float)
    fps = np.cumsum(~matched & ~ignored, axis=1, dtype=float)
    for t in range(len(IOU_THRESHOLDS)):
        tp, fp = tps[t], fps[t]
        rc = tp / num_gt
        pr = tp / (fp + tp + np.spacing(1))
        recall[t] = rc[-1] if len(tp) else 0
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope: best precision at any higher recall
        q = np.zeros(len(RECALL_POINTS))
        inds = np.searchsorted(rc, RECALL_POINTS, side="left")
        valid = inds < len(pr)
        q[valid] = pr[inds[valid]]
        precision[t] = q
    return precision, recall


def _mean(values: np.ndarray) -> float:
    values = values[values > -1]
    return float(values.mean()) if values.size else -1.0


def _matches(gt: dict, predictions: Iterable[dict]) -> tuple[list, dict, dict]:
    """Sorted video ids, categories, and every (video, category)'s matches per detection limit:
    COCOeval.evaluate, whose results accumulate over any selection of videos."""
    # Sorted, as ytvoseval.py's np.unique(vidIds): its stable score sort then ranks tied scores by
    # video id, whatever order the annotation file lists the videos in.
    video_ids = sorted({v["id"] for v in gt["videos"]})
    categories = {c["id"]: c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])}
    gts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    dts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for a in gt["annotations"]:
        gts[a["video_id"], a["category_id"]].append(a)
    known = set(video_ids)
    for p in predictions:
        if p["video_id"] in known:
            dts[p["video_id"], p["category_id"]].append(p)
    matches: dict[tuple[int, int], dict[int, _Match]] = {}
    for c in categories:
        for v in video_ids:
            g, d = gts[v, c], dts[v, c]
            if not g and not d:
                continue
            d = sorted(d, key=lambda p: -p["score"])[: MAX_DETS[-1]]  # as COCOeval.computeIoU
            ious = video_iou([[as_rle(s) for s in p["segmentations"]] for p in d],
                             [[as_rle(s) for s in a["segmentations"]] for a in g])
            scores = np.array([p["score"] for p in d], float)
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in g], bool)
            matches[v, c] = {m: _match(ious, scores, crowd, m) for m in MAX_DETS}
    return video_ids, categories, matches


def _summarise(videos: Sequence, categories: dict, matches: dict) -> dict:
    """COCOeval.accumulate and summarize over `videos` (in ranking order; repeats allowed)."""
    per_max_det = {m: ([], []) for m in MAX_DETS}  # precision [K, T, R], recall [K, T] per category
    for c in categories:
        for max_det in MAX_DETS:
            p, r = _precision_recall([matches[v, c][max_det] for v in videos if (v, c) in matches])
            per_max_det[max_det][0].append(p)
            per_max_det[max_det][1].append(r)
    precision = np.stack(per_max_det[100][0], axis=0)  # [K, T, R]
    t50, t75 = int(np.argmin(abs(IOU_THRESHOLDS - 0.5))), int(np.argmin(abs(IOU_THRESHOLDS - 0.75)))
    return {
        "AP": _mean(precision),
        "AP50": _mean(precision[:, t50]),
        "AP75": _mean(precision[:, t75]),
        "AR1": _mean(np.stack(per_max_det[1][1])),
        "AR10": _mean(np.stack(per_max_det[10][1])),
        "per_class_AP": {categories[c]: _mean(precision[k]) for k, c in enumerate(categories)},
    }


def evaluate_ytvis(gt: dict, predictions: Iterable[dict]) -> dict:
    """AP, AP50, AP75, AR1, AR10 and per-class AP of predictions (YouTube-VIS results entries)
    against a YouTube-VIS annotation document. Values are -1 where nothing defines them."""
    video_ids, categories, matches = _matches(gt, list(predictions))
    return _summarise(video_ids, categories, matches)


BOOTSTRAP_KEYS = ("AP", "AP50", "AP75", "AR1", "AR10")


def bootstrap_ytvis(gt: dict, predictions: Iterable[dict], replicates: int = 1000, seed: int = 0) -> dict:
    """The spread of the metrics over videos: each replicate scores as many videos as the set has,
    drawn with replacement. Per metric: the mean, standard deviation and the 2.5 / 97.5 percentiles
    (a 95% interval) over replicates."""
    video_ids, categories, matches = _matches(gt, list(predictions))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(replicates):
        drawn = sorted(rng.choice(len(video_ids), size=len(video_ids), replace=True))
        rows.append(_summarise([video_ids[i] for i in drawn], categories, matches))
    out = {}
    for key in BOOTSTRAP_KEYS:
        values = np.array([r[key] for r in rows])
        values = values[values > -1]
        if values.size:
            out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                        "p2.5": float(np.percentile(values, 2.5)), "p97.5": float(np.percentile(values, 97.5))}
    return {"replicates": replicates, "seed": seed, "resampled": "videos", **out}


__all__ = ["as_rle", "bootstrap_ytvis", "evaluate_ytvis", "video_iou"]
