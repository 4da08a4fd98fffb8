"""`stemseg segment` on real encoded videos: outputs, bad input, engines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from test_pipeline import direct_track_maps
from videos import make_audio_only, make_video

from service.cli import main
from service.model.checkpoint import load_model
from service.pipeline.clips import clip_plan
from service.pipeline.runner import Segmenter
from service.video import iter_clip_windows, iter_frames


@pytest.mark.parametrize("preset", ["davis", "youtube_vis", "kitti_mots"])
def test_segment_with_official_weights_writes_every_format(official_weights, tmp_path: Path, preset: str) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 11, 80, 48)
    out = tmp_path / "out"
    rc = main(["segment", str(video), "--weights", str(official_weights(preset)), "--out", str(out),
               "--min-dim", "48", "--device", "cpu", "--no-progress", "--format", "ytvis", "davis", "mots", "overlay"])
    assert rc == 0
    assert isinstance(json.loads((out / "results.json").read_text()), list)
    assert len(list((out / "davis").glob("*.png"))) == 11
    with av.open(str(out / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 11
    assert (out / "mots.txt").exists()


def test_track_maps_on_an_encoded_video_equal_the_core_functions(small_weights, tmp_path: Path) -> None:
    video = tmp_path / "v.webm"
    make_video(video, 17, 64, 48, codec="libvpx-vp9")
    model = load_model(small_weights)
    plan = clip_plan(17, model.cfg.clip_len, model.cfg.overlap)
    seg = Segmenter(model)
    streamed = {f.index: f.track_map for f in seg.propagate(iter_clip_windows(video, plan), plan, 48, 64)}
    decoded = [f.image for f in iter_frames(video)]
    direct = direct_track_maps(model, decoded, plan)
    assert sorted(streamed) == list(range(17))
    assert all(torch.equal(streamed[f], direct[f]) for f in range(17))
    assert seg.result().tracks


def test_results_are_rles_of_the_frame_size(small_weights, tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    video = tmp_path / "v.mp4"
    make_video(video, 9, 70, 46)
    out = tmp_path / "out"
    assert main(["segment", str(video), "--weights", str(small_weights), "--out", str(out), "--no-progress"]) == 0
    entries = json.loads((out / "results.json").read_text())
    assert entries
    for e in entries:
        assert len(e["segmentations"]) == 9 and 0 < e["score"] <= 1 and e["category_name"] in ("car", "pedestrian")
        for rle in filter(None, e["segmentations"]):
            m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert m.shape == (46, 70)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = d / "good.mp4"
    make_video(good, 20, 64, 48)
    files = {"missing": d / "missing.mp4", "directory": d, "empty": d / "empty.mp4", "noise": d / "noise.mp4",
             "truncated": d / "truncated.mp4", "audio": d / "audio.m4a", "good": good}
    files["empty"].write_bytes(b"")
    files["noise"].write_bytes(np.random.default_rng(0).bytes(4000))
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    make_audio_only(files["audio"])
    return files


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "noise", "truncated", "audio"])
def test_bad_video_exit_2_one_line(small_weights, bad_inputs, kind: str, tmp_path: Path, capsys) -> None:
    rc = main(["segment", str(bad_inputs[kind]), "--weights", str(small_weights), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("stemseg: error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_frame_size_limit_and_weights_errors_in_a_real_process(small_weights, bad_inputs, tmp_path: Path) -> None:
    env = {"STEMSEG_MAX_FRAME_PIXELS": str(32 * 32), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "service.cli", "segment", str(bad_inputs["good"]), "--weights",
                        str(small_weights)], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 2 and "exceed the limit" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    not_weights = tmp_path / "w.pth"
    not_weights.write_bytes(b"garbage" * 10)
    p = subprocess.run([sys.executable, "-m", "service.cli", "segment", str(bad_inputs["good"]), "--weights",
                        str(not_weights)], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2 and "not a PyTorch checkpoint" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_onnxruntime_engine_gives_the_same_tracks_as_torch(small_weights, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    video = tmp_path / "v.mp4"
    make_video(video, 13, 64, 48)
    onnx_dir = tmp_path / "onnx"
    assert main(["export", "onnx", "--weights", str(small_weights), "--out", str(onnx_dir)]) == 0
    a, b = tmp_path / "torch", tmp_path / "ort"
    assert main(["segment", str(video), "--weights", str(small_weights), "--out", str(a), "--no-progress"]) == 0
    assert main(["segment", str(video), "--engine", "onnxruntime", "--onnx", str(onnx_dir), "--out", str(b),
                 "--no-progress"]) == 0
    ours, theirs = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    assert ours and [e["segmentations"] for e in ours] == [e["segmentations"] for e in theirs]
