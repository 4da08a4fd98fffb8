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
    report = evaluate(gt, predict(gt, data, engine, device="cpu"), metrics=("ytvis",))
    assert report["AP50"] >= 0.3, report
