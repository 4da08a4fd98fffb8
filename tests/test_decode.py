from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from service.pipeline.clips import clip_plan
from service.video import VideoError, iter_clip_windows, iter_frames, probe, read_frames
from videos import make_audio_only, make_video

CASES = [
    ("h264.mp4", "libx264", "yuv420p"),
    ("vp9.webm", "libvpx-vp9", "yuv420p"),
    ("h264.mkv", "libx264", "yuv420p"),
    ("h264.mov", "libx264", "yuv420p"),
    ("mpeg4.mp4", "mpeg4", "yuv420p"),
    ("yuvj.mp4", "libx264", "yuvj420p"),
    ("hevc10.mp4", "libx265", "yuv420p10le"),
]


@pytest.mark.parametrize("name, codec, pix_fmt", CASES, ids=[c[0] for c in CASES])
def test_codecs_and_containers(tmp_path: Path, name: str, codec: str, pix_fmt: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    path = tmp_path / name
    ref = make_video(path, 19, 96, 64, codec=codec, pix_fmt=pix_fmt)
    info = probe(path)
    assert (info.num_frames, info.width, info.height) == (19, 96, 64)
    frames = list(iter_frames(path))
    assert [f.index for f in frames] == list(range(19))
    images = np.stack([f.image for f in frames])
    assert images.dtype == np.uint8 and images.shape == ref.shape
    assert np.abs(images.astype(int) - ref.astype(int)).mean() < 20  # lossy, but the same pictures
    # Seeking gives the very same pixels as streaming.
    for f in read_frames(path, [0, 7, 18, 11]):
        assert np.array_equal(f.image, frames[f.index].image)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 30])
def test_clip_windows_follow_the_plan(tmp_path: Path, n: int) -> None:
    path = tmp_path / "v.mp4"
    make_video(path, n, 64, 48)
    frames = list(iter_frames(path))
    plan = clip_plan(n, 8, 4)
    windows = list(iter_clip_windows(path, plan))
    assert [k for k, _ in windows] == list(range(len(plan)))
    for (k, window), clip in zip(windows, plan):
        assert [f.index for f in window] == clip
        assert all(np.array_equal(f.image, frames[f.index].image) for f in window)


def test_odd_size(tmp_path: Path) -> None:
    path = tmp_path / "odd.mkv"
    make_video(path, 5, 97, 63, codec="libx264", pix_fmt="yuv444p")
    info = probe(path)
    assert (info.width, info.height) == (97, 63)
    assert next(iter_frames(path)).image.shape == (63, 97, 3)


def test_rotation_metadata_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rot.mp4"
    ref = make_video(path, 4, 96, 64, rotate=90)
    info = probe(path)
    assert info.rotation == 90 and (info.width, info.height) == (64, 96)
    image = next(iter_frames(path)).image
    assert image.shape == (96, 64, 3)
    assert np.abs(image.astype(int) - np.rot90(ref[0]).astype(int)).mean() < 20


def test_variable_frame_rate_keeps_every_frame_once(tmp_path: Path) -> None:
    path = tmp_path / "vfr.mkv"
    make_video(path, 12, 64, 48, vfr=True)
    frames = list(iter_frames(path))
    assert len(frames) == probe(path).num_frames == 12
    gaps = np.diff([f.pts_seconds for f in frames]).round(3)
    assert set(gaps.tolist()) == {0.04, 0.08}  # irregular gaps survive decoding


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no such file"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="not a file"):
        probe(tmp_path)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        probe(empty)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(1).bytes(10000))
    with pytest.raises(VideoError):
        probe(noise)
    good = tmp_path / "good.mp4"
    make_video(good, 30, 64, 48)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VideoError):
        probe(cut)
    audio = tmp_path / "audio.m4a"
    make_audio_only(audio)
    with pytest.raises(VideoError, match="no video stream"):
        probe(audio)
    with pytest.raises(VideoError, match="exceed the limit"):
        probe(good, max_pixels=64 * 47)


def test_a_video_that_ends_early_is_an_error_not_a_shorter_video(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    make_video(path, 9, 64, 48)
    with pytest.raises(VideoError, match="ends"):
        list(iter_clip_windows(path, clip_plan(12, 8, 4)))
