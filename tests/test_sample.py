"""The sample video the README's first command segments: made by `stemseg synth` as
examples/README.md says, and the shipped model finds its objects."""

from __future__ import annotations

import json
from pathlib import Path

from service.evaluation.run import evaluate, load_ground_truth, predict
from service.pipeline.session import load
from service.training.synth import write_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_sample_is_what_its_recipe_makes(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "sample", videos=1, seed=2027, frames=48, size=(256, 320))
    assert (data / "videos" / "00000.mp4").read_bytes() == (EXAMPLES / "sample.mp4").read_bytes()
    made = json.loads((data / "annotations.json").read_text())
    made["videos"][0]["file_name"] = "sample.mp4"
    assert made == json.loads((EXAMPLES / "sample.json").read_text())
    assert (EXAMPLES / "sample.mp4").stat().st_size < 1024 * 1024


def test_shipped_model_finds_the_sample_objects() -> None:
    gt, root = load_ground_truth(EXAMPLES / "sample.json")
    report = evaluate(gt, predict(gt, root, load(device="cpu")), metrics=("ytvis",))
    assert len(gt["annotations"]) == 3 and report["AP50"] > 0.99, report
