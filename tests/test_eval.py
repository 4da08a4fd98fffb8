"""`stemseg eval`: our YouTube-VIS AP equals COCOeval on one-frame videos; trackeval's DAVIS
and MOTS measures respond to the errors they are meant to see; the command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from service.evaluation.ytvis import evaluate_ytvis, video_iou
from service.outputs.ytvis import rle_to_json

H, W = 48, 64


def _rle(mask: np.ndarray) -> dict:
    return rle_to_json(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def _box_mask(rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((H, W), bool)
    y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
    m[y:y + rng.integers(4, H - y), x:x + rng.integers(4, W - x)] = True
    return m


def _jitter(rng: np.random.Generator, m: np.ndarray) -> np.ndarray:
    out = np.roll(m, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    out[rng.random((H, W)) < 0.004] ^= True
    return out


def _one_frame_dataset(seed: int) -> tuple[dict, list[dict]]:
    """Ground truth and predictions over 12 one-frame videos, 3 categories: jittered copies of
    ground truths (some duplicated, some with the wrong class), misses and pure false positives."""
    rng = np.random.default_rng(seed)
    gt = {"videos": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    preds = []
    for v in range(1, 13):
        gt["videos"].append({"id": v, "length": 1, "height": H, "width": W})
        for _ in range(rng.integers(0, 5)):
            m, c = _box_mask(rng), int(rng.integers(1, 4))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "video_id": v, "category_id": c,
                                      "segmentations": [_rle(m)], "iscrowd": 0})
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                pc = c if rng.random() < 0.8 else int(rng.integers(1, 4))
                preds.append({"video_id": v, "category_id": pc, "score": float(rng.random()),
                              "segmentations": [_rle(_jitter(rng, m))]})
        for _ in range(rng.integers(0, 3)):
            preds.append({"video_id": v, "category_id": int(rng.integers(1, 4)), "score": float(rng.random()),
                          "segmentations": [_rle(_box_mask(rng))]})
    return gt, preds


def _cocoeval(gt: dict, preds: list[dict]) -> np.ndarray:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": v["id"], "height": H, "width": W} for v in gt["videos"]],
        "categories": gt["categories"],
        "annotations": [{"id": a["id"], "image_id": a["video_id"], "category_id": a["category_id"],
                         "segmentation": a["segmentations"][0], "iscrowd": 0,
                         "area": float(mask_utils.area(a["segmentations"][0])),
                         "bbox": mask_utils.toBbox(a["segmentations"][0]).tolist()} for a in gt["annotations"]],
    }
    coco.createIndex()
    dets = coco.loadRes([{"image_id": p["video_id"], "category_id": p["category_id"], "score": p["score"],
                          "segmentation": p["segmentations"][0]} for p in preds])
    ev = COCOeval(coco, dets, iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ap_equals_cocoeval_on_one_frame_videos(seed):
    gt, preds = _one_frame_dataset(seed)
    ours = evaluate_ytvis(gt, preds)
    stats = _cocoeval(gt, preds)
    # COCOeval.stats: 0 AP, 1 AP50, 2 AP75, 6 AR@1, 7 AR@10
    for key, i in (("AP", 0), ("AP50", 1), ("AP75", 2), ("AR1", 6), ("AR10", 7)):
        assert ours[key] == pytest.approx(stats[i], abs=1e-12), key
    assert 0.05 < ours["AP"] < 0.95  # the data exercise both hits and misses


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_ap_ignores_video_order_and_breaks_score_ties_as_the_official_evaluator(seed):
    """ytvoseval.py (youtubevos/cocoapi) sorts the video ids (np.unique) before its stable score
    sort, so tied scores are ranked by video id, whatever order the annotation file lists videos."""
    gt, preds = _one_frame_dataset(seed)
    for p in preds:
        p["score"] = round(p["score"] * 3) / 3  # four score values: ties within and across videos
    reference = _cocoeval(gt, preds)  # COCOeval sorts its image ids the same way
    rng = np.random.default_rng(seed)
    for _ in range(3):
        shuffled = {**gt, "videos": [gt["videos"][i] for i in rng.permutation(len(gt["videos"]))]}
        ours = evaluate_ytvis(shuffled, preds)
        for key, i in (("AP", 0), ("AP50", 1), ("AP75", 2), ("AR1", 6), ("AR10", 7)):
            assert ours[key] == pytest.approx(reference[i], abs=1e-12), key


def test_tied_scores_across_videos_rank_by_video_id():
    # Video 1: a hit at score 0.5; video 2: a miss at the same score. Ranked by id, the hit comes
    # first: precision 1 up to recall 0.5, so AP = 51/101 at every threshold. In file order with
    # video 2 listed first the miss would come first (AP 25.5/101).
    hit = np.zeros((H, W), bool)
    hit[10:30, 10:30] = True
    miss = np.zeros((H, W), bool)
    miss[40:46, 50:60] = True
    gt = {"videos": [{"id": 2, "length": 1}, {"id": 1, "length": 1}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "segmentations": [_rle(hit)]},
                          {"id": 2, "video_id": 2, "category_id": 1, "segmentations": [_rle(hit)]}]}
    preds = [{"video_id": 2, "category_id": 1, "score": 0.5, "segmentations": [_rle(miss)]},
             {"video_id": 1, "category_id": 1, "score": 0.5, "segmentations": [_rle(hit)]}]
    assert evaluate_ytvis(gt, preds)["AP"] == pytest.approx(51 / 101, abs=1e-12)


def _video_gt(num_frames: int = 6) -> tuple[dict, list[np.ndarray]]:
    """One video, two objects of different classes moving right; masks per object [T, H, W]."""
    masks = []
    for k, (y, c) in enumerate(((6, 1), (28, 2))):
        m = np.zeros((num_frames, H, W), bool)
        for t in range(num_frames):
            m[t, y:y + 12, 4 + 5 * t + 10 * k:18 + 5 * t + 10 * k] = True
        masks.append(m)
    gt = {"videos": [{"id": 7, "length": num_frames, "height": H, "width": W}],
          "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}],
          "annotations": [{"id": k + 1, "video_id": 7, "category_id": k + 1, "iscrowd": 0,
                           "segmentations": [_rle(f) for f in m]} for k, m in enumerate(masks)]}
    return gt, masks


def _entries(masks: list[np.ndarray], cats: list[int], scores: list[float]) -> list[dict]:
    return [{"video_id": 7, "category_id": c, "score": s,
             "segmentations": [_rle(f) if f.any() else None for f in m]} for m, c, s in zip(masks, cats, scores)]


def test_video_iou_sums_over_frames():
    _, masks = _video_gt()
    half = masks[0].copy()
    half[3:] = False  # the prediction stops halfway: I = 3 frames' area, U = 6 frames' area
    iou = video_iou([[mask_utils.encode(np.asfortranarray(f.astype(np.uint8))) if f.any() else None for f in half]],
                    [[mask_utils.encode(np.asfortranarray(f.astype(np.uint8))) for f in masks[0]]])
    assert iou[0, 0] == pytest.approx(0.5)


def test_perfect_predictions_score_one_everywhere():
    from service.evaluation.run import evaluate

    gt, masks = _video_gt()
    report = evaluate(gt, _entries(masks, [1, 2], [0.9, 0.8]))
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "J&F", "J-Mean", "F-Mean", "HOTA", "sMOTSA", "MOTSA"):
        assert report[key] == pytest.approx(1.0), key
    assert report["per_class_AP"] == {"disc": pytest.approx(1.0), "square": pytest.approx(1.0)}


def test_identity_switch_costs_hota_not_detection():
    """Swap the two objects' identities halfway (same class so MOTS sees it): detection stays
    perfect, association and HOTA fall, CLEAR counts the switches."""
    from service.evaluation.tracking import evaluate_mots

    gt, masks = _video_gt()
    for a in gt["annotations"]:
        a["category_id"] = 1
    swapped = [np.concatenate([masks[0][:3], masks[1][3:]]), np.concatenate([masks[1][:3], masks[0][3:]])]
    mots = evaluate_mots(gt, _entries(swapped, [1, 1], [0.9, 0.8]))
    disc = mots["per_class"]["disc"]
    assert disc["DetA"] == pytest.approx(1.0)
    assert disc["AssA"] < 0.75 and mots["HOTA"] < 0.9
    assert disc["IDSW"] == 2
    assert mots["MOTSA"] == pytest.approx(1 - 2 / 12)


def test_davis_matches_proposals_and_penalises_misses():
    from service.evaluation.tracking import evaluate_davis

    gt, masks = _video_gt()
    # Only the second object found, listed under a wrong class and after a junk proposal: DAVIS
    # ignores classes, matches by J&F, and the missed object counts zero.
    junk = np.zeros_like(masks[0])
    junk[:, 40:46, 50:60] = True
    davis = evaluate_davis(gt, _entries([junk, masks[1]], [2, 1], [0.9, 0.5]))
    assert davis["J-Mean"] == pytest.approx(0.5)
    assert davis["F-Mean"] == pytest.approx(0.5)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STEMSEG_WEIGHTS"}  # the default model, whatever the caller set
    # A test makes at most two calls, within the suite's per-test timeout (600 s), so a hung command
    # fails as itself (TimeoutExpired naming it) before pytest-timeout's stack dump.
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=240,
                          check=False, env=env)


def test_eval_cli_with_predictions_file(tmp_path):
    gt, masks = _video_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(_entries(masks, [1, 2], [0.9, 0.8])))
    r = _cli("eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
             "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    numbers = json.loads((tmp_path / "m.json").read_text())
    assert numbers["AP"] == pytest.approx(1.0) and numbers["HOTA"] == pytest.approx(1.0)
    assert json.loads(r.stdout) == numbers


@pytest.mark.parametrize("content", ["not json", '{"videos": []}'])
def test_eval_cli_bad_ground_truth_is_one_line(tmp_path, content):
    (tmp_path / "gt.json").write_text(content)
    r = _cli("eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "gt.json"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("stemseg: error:") and "Traceback" not in r.stderr


def test_eval_cli_runs_the_default_model_over_a_synth_dataset(tmp_path, lite_weights):
    """With only --gt a `stemseg synth` folder, the shipped model runs over the videos and is scored."""
    r = _cli("synth", "--out", str(tmp_path / "data"), "--videos", "2", "--seed", "99", "--frames", "10")
    assert r.returncode == 0, r.stderr
    r = _cli("eval", "--gt", str(tmp_path / "data"), "--no-progress",
             "--save-pred", str(tmp_path / "pred.json"), "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    numbers = json.loads((tmp_path / "m.json").read_text())
    assert numbers["videos"] == 2 and numbers["dataset"]["seed"] == 99  # the report says which set it scored
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "J&F", "HOTA", "sMOTSA", "MOTSA"):
        assert key in numbers
    assert 0.0 <= numbers["AP"] <= 1.0
    preds = json.loads((tmp_path / "pred.json").read_text())
    assert {p["video_id"] for p in preds} <= {1, 2}
    assert all(len(p["segmentations"]) == 10 for p in preds)
