"""The model we ship: the file the model card describes, small enough to commit, and a model
that actually finds the objects it was trained on (on videos from a seed it never saw)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from service.evaluation.run import evaluate, predict
from service.model.checkpoint import load_model
from service.model.engines import TorchEngine
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
    engine = TorchEngine(load_model(lite_weights))
    report = evaluate(gt, predict(gt, data, engine), metrics=("ytvis",))
    assert report["AP50"] >= 0.3, report


def test_model_card_quotes_the_pooled_sets_with_their_interval(lite_weights: Path) -> None:
    """The card is written from eval reports: the pooled number with its bootstrap interval, each
    set by the seed its report names, and the target verdict follows the numbers (AP exactly at
    the bar counts as met)."""
    from service.training.model_card import model_card

    classes = {name: 0.5 for name in CLASSES.values()}
    spread = {"mean": 0.6, "std": 0.02, "p2.5": 0.56, "p97.5": 0.64}
    pooled = {"AP": 0.6, "AP50": 0.86, "AP75": 0.7, "AR1": 0.5, "AR10": 0.6, "J&F": 0.8, "J-Mean": 0.75,
              "F-Mean": 0.85, "HOTA": 0.65, "sMOTSA": 0.1, "MOTSA": 0.2, "per_class_AP": classes, "videos": 32,
              "dataset": [{"seed": 101}, {"seed": 102}],
              "bootstrap": {"replicates": 1000, **{k: spread for k in ("AP", "AP50", "AP75", "AR1", "AR10")}}}
    sets = [{"AP": 0.55, "AP50": 0.8, "videos": 16, "dataset": {"seed": 102}},
            {"AP": 0.65, "AP50": 0.9, "videos": 16, "dataset": {"seed": 101}}]
    val = {"AP": 0.7, "AP50": 0.9, "videos": 12, "dataset": {"seed": 3}}
    card = model_card(lite_weights, "trained somehow", val, pooled, sets)
    assert "| YouTube-VIS AP | 0.600 | 0.560 - 0.640 (std 0.020) |" in card
    assert "stemseg eval --gt heldout101 heldout102 --bootstrap 1000" in card
    assert "| seed 101, 16 videos | 0.650 | 0.900 |\n| seed 102, 16 videos | 0.550 | 0.800 |" in card
    assert "AP 0.550 to 0.650" in card and "| MOTS HOTA | 0.650 | - |" in card
    assert "AP 0.600 >= 0.6, AP50 0.860 >= 0.85: **met**" in card
    assert "validation set (seed 3, 12 videos)" in card
    assert hashlib.sha256(lite_weights.read_bytes()).hexdigest() in card
    with pytest.raises(ValueError, match="one single-set report per pooled set"):
        model_card(lite_weights, "trained somehow", val, pooled, sets[:1])


def test_card_and_readme_quote_the_same_pooled_numbers() -> None:
    card, readme = CARD.read_text(), " ".join((CARD.parents[1] / "README.md").read_text().split())
    ap = re.search(r"\| YouTube-VIS AP \| (0\.\d{3}) \| (0\.\d{3}) - (0\.\d{3})", card)
    ap50 = re.search(r"\| AP50 \| (0\.\d{3}) \| (0\.\d{3}) - (0\.\d{3})", card)
    assert ap and ap50
    assert f"AP {ap[1]} (95% interval {ap[2]}-{ap[3]} over videos)" in readme
    assert f"AP50 {ap50[1]} ({ap50[2]}-{ap50[3]})" in readme
    assert "0.667" not in readme and "0.546" not in readme  # consulted sets are not quoted
