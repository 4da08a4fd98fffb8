from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from service.outputs import (
    MANIFEST,
    OutputExists,
    davis_palette,
    mots_lines,
    track_boxes,
    write_davis,
    write_mots,
    write_outputs,
    write_overlay,
    write_ytvis,
    ytvis_entries,
)
from service.outputs.overlay import _font_size, draw_frame, place_labels
from service.pipeline.tracks import Track, VideoResult

H, W, N = 37, 50, 6
GREY = 100


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _box(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


A, B, C = _box(0, 20, 0, 20), _box(10, 30, 10, 30), _box(15, 37, 15, 50)  # C overlaps A on [15:20, 15:20]


def _fit(m: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), bool)
    out[: min(h, H), : min(w, W)] = m[:h, :w]
    return out


def _result(h: int = H, w: int = W, fps: float | None = 10.0) -> VideoResult:
    # Lifetimes 5, 1, 3: with max_tracks=2, track 2 goes although it is not the smallest by pixels.
    a = Track(1, 0, 5, pixels=600, class_logit_sum=np.array([5.0, 1.0]), class_votes=np.array([10, 2]),
              masks={f: _rle(_fit(A, h, w)) for f in range(6)})
    b = Track(2, 1, 2, pixels=100, class_logit_sum=np.array([0.0, 9.0]), class_votes=np.array([0, 5]),
              masks={f: _rle(_fit(B, h, w)) for f in (1, 2)})
    c = Track(3, 2, 5, pixels=300, class_logit_sum=np.array([1.0, 2.0]), class_votes=np.array([3, 1]),
              masks={f: _rle(_fit(C, h, w)) for f in (2, 4, 5)})  # no mask on frame 3
    return VideoResult(N, h, w, fps, {1: "car", 2: "pedestrian"}, max_tracks=2, tracks=[a, b, c])


@pytest.fixture
def result() -> VideoResult:
    return _result()


def _decode(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts})


def _frames(h: int = H, w: int = W) -> list[np.ndarray]:
    return [np.full((h, w, 3), GREY, np.uint8) for _ in range(N)]


def _read_mp4(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_selection_scores_and_categories(result: VideoResult) -> None:
    kept = result.kept()
    assert [t.id for t in kept] == [1, 3]
    assert result.scores(kept) == [1.0, 0.5]
    assert [t.category() for t in kept] == [1, 2]
    assert kept[1].voted_category() == 1  # majority vote can differ from the mean-logit rule


def test_ytvis(result: VideoResult, tmp_path: Path) -> None:
    write_ytvis(result, tmp_path / "r.json", video_id=7)
    entries = json.loads((tmp_path / "r.json").read_text())
    assert entries == ytvis_entries(result, 7)
    assert [(e["video_id"], e["track_id"], e["category_id"], e["category_name"], e["score"]) for e in entries] == [
        (7, 1, 1, "car", 1.0), (7, 3, 2, "pedestrian", 0.5)]
    for e, mask, frames in ((entries[0], A, range(6)), (entries[1], C, (2, 4, 5))):
        seg = e["segmentations"]
        assert len(seg) == N
        for f in range(N):
            if f in frames:
                assert seg[f]["size"] == [H, W] and isinstance(seg[f]["counts"], str)
                assert np.array_equal(_decode(seg[f]).astype(bool), mask)
            else:
                assert seg[f] is None


def test_track_boxes(result: VideoResult) -> None:
    boxes = track_boxes(result.kept()[1], N)
    assert boxes == [None, None, [15.0, 15.0, 35.0, 22.0], None, [15.0, 15.0, 35.0, 22.0], [15.0, 15.0, 35.0, 22.0]]


def test_davis_palette_is_the_voc_colour_map() -> None:
    p = np.array(davis_palette()).reshape(256, 3)
    assert p[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert p[255].tolist() == [224, 224, 192]


def test_davis(result: VideoResult, tmp_path: Path) -> None:
    write_davis(result, tmp_path / "d")
    pngs = sorted((tmp_path / "d").glob("*.png"))
    assert [p.name for p in pngs] == [f"{f:05d}.png" for f in range(N)]
    for f, png in enumerate(pngs):
        img = Image.open(png)
        assert img.mode == "P" and img.size == (W, H) and img.getpalette() == davis_palette()
        expected = np.zeros((H, W), np.uint8)
        expected[A] = 1
        if f in (2, 4, 5):
            expected[C] = 2  # later kept track wins the overlap
        assert np.array_equal(np.array(img), expected)  # track 2 (not kept) never painted


def test_mots(result: VideoResult, tmp_path: Path) -> None:
    write_mots(result, tmp_path / "m.txt")
    lines = (tmp_path / "m.txt").read_text().splitlines()
    assert lines == mots_lines(result)
    rows = [line.split(" ") for line in lines]
    keys = [(int(r[0]), int(r[1])) for r in rows]
    # Track 1 votes class 1, index 1 -> 1001; track 3 votes class 1, index 2 -> 1002; frame 3 has only track 1.
    assert keys == sorted(keys) == [(0, 1001), (1, 1001), (2, 1001), (2, 1002), (3, 1001), (4, 1001), (4, 1002),
                                    (5, 1001), (5, 1002)]
    for r in rows:
        assert r[2] == "1" and r[3:5] == [str(H), str(W)]
        decoded = _decode({"size": [H, W], "counts": r[5]}).astype(bool)
        assert np.array_equal(decoded, A if r[1] == "1001" else C)


@pytest.mark.parametrize("h,w,fps", [(H, W, 10.0), (H, W + 1, 30000 / 1001), (36, 50, None)])
def test_overlay(h: int, w: int, fps: float | None, tmp_path: Path) -> None:
    result = _result(h, w, fps)
    n = write_overlay(result, iter(_frames(h, w)), tmp_path / "o.mp4", fps)
    assert n == N
    decoded = _read_mp4(tmp_path / "o.mp4")
    assert len(decoded) == N
    assert decoded[0].shape == (h + h % 2, w + w % 2, 3)
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert c.streams.video[0].average_rate == Fraction(fps or 25).limit_denominator(1001)
    red = (0.5 * GREY + 0.5 * np.array([128, 0, 0]))  # track 1, DAVIS colour 1, half alpha
    green = (0.5 * GREY + 0.5 * np.array([0, 128, 0]))
    for f, frame in enumerate(decoded):
        px = frame[17, 8].astype(float)  # inside A, clear of its outline and label
        assert np.abs(px - red).max() < 12
        assert np.abs(frame[30, 5].astype(float) - GREY).max() < 12  # outside every mask
        if f in (2, 4, 5):
            assert np.abs(frame[30, 40].astype(float) - green).max() < 12
        else:
            assert np.abs(frame[30, 40].astype(float) - GREY).max() < 12


def test_write_outputs(result: VideoResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = write_outputs(result, out, ["ytvis", "davis", "mots", "overlay"],
                          frames_for_overlay=lambda: iter(_frames()))
    assert paths == {"ytvis": out / "results.json", "davis": out / "davis", "mots": out / "mots.txt",
                     "overlay": out / "overlay.mp4"}
    assert sorted(p.name for p in out.iterdir()) == ["davis", "mots.txt", "overlay.mp4", "results.json", MANIFEST]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["formats"] == ["ytvis", "davis", "mots", "overlay"]
    davis = {f"davis/{f:05d}.png" for f in range(N)}
    assert set(manifest["files"]) == {"results.json", "mots.txt", "overlay.mp4", *davis}
    assert json.loads(paths["ytvis"].read_text()) == ytvis_entries(result)
    assert len(list(paths["davis"].glob("*.png"))) == N
    assert len(_read_mp4(paths["overlay"])) == N
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_write_leaves_nothing(result: VideoResult, tmp_path: Path) -> None:
    def broken():
        raise RuntimeError("decoder died")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="decoder died"):
        write_outputs(result, out, ["ytvis", "overlay"], frames_for_overlay=broken)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="overlay got 4 frames"):  # a short second decoding pass
        write_outputs(result, out, ["mots", "overlay"], frames_for_overlay=lambda: iter(_frames()[:4]))
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_output(result: VideoResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(result, out, ["mots"])
    before = (out / "mots.txt").read_text()

    def broken():
        raise RuntimeError("decoder died")

    with pytest.raises(RuntimeError):
        write_outputs(result, out, ["ytvis", "overlay"], frames_for_overlay=broken)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["mots.txt", MANIFEST] and (out / "mots.txt").read_text() == before


def test_rewrite_replaces_existing_output(result: VideoResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(result, out, ["ytvis", "davis"])
    write_outputs(result, out, ["mots"])
    assert sorted(p.name for p in out.iterdir()) == ["mots.txt", MANIFEST]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bad_formats(result: VideoResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown output format 'gif'"):
        write_outputs(result, out, ["ytvis", "gif"])
    with pytest.raises(ValueError, match="needs the video's frames"):
        write_outputs(result, out, ["overlay"])
    assert list(tmp_path.iterdir()) == []


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_never_replaces_what_stemseg_did_not_write(result: VideoResult, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(OutputExists, match="not a directory"):
        write_outputs(result, notes, ["ytvis"])
    assert notes.read_text() == "my notes"
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "data.bin").write_bytes(b"1234")
    before = _tree(tmp_path)
    with pytest.raises(OutputExists, match="not a stemseg output"):
        write_outputs(result, mine, ["ytvis"])
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(OutputExists, match="not a directory"):
        write_outputs(result, link, ["ytvis"])
    link.unlink()
    assert _tree(tmp_path) == before and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_previous_output_is_replaced_only_when_allowed_and_untouched(result: VideoResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(result, out, ["ytvis", "davis"])
    with pytest.raises(OutputExists, match="--force"):
        write_outputs(result, out, ["mots"], replace=False)
    (out / "davis" / "extra.png").write_bytes(b"a user's file")  # added after the run: no longer ours alone
    with pytest.raises(OutputExists, match="not a stemseg output"):
        write_outputs(result, out, ["mots"])
    assert (out / "davis" / "extra.png").read_bytes() == b"a user's file"
    (out / "davis" / "extra.png").unlink()
    write_outputs(result, out, ["mots"])
    assert sorted(p.name for p in out.iterdir()) == ["mots.txt", MANIFEST]


def test_an_empty_directory_is_filled_in_place(result: VideoResult, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    write_outputs(result, out, ["ytvis"], replace=False)
    assert sorted(p.name for p in out.iterdir()) == ["results.json", MANIFEST]
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def _disjoint(boxes) -> bool:
    boxes = [b for b in boxes if b is not None]
    return all(not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
               for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.mark.parametrize("h,w", [(128, 160), (480, 640), (1080, 1920)])
def test_labels_never_cover_one_another(h: int, w: int) -> None:
    rng = np.random.default_rng(h)
    size = _font_size(h, w)
    label = (size * 8, size + 4)  # "7 ring 0.93" at this font size, padded
    # Ten masks at one spot (the case that hid "2 ring" under "7 ring"), then ten at random spots.
    same = [(w // 3, h // 3, w // 3 + 20, h // 3 + 20)] * 10
    spread = [(int(x), int(y), int(x) + 10, int(y) + 10) for x, y in zip(rng.integers(0, w - 10, 10),
                                                                       rng.integers(0, h - 10, 10))]
    for anchors in (same, spread):
        boxes = place_labels([label] * 10, anchors, h, w)
        assert all(b is not None for b in boxes), "ten labels fit in any frame of 160x128 or more"
        assert _disjoint(boxes)
        assert all(0 <= b[0] and b[2] <= w and 0 <= b[1] and b[3] <= h for b in boxes)
    # The first label (the highest score) gets the place above its mask.
    assert place_labels([label], same[:1], h, w)[0][1] == same[0][1] - label[1]


def test_label_text_scales_with_the_frame() -> None:
    assert _font_size(128, 160) == 9 and _font_size(1080, 1920) == 30
    frame = np.full((128, 160, 3), GREY, np.uint8)
    mask = np.zeros((128, 160), bool)
    mask[40:60, 40:60] = True
    drawn = draw_frame(frame, [mask, mask], ["1 disc 1.00", "2 ring 0.01"], [np.array([128.0, 0, 0])] * 2)
    labels = np.all(drawn == (128, 0, 0), axis=-1) & ~mask  # label backgrounds in the track colour
    rows = np.nonzero(labels.any(axis=1))[0]
    assert rows.max() - rows.min() + 1 >= 2 * (9 + 2)  # two labels, stacked, each at least a text line high


def test_min_score_hides_tracks_from_the_overlay_only(result: VideoResult, tmp_path: Path) -> None:
    paths = write_outputs(result, tmp_path / "o", ["ytvis", "overlay"], frames_for_overlay=lambda: iter(_frames()),
                          overlay_min_score=0.6)
    assert [e["score"] for e in json.loads(paths["ytvis"].read_text())] == [1.0, 0.5]  # JSON stays complete
    frame = _read_mp4(paths["overlay"])[2]
    assert np.abs(frame[30, 40].astype(float) - GREY).max() < 12  # track 3 (score 0.5) not drawn
    assert np.abs(frame[17, 8].astype(float) - (0.5 * GREY + 0.5 * np.array([128, 0, 0]))).max() < 12
