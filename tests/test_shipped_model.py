"""The model we ship: the file the model card describes, small enough to commit, and a model
that actually finds the objects it was trained on (on videos from a seed it never saw)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from service.evaluation.run import evaluate, predict
from service.model.checkpoint import load_model
from service.model.engines import load_engine
from service.training.synth import CLASSES, write_dataset

CARD = Path(__file__).parents[1] / "weights" / "MODEL_CARD.md"


def test_file_matches_its_model_card(lite_weights: Path) -> None:
    assert lite_weights.stat().st_size <= 25 * 2**20
    card = CARD.read_text()
    digest = hashlib.sha256(lite_weights.read_bytes()).hexdigest()
    assert re.search(rf"\b{digest}\b", card), "MODEL_CARD.md must give the file's sha256"
    model = load_model(lite_weights)  # verifies the content hash stored in the file
    assert model.cfg.name == "lite" and model.cfg.classes == CLASSES


def test_finds_objects_in_unseen_videos(lite_weights: Path, tmp_path: Path) -> None:
    """A short held-out set (seed 77, never used for training): a broken, untrained or wrongly
    loaded model scores near 0 here; the shipped one must clear a bar far below its card's
    numbers, so the test checks that it works, not its exact quality."""
    data = write_dataset(tmp_path / "data", videos=3, seed=77, frames=12)
    gt = json.loads((data / "annotations.json").read_text())
    engine = load_engine("torch", model=load_model(lite_weights))
    report = evaluate(gt, predict(gt, data, engine), metrics=("ytvis",))
    assert report["AP50"] >= 0.3, report


def test_model_card_names_each_sets_seed_and_judges_the_targets(lite_weights: Path) -> None:
    """The card is written from eval reports: every set is named by the seed its report says
    it scored, metrics a set was not scored with show as '-', and the target verdict follows
    the numbers (AP exactly at the bar counts as met)."""
    from service.training.model_card import model_card

    classes = {name: 0.5 for name in CLASSES.values()}
    full = {"AP": 0.61, "AP50": 0.86, "AP75": 0.7, "AR1": 0.5, "AR10": 0.6, "J&F": 0.8, "J-Mean": 0.75,
            "F-Mean": 0.85, "HOTA": 0.65, "sMOTSA": 0.1, "MOTSA": 0.2, "per_class_AP": classes,
            "videos": 16, "dataset": {"seed": 2}}
    ytvis_only = {"AP": 0.6, "AP50": 0.849, "AP75": 0.7, "AR1": 0.5, "AR10": 0.6, "per_class_AP": classes,
                  "videos": 48, "dataset": {"seed": 8}}
    val = {"AP": 0.7, "AP50": 0.9, "videos": 12, "dataset": {"seed": 3}}
    card = model_card(lite_weights, [full, ytvis_only], "trained somehow", val)
    assert "| metric | seed 2, 16 videos | seed 8, 48 videos |" in card
    assert "| MOTS HOTA | 0.650 | - |" in card
    assert "- seed 2, 16 videos: AP 0.610 >= 0.6, AP50 0.860 >= 0.85: **met**" in card
    assert "- seed 8, 48 videos: AP 0.600 >= 0.6, AP50 0.849 < 0.85: not met" in card
    assert "--videos 48 --seed 8" in card and "validation set (seed 3, 12 videos)" in card
    assert hashlib.sha256(lite_weights.read_bytes()).hexdigest() in card
