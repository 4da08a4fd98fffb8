"""The container-index pre-check fails closed: every file FFmpeg's mov probe would take is
counted as ISO BMFF before FFmpeg opens it, whatever box comes first, however many top-level
boxes precede the movie header; a file the walk cannot finish is refused, never handed to
FFmpeg uncounted. The AVI walk keeps to the probe's time budget and one chunk cap."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from videos import make_long_video

from service.video import decode, indexes
from service.video.decode import OverLimit, VideoError, probe


def _box(kind: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _top_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    pos, out = 0, []
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        out.append((kind, pos, size))
        pos += size
    return out


@pytest.fixture(scope="module")
def long_mp4(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("iso") / "long.mp4"
    make_long_video(path, 30_000)
    return path.read_bytes()


@pytest.fixture
def no_ffmpeg(monkeypatch):
    def no_open(path):
        raise AssertionError("FFmpeg opened a file the index check should have refused")

    monkeypatch.setattr(decode, "_open", no_open)


def _write(tmp_path: Path, data: bytes, name: str = "video") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("first", [b"junk", b"udta", b"uuid", b"skip", b"pict", b"prfl", b"wide", b"pnot"])
def test_any_box_ffmpegs_mov_probe_takes_is_counted(tmp_path: Path, long_mp4: bytes, no_ffmpeg, first) -> None:
    path = _write(tmp_path, _box(first) + long_mp4)
    with pytest.raises(OverLimit) as e:
        probe(path, max_frames=20_000)
    assert e.value.kind == "frames"


def test_top_level_boxes_are_skipped_without_a_cap(tmp_path: Path, long_mp4: bytes, no_ffmpeg, monkeypatch) -> None:
    monkeypatch.setattr(indexes, "_MAX_BOXES", 1000)  # a cap for the boxes inside the movie header only
    moov = next(pos for kind, pos, _ in _top_boxes(long_mp4) if kind == b"moov")
    padded = long_mp4[:moov] + _box(b"free") * 5000 + long_mp4[moov:]
    with pytest.raises(OverLimit) as e:
        probe(_write(tmp_path, padded), max_frames=10**9, max_samples=20_000)
    assert e.value.kind == "samples"


def test_a_walk_that_cannot_finish_is_refused(tmp_path: Path, long_mp4: bytes, no_ffmpeg, monkeypatch) -> None:
    ftyp = _box(b"ftyp", b"isom\0\0\2\0isom")
    deep = _box(b"stsz", struct.pack(">IIII", 0, 4, 10**7, 0))
    for _ in range(12):
        deep = _box(b"trak", deep)
    for data, why in ((ftyp + _box(b"moov", deep), "nested more than"),
                      (ftyp + _box(b"cmov", b"\0" * 32), "compressed"),
                      (ftyp + _box(b"moov", _box(b"free") * 200), "more than 100 boxes")):
        monkeypatch.setattr(indexes, "_MAX_BOXES", 100)
        with pytest.raises(VideoError) as e:
            probe(_write(tmp_path, data), max_frames=20_000)
        assert not isinstance(e.value, OverLimit) and why in e.value.reason, e.value.reason
        assert str(tmp_path) not in e.value.reason


def test_a_sample_table_under_udta_or_a_free_movie_header_is_counted(tmp_path: Path, no_ffmpeg) -> None:
    # FFmpeg parses a trak wherever mov_read_default runs (udta too), and, when no moov is found,
    # reads a `free` box that starts with an mvhd as the movie header.
    trak = _box(b"trak", _box(b"stsz", struct.pack(">IIII", 0, 4, 10**7, 0)))
    for data in (_box(b"ftyp", b"isom\0\0\2\0") + _box(b"moov", _box(b"udta", trak)),
                 _box(b"ftyp", b"isom\0\0\2\0") + _box(b"free", _box(b"mvhd", b"\0" * 100) + trak)):
        with pytest.raises(OverLimit) as e:
            probe(_write(tmp_path, data), max_frames=10**9, max_samples=1_000_000)
        assert e.value.kind == "samples"


def test_an_ordinary_mp4_still_probes(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    make_long_video(path, 300)
    assert probe(path, max_frames=20_000, max_samples=100_000).num_frames == 300
    # boxes after the movie (trailing free space, a size-0 box to the end) are walked past
    padded = _write(tmp_path, path.read_bytes() + _box(b"free", b"\0" * 64) + b"\0\0\0\0skip", "p.mp4")
    assert probe(padded, max_frames=20_000, max_samples=100_000).num_frames == 300


def _avi_of_junk(lists: int, chunks: int) -> bytes:
    inner = struct.pack("<4sI", b"JUNK", 0) * chunks
    hdrl = b"LIST" + struct.pack("<I", 4 + len(inner)) + b"hdrl" + inner
    body = b"AVI " + hdrl * lists
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_avi_walk_keeps_to_the_time_budget(tmp_path: Path) -> None:
    path = _write(tmp_path, _avi_of_junk(3, 300_000), "slow.avi")
    t0 = time.monotonic()
    with pytest.raises(OverLimit) as e:
        probe(path, max_frames=20_000, budget_s=0.05, max_samples=10**9)
    assert e.value.kind == "time" and time.monotonic() - t0 < 1


def test_avi_chunk_cap_counts_all_header_lists_together(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(indexes, "_MAX_BOXES", 1000)
    path = _write(tmp_path, _avi_of_junk(3, 600), "many.avi")  # 600 each, 1800 in all
    with pytest.raises(VideoError) as e:
        probe(path, max_frames=20_000, max_samples=10**9)
    assert not isinstance(e.value, OverLimit) and "more than 1000 chunks" in e.value.reason
