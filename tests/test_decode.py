from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from videos import make_audio_only, make_video, remux

from service.pipeline.clips import clip_plan
from service.video import VideoError, decode, iter_clip_windows, iter_frames, probe, read_frames


def _has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
        return True
    except ValueError:  # UnknownCodecError
        return False


def _encode(path: Path, *args, **kwargs) -> np.ndarray:
    codec = kwargs.get("codec", "libx264")
    if not _has_encoder(codec):
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    try:
        return make_video(path, *args, **kwargs)
    except av.FFmpegError as e:  # e.g. an encoder built without 10-bit support
        pytest.skip(f"{codec} cannot encode {kwargs.get('pix_fmt', 'yuv420p')} here: {e}")


def _images(frames) -> np.ndarray:
    return np.stack([f.image for f in frames]).astype(int)


def _assert_same_pictures(decoded: np.ndarray, ref: np.ndarray) -> None:
    """Lossy but the same pictures, in the same order: every frame is close to its source and
    closer to it than to the neighbouring source frames (a dropped/duplicated frame fails)."""
    assert decoded.shape == ref.shape
    err = np.abs(decoded - ref.astype(int)).mean(axis=(1, 2, 3))
    assert err.max() < 6, err
    if len(ref) > 1:
        before = np.abs(decoded[1:] - ref[:-1].astype(int)).mean(axis=(1, 2, 3))
        after = np.abs(decoded[:-1] - ref[1:].astype(int)).mean(axis=(1, 2, 3))
        assert (err[1:] < before).all() and (err[:-1] < after).all()


def _assert_reads_match(path: Path, frames, indices) -> None:
    got = read_frames(path, indices)
    assert [f.index for f in got] == list(indices)
    for f in got:
        assert np.array_equal(f.image, frames[f.index].image), f.index
        assert f.pts_seconds == frames[f.index].pts_seconds


DECODER = {"libx264": "h264", "libx265": "hevc", "libvpx-vp9": "vp9", "libvpx": "vp8", "mpeg4": "mpeg4"}

CASES = [  # name, codec, pix_fmt, width, height
    ("h264.mp4", "libx264", "yuv420p", 96, 64),  # B-frames, GOP of 12: several keyframes
    ("h264.mkv", "libx264", "yuv420p", 96, 64),
    ("h264.mov", "libx264", "yuv420p", 96, 64),
    ("h264.avi", "libx264", "yuv420p", 96, 64),  # AVI pts do not follow B-frame reordering
    ("vp9.webm", "libvpx-vp9", "yuv420p", 96, 64),
    ("vp9-odd.webm", "libvpx-vp9", "yuv420p", 97, 63),
    ("vp8.webm", "libvpx", "yuv420p", 96, 64),
    ("mpeg4.mp4", "mpeg4", "yuv420p", 96, 64),
    ("mpeg4.avi", "mpeg4", "yuv420p", 96, 64),
    ("mpeg4-odd.mkv", "mpeg4", "yuv420p", 97, 63),
    ("h264-odd-444.mkv", "libx264", "yuv444p", 97, 63),  # x264 needs even sizes for 4:2:0
    ("yuvj.mp4", "libx264", "yuvj420p", 96, 64),  # full range
    ("h264-10bit.mp4", "libx264", "yuv420p10le", 96, 64),
    ("hevc-10bit.mp4", "libx265", "yuv420p10le", 96, 64),
    ("hevc.mkv", "libx265", "yuv420p", 96, 64),
]


@pytest.mark.parametrize("name, codec, pix_fmt, width, height", CASES, ids=[c[0] for c in CASES])
def test_codecs_and_containers(tmp_path: Path, name: str, codec: str, pix_fmt: str, width: int,
                               height: int) -> None:
    path = tmp_path / name
    ref = _encode(path, 23, width, height, codec=codec, pix_fmt=pix_fmt)
    info = probe(path)
    assert (info.num_frames, info.width, info.height, info.rotation) == (23, width, height, 0)
    assert info.pix_fmt == pix_fmt and info.codec == DECODER[codec]
    assert info.fps == pytest.approx(25) and info.duration_s == pytest.approx(23 / 25, abs=0.05)
    frames = list(iter_frames(path))
    assert [f.index for f in frames] == list(range(23))
    assert all(f.image.dtype == np.uint8 and f.image.flags.c_contiguous for f in frames)
    if name != "h264.avi":  # AVI has no presentation timestamps: B-frames get made-up ones
        assert np.allclose(np.diff([f.pts_seconds for f in frames]), 0.04)
    _assert_same_pictures(_images(frames), ref)
    # Seeking gives the very pixels of streaming, in the order asked, duplicates included.
    _assert_reads_match(path, frames, [13, 0, 22, 7, 13, 12])
    assert [f.index for f in read_frames(path, [])] == []
    # Unthreaded decoding yields the same frames.
    assert all(np.array_equal(a.image, b.image) for a, b in zip(iter_frames(path, threads=False), frames))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 30])
def test_frame_counts_and_clip_windows(tmp_path: Path, n: int) -> None:
    path = tmp_path / "v.mp4"
    ref = make_video(path, n, 64, 48)
    assert probe(path).num_frames == n
    frames = list(iter_frames(path))
    _assert_same_pictures(_images(frames), ref)
    for clip_len, overlap in [(8, 4), (8, 0), (4, 3)]:
        plan = clip_plan(n, clip_len, overlap)
        windows = list(iter_clip_windows(path, plan))
        assert [k for k, _ in windows] == list(range(len(plan)))
        for (_, window), clip in zip(windows, plan):
            assert [f.index for f in window] == clip  # frame 0 repeated for short videos
            assert all(np.array_equal(f.image, frames[f.index].image) for f in window)
        _assert_reads_match(path, frames, plan[-1])


def test_clip_windows_share_frames_between_clips(tmp_path: Path) -> None:
    path = tmp_path / "v.mkv"
    make_video(path, 30, 64, 48)
    plan = clip_plan(30, 8, 4)
    windows = [window for _, window in iter_clip_windows(path, plan)]
    # Frames shared by consecutive clips are decoded once: the very same objects.
    assert len({id(f) for window in windows for f in window}) == 30
    for k in range(1, len(plan)):
        shared = set(plan[k - 1]) & set(plan[k])
        assert {id(f) for f in windows[k] if f.index in shared} <= {id(f) for f in windows[k - 1]}


@pytest.mark.parametrize("rotate", [90, 180, 270])
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_rotation_metadata_is_applied(tmp_path: Path, rotate: int, suffix: str) -> None:
    path = tmp_path / f"rot{suffix}"
    ref = make_video(path, 14, 96, 64, rotate=rotate)
    info = probe(path)
    assert info.rotation == rotate
    assert (info.width, info.height) == ((64, 96) if rotate % 180 else (96, 64))
    frames = list(iter_frames(path))
    assert frames[0].image.shape == (info.height, info.width, 3)
    # Display rotation is counterclockwise, as np.rot90.
    _assert_same_pictures(_images(frames), np.stack([np.rot90(r, rotate // 90) for r in ref]))
    _assert_reads_match(path, frames, [13, 2])


@pytest.mark.parametrize("name, codec", [("vfr.mp4", "libx264"), ("vfr.mkv", "libx264"),
                                         ("vfr.webm", "libvpx-vp9")])
def test_variable_frame_rate_keeps_every_frame_once(tmp_path: Path, name: str, codec: str) -> None:
    path = tmp_path / name
    ref = make_video(path, 20, 64, 48, codec=codec, vfr=True)
    assert probe(path).num_frames == 20
    frames = list(iter_frames(path))
    assert len(frames) == 20
    gaps = np.diff([f.pts_seconds for f in frames]).round(3)
    assert set(gaps.tolist()) == {0.04, 0.08}  # irregular gaps survive, nothing resampled
    _assert_same_pictures(_images(frames), ref)
    _assert_reads_match(path, frames, [17, 5, 6])


def test_edit_list_hides_frames_that_are_not_counted(tmp_path: Path) -> None:
    source = tmp_path / "source.mp4"
    ref = make_video(source, 30, 64, 48)
    path = tmp_path / "trimmed.mp4"
    remux(source, path, shift=-3 * 512)  # 3 frames before t=0: the MP4 edit list hides them
    frames = list(iter_frames(path))
    assert probe(path).num_frames == len(frames) == 27
    _assert_same_pictures(_images(frames), ref[3:])
    _assert_reads_match(path, frames, [0, 26, 14])


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_file_cut_mid_gop_counts_decodable_frames(tmp_path: Path, suffix: str) -> None:
    source = tmp_path / "source.mp4"
    make_video(source, 30, 64, 48)
    path = tmp_path / f"cut{suffix}"
    remux(source, path, skip=3)  # starts with non-keyframes the decoder drops
    frames = list(iter_frames(path))
    assert probe(path).num_frames == len(frames) > 0
    assert [f.index for f in frames] == list(range(len(frames)))
    _assert_reads_match(path, frames, [len(frames) - 1, 0, 9])


@pytest.mark.parametrize("name, codec, options", [
    ("open-gop.mp4", "libx264", {"open-gop": "1", "g": "10", "keyint_min": "10", "bf": "3"}),
    ("open-gop.mkv", "libx265",
     {"x265-params": "log-level=error:keyint=10:min-keyint=10:open-gop=1:bframes=3"}),
])
def test_seeking_in_open_gops(tmp_path: Path, name: str, codec: str, options: dict) -> None:
    path = tmp_path / name
    _encode(path, 40, 64, 48, codec=codec, options=options)
    frames = list(iter_frames(path))
    assert probe(path).num_frames == len(frames) == 40
    for start in range(0, 40, 3):  # every possible start relative to the keyframes
        _assert_reads_match(path, frames, list(range(start, min(start + 8, 40))))


@pytest.mark.parametrize("name, codec", [("s.mp4", "libx264"), ("s.mkv", "libx264"),
                                         ("s.webm", "libvpx-vp9")])
def test_read_frames_seeks_instead_of_decoding_from_the_start(tmp_path: Path, name: str, codec: str) -> None:
    path = tmp_path / name
    make_video(path, 60, 64, 48, codec=codec)
    index, _ = decode._index(path, decode.DEFAULT_MAX_PIXELS)
    assert index.seekable
    got = [f.index for f in decode._read_seeking(path, index, [50, 51], True)]  # _SeekFailed: a fallback
    assert got == [50, 51]
    assert [f.index for f in decode.iter_frame_range(path, 50, 53)] == [50, 51, 52]


@pytest.mark.parametrize("threads", [True, False])
def test_reads_in_a_long_gop_skip_nothing_they_show(tmp_path: Path, threads: bool) -> None:
    # One keyframe, B-frames: a read in the middle decodes from frame 0, skipping the
    # non-reference frames before the range, and every frame it returns is iter_frames' own.
    path = tmp_path / "long-gop.mp4"
    make_video(path, 90, 96, 64, options={"g": "250", "bf": "3", "crf": "18"})
    frames = list(iter_frames(path))
    for indices in ([61, 62, 63], [40, 89], [7]):
        got = read_frames(path, indices, threads=threads)
        assert [f.index for f in got] == indices
        assert all(np.array_equal(f.image, frames[f.index].image) for f in got)
    ranged = list(decode.iter_frame_range(path, 33, 71, threads=threads))
    assert [f.index for f in ranged] == list(range(33, 71))
    assert all(np.array_equal(f.image, frames[f.index].image) for f in ranged)


def test_read_frames_outside_the_video(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    make_video(path, 9, 64, 48)
    with pytest.raises(VideoError, match="frame 9 asked for, the video has 9"):
        read_frames(path, [3, 9])
    with pytest.raises(ValueError):
        read_frames(path, [-1])


def test_plan_beyond_the_end_of_the_video_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    make_video(path, 9, 64, 48)
    with pytest.raises(VideoError, match="ends at frame 9 of 12"):
        list(iter_clip_windows(path, clip_plan(12, 8, 4)))


def _cut(src: Path, dst: Path, fraction: float) -> Path:
    dst.write_bytes(src.read_bytes()[: int(src.stat().st_size * fraction)])
    return dst


def _bad(tmp_path: Path, kind: str) -> tuple[Path, str]:
    if kind == "missing":
        return tmp_path / "missing.mp4", "no such file"
    if kind == "directory":
        return tmp_path, "not a file"
    if kind == "empty":
        (tmp_path / "empty.mp4").write_bytes(b"")
        return tmp_path / "empty.mp4", "empty"
    if kind == "random bytes":
        (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(1).bytes(10000))
        return tmp_path / "noise.mp4", "not a readable video"
    if kind == "truncated mp4":  # index (moov) at the end: lost
        make_video(tmp_path / "good.mp4", 30, 64, 48)
        return _cut(tmp_path / "good.mp4", tmp_path / "cut.mp4", 0.5), "damaged/truncated"
    if kind == "truncated faststart mp4":  # index first: it lists frames that are not there
        make_video(tmp_path / "good.mp4", 30, 64, 48)
        remux(tmp_path / "good.mp4", tmp_path / "fast.mp4", options={"movflags": "faststart"})
        return _cut(tmp_path / "fast.mp4", tmp_path / "cut.mp4", 0.6), "truncated"
    if kind == "truncated mkv":  # would demux and decode fine up to the cut
        make_video(tmp_path / "good.mkv", 30, 64, 48)
        cut = _cut(tmp_path / "good.mkv", tmp_path / "cut.mkv", 0.6)
        return cut, "truncated: the video track should last 1.20 s"
    if kind == "truncated webm, no frames left":
        make_video(tmp_path / "good.webm", 30, 64, 48, codec="libvpx-vp9")
        return _cut(tmp_path / "good.webm", tmp_path / "cut.webm", 0.05), "truncated"
    if kind.startswith("audio only"):
        path = tmp_path / f"audio.{kind.split()[2]}"
        cover = kind.endswith("cover")
        make_audio_only(path, cover=cover)
        message = "no video stream \\(the file has only audio streams"
        return path, message + (" and a cover picture" if cover else "")
    if kind == "too large":
        make_video(tmp_path / "big.mp4", 3, 128, 96)
        return tmp_path / "big.mp4", "frames of 128x96 exceed the limit of 12287 pixels"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "random bytes", "truncated mp4",
                                  "truncated faststart mp4", "truncated mkv",
                                  "truncated webm, no frames left", "audio only m4a", "audio only wav",
                                  "audio only mp3", "audio only mp3 with cover", "too large"])
def test_bad_inputs_raise_video_error(tmp_path: Path, kind: str) -> None:
    path, message = _bad(tmp_path, kind)
    with pytest.raises(VideoError, match=message) as e:
        probe(path, max_pixels=128 * 96 - 1)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    if kind not in ("truncated faststart mp4", "truncated mkv", "truncated webm, no frames left"):
        # Streaming refuses them too; truncated files are refused by probe's checks (and by
        # iter_frames' `expected`), not by a decoder that stops early.
        with pytest.raises(VideoError, match=message):
            list(iter_frames(path, max_pixels=128 * 96 - 1))


@pytest.mark.parametrize("threads", [True, False])
def test_consecutive_reads_carry_on_from_the_last_one(tmp_path: Path, threads: bool) -> None:
    # One keyframe and B-frames, read in stretches as a worker's tasks do (every other stretch,
    # as with two workers, then one going back): the stretches after the first carry on with the
    # same open decoder, and every frame is iter_frames' own.
    path = tmp_path / "long-gop.mp4"
    make_video(path, 120, 96, 64, options={"g": "250", "bf": "3", "crf": "18"})
    frames = list(iter_frames(path))
    decode.release_reader()
    readers = []
    for start in (8, 24, 40, 41, 72, 104, 30):
        got = read_frames(path, list(range(start, min(start + 12, 120))), threads=threads)
        assert [f.index for f in got] == list(range(start, min(start + 12, 120)))
        assert all(np.array_equal(f.image, frames[f.index].image) for f in got)
        readers.append(decode._warm.reader)
    assert all(r is readers[0] for r in readers[:6])  # carried on: no seek back to frame 0
    assert readers[6] is not readers[0]  # frame 30 is behind where it stopped: a new decoder
    ranged = list(decode.iter_frame_range(path, 50, 90, threads=threads))
    assert [f.index for f in ranged] == list(range(50, 90))
    assert all(np.array_equal(f.image, frames[f.index].image) for f in ranged)
    decode.release_reader()
    assert getattr(decode._warm, "reader", None) is None


def test_a_kept_decoder_is_not_used_for_another_file_at_the_same_path(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    make_video(path, 40, 64, 48, options={"g": "250"})
    assert [f.index for f in read_frames(path, [10, 11])] == [10, 11]
    first = decode._warm.reader
    other = tmp_path / "w.mp4"
    make_video(other, 40, 64, 48, content="noise", options={"g": "250"})
    os.replace(other, path)
    decode.forget(path)
    expect = list(iter_frames(path))
    got = read_frames(path, [20, 21])
    assert all(np.array_equal(f.image, expect[f.index].image) for f in got)
    assert decode._warm.reader is not first
    decode.release_reader()
