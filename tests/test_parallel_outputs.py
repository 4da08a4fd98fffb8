"""Outputs rendered in ranges (in this process or several) and assembled are the single writers'
outputs: the same bytes for YouTube-VIS and MOTS, the same pixels for DAVIS, and an overlay whose
every decoded frame matches the single-writer overlay's within encoder noise."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from videos import make_video

from service.outputs import davis_palette, write_davis, write_mots, write_outputs, write_overlay, write_ytvis
from service.outputs.labels import Labels
from service.outputs.names import NAMES, davis_frame
from service.outputs.overlay import draw_frame
from service.outputs.render import join_segments, ranges
from service.pipeline.tracks import Track, VideoResult
from service.video import iter_frames

N, H, W = 41, 72, 96


def _rle(m: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def _moving_tracks(n: int, h: int, w: int) -> list[Track]:
    """Five tracks of boxes drifting across the frame, starting and ending at different frames,
    two of them overlapping, with class evidence that makes categories and votes differ."""
    rng = np.random.default_rng(7)
    tracks = []
    for j in range(5):
        first, last = (3 * j) % 11, n - 1 - (5 * j) % 13
        masks = {}
        for f in range(first, last + 1):
            if (f + j) % 9 == 0:
                continue  # a frame without this track's mask
            m = np.zeros((h, w), bool)
            y, x = (4 + 5 * j + f // 2) % (h - 16), (3 + 9 * j + f) % (w - 20)
            m[y:y + 14 + j, x:x + 18] = True
            masks[f] = _rle(m)
        tracks.append(Track(j + 1, first, last, pixels=int(rng.integers(100, 5000)),
                            class_logit_sum=rng.normal(size=3) * 10, class_votes=rng.integers(0, 50, 3),
                            masks=masks))
    return tracks


def _result(n: int = N, max_tracks: int | None = 4) -> VideoResult:
    return VideoResult(n, H, W, 25.0, {1: "car", 2: "person"}, max_tracks=max_tracks, tracks=_moving_tracks(n, H, W))


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "v.mp4"
    make_video(path, N, W, H)
    return path


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(video=0)]


def _single(result: VideoResult, video: Path, out: Path, min_score: float = 0.0) -> Path:
    """Today's writers, one after the other, one overlay encoder for the whole video."""
    out.mkdir()
    write_ytvis(result, out / NAMES["ytvis"])
    write_mots(result, out / NAMES["mots"])
    write_davis(result, out / NAMES["davis"])
    write_overlay(result, (f.image for f in iter_frames(video)), out / NAMES["overlay"], result.fps, min_score)
    return out


def _block_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h, w = (a.shape[0] // 8) * 8, (a.shape[1] // 8) * 8
    d = np.abs(a[:h, :w] - b[:h, :w]).mean(axis=2)
    return d.reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3))


def _drawn(result: VideoResult, video: Path, min_score: float = 0.0) -> list[np.ndarray]:
    """The overlay's frames before encoding."""
    labels = Labels.decide(result, min_score)
    palette = np.array(davis_palette(), np.float32).reshape(256, 3)
    kept = result.kept()
    tracks = [kept[k] for k in labels.drawn]
    empty = np.zeros((result.height, result.width), bool)
    out = []
    for f, frame in enumerate(iter_frames(video)):
        masks = [mask_utils.decode(t.masks[f]).astype(bool) if f in t.masks else empty for t in tracks]
        out.append(draw_frame(frame.image[:, :, ::-1], masks, [labels.overlay_text(k) for k in labels.drawn],
                              [palette[k % 255 + 1] for k in labels.drawn]).astype(np.int16))
    return out


def _assert_same(single: Path, ranged: Path, truth: list[np.ndarray], n: int = N) -> None:
    for fmt in ("ytvis", "mots"):
        assert (ranged / NAMES[fmt]).read_bytes() == (single / NAMES[fmt]).read_bytes(), fmt
    for f in range(n):
        a = np.asarray(Image.open(single / "davis" / davis_frame(f)))
        b = Image.open(ranged / "davis" / davis_frame(f))
        assert b.mode == "P" and np.array_equal(a, np.asarray(b)), f
    assert sorted(p.name for p in (ranged / "davis").iterdir()) == [davis_frame(f) for f in range(n)]
    want, got = _frames(single / NAMES["overlay"]), _frames(ranged / NAMES["overlay"])
    assert len(got) == len(want) == len(truth) == n
    for f, (a, b, t) in enumerate(zip(want, got, truth)):
        # Encoder noise: each segment's encoder starts afresh at the same quality, so the joined
        # overlay is as far from the drawn frames as the single writer's is, overall and in every
        # 8x8 block (a mask or label drawn differently would stand out in its blocks).
        err_a, err_b = _block_errors(a, t), _block_errors(b, t)
        assert err_b.mean() <= 1.2 * err_a.mean() + 0.5, (f, err_a.mean(), err_b.mean())
        assert err_b.max() <= err_a.max() + 15, (f, err_a.max(), err_b.max())
    with av.open(str(ranged / NAMES["overlay"])) as c:
        s = c.streams.video[0]
        pts = [fr.pts for fr in c.decode(s)]
        assert s.duration * s.time_base == Fraction(n, 25)
    assert pts == sorted(pts) and len(set(pts)) == n


@pytest.mark.parametrize("range_frames", [7, 16, N])
def test_ranges_in_this_process_equal_the_single_writers(video: Path, tmp_path: Path, range_frames: int) -> None:
    result = _result()
    single = _single(result, video, tmp_path / "single")
    write_outputs(result, tmp_path / "ranged", ["ytvis", "davis", "mots", "overlay"], video=video,
                  range_frames=range_frames)
    _assert_same(single, tmp_path / "ranged", _drawn(result, video))
    assert not list(tmp_path.glob(".*")), "nothing left beside the output"


def test_ranges_in_processes_equal_the_single_writers(video: Path, tmp_path: Path) -> None:
    result = _result(max_tracks=None)
    single = _single(result, video, tmp_path / "single", min_score=0.3)
    write_outputs(result, tmp_path / "ranged", ["ytvis", "davis", "mots", "overlay"], video=video, processes=2,
                  range_frames=10, overlay_min_score=0.3)
    _assert_same(single, tmp_path / "ranged", _drawn(result, video, 0.3))


def test_overlay_from_a_frame_iterator_in_ranges(video: Path, tmp_path: Path) -> None:
    result = _result()
    single = _single(result, video, tmp_path / "single")
    write_outputs(result, tmp_path / "ranged", ["ytvis", "davis", "mots", "overlay"],
                  frames_for_overlay=lambda: (f.image for f in iter_frames(video)), range_frames=12)
    _assert_same(single, tmp_path / "ranged", _drawn(result, video))


def test_labels_round_trip_and_ranges_cover_the_video() -> None:
    labels = Labels.decide(_result(), overlay_min_score=0.2)
    assert Labels.from_json(labels.to_json()) == labels
    assert ranges(10, 4) == [(0, 4), (4, 8), (8, 10)] and ranges(3, 8) == [(0, 3)]


def test_joining_segments_copies_packets_without_reencoding(video: Path, tmp_path: Path) -> None:
    result = _result()
    write_outputs(result, tmp_path / "a", ["overlay"], video=video, range_frames=N)
    parts = []
    with av.open(str(tmp_path / "a" / NAMES["overlay"])) as c:
        whole = [bytes(p) for p in c.demux(video=0) if p.size]
    labels = Labels.decide(result)
    join_segments([tmp_path / "a" / NAMES["overlay"]] * 2, [0, N], labels.rate, tmp_path / "twice.mp4")
    with av.open(str(tmp_path / "twice.mp4")) as c:
        parts = [bytes(p) for p in c.demux(video=0) if p.size]
    assert parts == whole + whole
