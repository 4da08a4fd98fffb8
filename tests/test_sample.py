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


def test_two_call_library_shape_gives_what_segment_writes(tmp_path: Path) -> None:
    from service.cli import main
    from service.outputs.ytvis import ytvis_entries
    from service.pipeline.session import open_video

    video = open_video(EXAMPLES / "sample.mp4", load(device="cpu"))
    frames = list(video.propagate())
    assert [f.index for f in frames] == list(range(48))
    assert all(f.masks().shape == (len(f.track_ids), 256, 320) for f in frames)
    result = video.result()
    assert main(["segment", str(EXAMPLES / "sample.mp4"), "--out", str(tmp_path / "o"), "--format", "ytvis",
                 "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text()) == ytvis_entries(result)
