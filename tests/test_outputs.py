from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from service.outputs import write_outputs
from service.outputs.mots import mots_lines
from service.pipeline.tracks import Track, VideoResult

H, W, N = 37, 50, 6


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def result() -> VideoResult:
    a = Track(1, 0, 5, pixels=600, class_logit_sum=np.array([5.0, 1.0]), class_votes=np.array([10, 2]),
              masks={f: _rle(_box(0, 20, 0, 20)) for f in range(6)})
    b = Track(2, 1, 2, pixels=100, class_logit_sum=np.array([0.0, 9.0]), class_votes=np.array([0, 5]),
              masks={f: _rle(_box(10, 30, 10, 30)) for f in (1, 2)})
    c = Track(3, 2, 5, pixels=300, class_logit_sum=np.array([1.0, 2.0]), class_votes=np.array([3, 1]),
              masks={f: _rle(_box(25, 37, 30, 50)) for f in (2, 4, 5)})
    return VideoResult(N, H, W, 10.0, {1: "car", 2: "pedestrian"}, max_tracks=2, tracks=[a, b, c])


def test_selection_scores_and_categories(result: VideoResult) -> None:
    kept = result.kept()
    assert [t.id for t in kept] == [1, 3]  # longest lifetimes; track 2 (lifetime 1) dropped
    assert result.scores(kept) == [1.0, 0.5]
    assert [t.category() for t in kept] == [1, 2]
    assert kept[1].voted_category() == 1  # majority vote can differ from the mean-logit rule


def test_all_formats_round_trip(result: VideoResult, tmp_path: Path) -> None:
    frames = [np.full((H, W, 3), 100, np.uint8) for _ in range(N)]
    out = tmp_path / "out"
    paths = write_outputs(result, out, ["ytvis", "davis", "mots", "overlay"], frames_for_overlay=lambda: iter(frames))
    entries = json.loads(paths["ytvis"].read_text())
    assert [(e["track_id"], e["category_id"], e["category_name"], e["score"]) for e in entries] == [
        (1, 1, "car", 1.0), (3, 2, "pedestrian", 0.5)]
    seg = entries[1]["segmentations"]
    assert seg[0] is None and seg[1] is None and seg[3] is None
    decoded = mask_utils.decode({"size": seg[2]["size"], "counts": seg[2]["counts"].encode()})
    assert decoded.shape == (H, W) and np.array_equal(decoded.astype(bool), _box(25, 37, 30, 50))

    pngs = sorted(paths["davis"].glob("*.png"))
    assert len(pngs) == N
    img = Image.open(pngs[2])
    assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]
    idx = np.array(img)
    assert idx[5, 5] == 1 and idx[30, 40] == 2 and idx[22, 22] == 0  # track 2 was not kept

    lines = paths["mots"].read_text().splitlines()
    assert lines == mots_lines(result)
    first = lines[0].split(" ")
    assert first[:5] == ["0", "1001", "1", str(H), str(W)]
    rle = {"size": [H, W], "counts": first[5].encode()}
    assert np.array_equal(mask_utils.decode(rle).astype(bool), _box(0, 20, 0, 20))
    assert any(line.startswith("2 1002 1 ") for line in lines)  # track 3 votes class 1 -> 1*1000 + rank 2

    with av.open(str(paths["overlay"])) as c:
        decoded_frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded_frames) == N and decoded_frames[0].shape == (H + 1, W, 3)  # padded to even
    assert np.abs(decoded_frames[0][5, 5].astype(int) - 100).max() > 20  # painted
    assert np.abs(decoded_frames[0][30, 5].astype(int) - 100).max() < 12  # untouched


def test_failed_write_leaves_nothing(result: VideoResult, tmp_path: Path) -> None:
    def broken():
        raise RuntimeError("decoder died")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        write_outputs(result, out, ["ytvis", "overlay"], frames_for_overlay=broken)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_existing_output(result: VideoResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(result, out, ["ytvis", "mots"])
    write_outputs(result, out, ["mots"])
    assert sorted(p.name for p in out.iterdir()) == ["mots.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ValueError, match="unknown output format"):
        write_outputs(result, out, ["gif"])
