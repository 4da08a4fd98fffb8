"""Live sources: the stream clip plan, the live session, real protocols served on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import pytest
import torch
from frames import moving_frames
from videos import make_video

from service.model.checkpoint import load_model
from service.pipeline.clips import StreamPlan, clip_plan
from service.pipeline.live import stream_windows
from service.pipeline.runner import PipelineOptions, Segmenter
from service.video.decode import Frame
from service.video.live import RUN_END, LiveOptions, LiveReader, LiveSourceError, open_source


@pytest.mark.parametrize(("clip_len", "overlap"), [(8, 4), (16, 6), (8, 0), (5, 4)])
def test_stream_plan_ends_as_the_file_plan(clip_len: int, overlap: int) -> None:
    for n in range(1, 3 * clip_len + 3):
        plan = StreamPlan(clip_len, overlap)
        for i in range(n):
            plan.add_frame()
            # A frame's last clip is told only once no clip still to come can contain it.
            for f in range(i + 1):
                last = plan.last_use(f)
                if last is not None:
                    assert last == max(k for k, c in enumerate(clip_plan(n, clip_len, overlap)) if f in c)
        plan.end()
        assert plan.clips == clip_plan(n, clip_len, overlap)


def test_stream_windows_give_the_file_plans_tracks(small_weights) -> None:
    model = load_model(small_weights)
    cfg = model.cfg
    for n in (5, 8, 13, 22):
        images = moving_frames(n, 48, 64, seed=n)
        plan = clip_plan(n, cfg.clip_len, cfg.overlap)
        file_seg = Segmenter(model)
        windows = ((k, [Frame(i, None, images[i]) for i in clip]) for k, clip in enumerate(plan))
        expected = {f.index: (f.track_ids, f.rles, f.track_map) for f in file_seg.propagate(windows, plan, 48, 64)}

        stream = StreamPlan(cfg.clip_len, cfg.overlap)
        live_seg = Segmenter(model, pipeline=PipelineOptions.serial())
        got = {}
        for f in live_seg.propagate(stream_windows((Frame(i, None, im) for i, im in enumerate(images)), stream),
                                    stream, 48, 64):
            got[f.index] = (f.track_ids, f.rles, f.track_map)
        assert sorted(got) == list(range(n))
        for i in range(n):
            assert got[i][0] == expected[i][0] and got[i][1] == expected[i][1]
            assert torch.equal(got[i][2], expected[i][2])
        assert live_seg.result().num_frames == n
        assert [t.masks for t in live_seg.result().tracks] == [t.masks for t in file_seg.result().tracks]


# ---------------------------------------------------------------------------------------------
# Real protocols on loopback. The video is an MPEG-TS file; `segment` on the file is the truth.

ROOT = Path(__file__).resolve().parent
FPS, FRAMES = 25, 40
SYSTEM_PYTHON = "/usr/bin/python3"  # where Debian's python3-gi lives (the RTSP server's PyGObject)


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(*argv: str, ready: str) -> Iterator[tuple[subprocess.Popen, str]]:
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith(ready):
            proc.kill()
            pytest.skip(f"the server did not start: {line or proc.stderr.read().strip()[-300:]}")
        yield proc, line
    finally:
        proc.kill()
        proc.wait()


def _http_server(video: Path, seconds: float, *extra: str):
    return _server(sys.executable, str(ROOT / "live_server.py"), "http", str(video), "--seconds", str(seconds),
                   *extra, ready="port")


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT.parent), **(env or {})},
                          cwd=ROOT.parent)


@pytest.fixture(scope="module")
def ts_video(tmp_path_factory) -> tuple[Path, Path]:
    """An MPEG-TS video (H.264 with B-frames) and `stemseg segment`'s output on it."""
    root = tmp_path_factory.mktemp("live")
    video = root / "v.ts"
    make_video(video, FRAMES, 96, 64, container="mpegts", fps=FPS)
    out = root / "file_out"
    r = _cli("segment", str(video), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    return video, out


def _same_outputs(live: Path, file: Path) -> None:
    assert (live / "results.json").read_bytes() == (file / "results.json").read_bytes()
    assert (live / "mots.txt").read_bytes() == (file / "mots.txt").read_bytes()
    assert sorted(p.name for p in (live / "davis").iterdir()) == sorted(p.name for p in (file / "davis").iterdir())
    with av.open(str(live / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == FRAMES
    assert json.loads((live / "stemseg-output.json").read_text())["files"]


def test_http_ts_stream_gives_the_files_tracks_and_lines_as_it_goes(ts_video, tmp_path: Path) -> None:
    video, file_out = ts_video
    out = tmp_path / "live_out"
    with _http_server(video, FRAMES / FPS, "--once") as (_, line):
        url = f"http://127.0.0.1:{line.split()[1]}/v.ts"
        r = _cli("segment", url, "--out", str(out), "--reconnect", "0", "--jsonl", "-", "--backlog", "buffer")
    assert r.returncode == 0, r.stderr
    _same_outputs(out, file_out)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["frame"] for x in lines] == list(range(FRAMES))
    assert all(x["latency_s"] >= 0 and x["run"] == 0 for x in lines)
    # Every kept track's mask in results.json was on its frame's line, under one id throughout.
    for entry in json.loads((out / "results.json").read_text()):
        ids = set()
        for f, seg in enumerate(entry["segmentations"]):
            if seg is not None:
                ids |= {t["id"] for t in lines[f]["tracks"] if t["rle"]["counts"] == seg["counts"]}
        assert len(ids) == 1
    assert "0 frames dropped" in r.stderr and "latency p50" in r.stderr


def test_udp_ts_stream_gives_the_files_tracks(ts_video, tmp_path: Path) -> None:
    video, file_out = ts_video
    port = _free_port(socket.SOCK_DGRAM)
    out = tmp_path / "live_out"
    with _server(sys.executable, str(ROOT / "live_server.py"), "udp", str(video), "--seconds", str(FRAMES / FPS),
                 "--port", str(port), "--delay", "0.5", ready="ready"):
        # UDP has no end: the stream ends when nothing arrives for the read timeout.
        r = _cli("segment", f"udp://127.0.0.1:{port}", "--out", str(out), "--reconnect", "0", "--read-timeout", "2",
                 "--open-timeout", "20", "--backlog", "buffer")
    assert r.returncode == 0, r.stderr
    _same_outputs(out, file_out)


def test_rtsp_stream_over_tcp_gives_the_files_tracks(ts_video, tmp_path: Path) -> None:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
                           capture_output=True, check=False) if os.path.exists(SYSTEM_PYTHON) else None
    if probe is None or probe.returncode:
        pytest.skip("no GStreamer RTSP server (apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 "
                    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)")
    video, file_out = ts_video
    port = _free_port()
    out = tmp_path / "live_out"
    with _server(SYSTEM_PYTHON, str(ROOT / "rtsp_server.py"), str(video), str(port), ready="ready"):
        r = _cli("segment", f"rtsp://127.0.0.1:{port}/live", "--out", str(out), "--reconnect", "0",
                 "--backlog", "buffer")
    assert r.returncode == 0, r.stderr
    assert "ended by end of stream" in r.stdout
    _same_outputs(out, file_out)


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stemseg: error:") and all(w in last for w in words), last


def test_bad_sources_are_one_line_exit_2(tmp_path: Path) -> None:
    _one_line_error(_cli("segment", "foo://127.0.0.1/x", "--out", str(tmp_path / "a")), "unknown protocol 'foo'")
    port = _free_port()  # nothing listens there
    # A password in the URL is never printed.
    r = _cli("segment", f"rtsp://admin:s3cret@127.0.0.1:{port}/live", "--out", str(tmp_path / "b"))
    _one_line_error(r, "cannot open", "admin:***@", "connection refused")
    assert "s3cret" not in r.stderr
    _one_line_error(_cli("segment", "/dev/video9", "--out", str(tmp_path / "c")), "/dev/video9")
    video = tmp_path / "v.mp4"
    make_video(video, 3, 32, 32)
    _one_line_error(_cli("segment", str(video), "--duration", "3"), "--duration is for live sources")
    assert not any(p.name.startswith((".a", ".b", ".c")) for p in tmp_path.iterdir())


def test_open_failures_name_their_cause_in_one_line() -> None:
    """What the CLI prints (above) for each way a source cannot be opened."""
    port = _free_port()
    opts = LiveOptions(open_timeout_s=1)
    for url in (f"http://127.0.0.1:{port}/x.ts", f"rtsp://127.0.0.1:{port}/live", f"rtmp://127.0.0.1:{port}/a/b"):
        with pytest.raises(LiveSourceError, match="cannot open") as e:
            open_source(url, opts)
        assert "\n" not in str(e.value)
    with pytest.raises(LiveSourceError, match="connection refused"):
        open_source(f"http://127.0.0.1:{port}/x.ts", opts)
    # .invalid never resolves (RFC 6761); FFmpeg alone would say "Input/output error".
    with pytest.raises(LiveSourceError, match="the host name does not resolve"):
        open_source("http://no-such-host.invalid/x.ts", opts)
    # A server that accepts and never answers: the open timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        with pytest.raises(LiveSourceError, match="timed out"):
            open_source(f"http://127.0.0.1:{silent.getsockname()[1]}/x.ts", opts)
    assert time.monotonic() - start < 10


def test_sigterm_stops_cleanly_and_writes_what_was_seen(ts_video, tmp_path: Path) -> None:
    long_video = tmp_path / "long.ts"
    make_video(long_video, 250, 96, 64, container="mpegts", fps=FPS)
    out = tmp_path / "live_out"
    with _http_server(long_video, 250 / FPS, "--once") as (_, line):
        url = f"http://127.0.0.1:{line.split()[1]}/long.ts"
        with open(tmp_path / "stderr", "w+") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "segment", url, "--out", str(out),
                                     "--jsonl", "-", "--reconnect", "0", "--backlog", "buffer"],
                                    stdout=subprocess.PIPE, stderr=stderr, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT.parent)}, cwd=ROOT.parent)
            first = proc.stdout.readline()  # tracks are coming out while the stream plays
            assert json.loads(first)["frame"] == 0
            proc.send_signal(signal.SIGTERM)
            rest = proc.stdout.read()
            proc.wait(timeout=120)
            stderr.seek(0)
            err = stderr.read()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in [first, *rest.splitlines()]]
    n = len(lines)
    assert 0 < n < 250 and [x["frame"] for x in lines] == list(range(n))
    assert "ended by SIGTERM" in err
    assert len(list((out / "davis").iterdir())) == n
    with av.open(str(out / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == n
    entries = json.loads((out / "results.json").read_text())
    assert all(len(e["segmentations"]) == n for e in entries)


def test_duration_stops_after_that_many_seconds_of_frames(ts_video, tmp_path: Path) -> None:
    long_video = tmp_path / "long.ts"
    make_video(long_video, 250, 96, 64, container="mpegts", fps=FPS)
    with _http_server(long_video, 250 / FPS, "--once") as (_, line):
        url = f"http://127.0.0.1:{line.split()[1]}/long.ts"
        # buffer: on a loaded machine the model may fall behind, and this test is about the clock.
        r = _cli("bench", url, "--duration", "1.5", "--reconnect", "0", "--backlog", "buffer")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ended_by"] == "duration"
    # Frames arrive at the source's pace: 1.5 s of a 25 fps stream (give or take the start's burst).
    assert 25 <= report["frames_read"] <= 60 and report["frames"] == report["frames_read"]
    assert report["frames_dropped"] == 0 and report["latency_s"]["p95"] > 0


def _reader_items(reader: LiveReader, wait_before: float) -> list:
    time.sleep(wait_before)  # the model stalls: the reader keeps reading meanwhile
    held = reader._queue.frames
    items = list(reader)
    reader.close()
    return [held, *items]


@pytest.mark.parametrize("policy", ["drop", "buffer"])
def test_backlog_policy_bounds_the_queue(ts_video, tmp_path: Path, policy: str) -> None:
    video = tmp_path / "long.ts"
    make_video(video, 100, 96, 64, container="mpegts", fps=FPS)
    with _http_server(video, 100 / FPS, "--once") as (_, line):
        opts = LiveOptions(reconnect_attempts=0, backlog=policy, queue_frames=8)
        reader = LiveReader(f"http://127.0.0.1:{line.split()[1]}/long.ts", opts, clip_len=8)
        reader.start()
        held, *items = _reader_items(reader, 2.0)
    stats = reader.stats
    frames = [x for x in items if x is not RUN_END]
    assert held <= 8  # never more than the bound, however far behind
    assert stats.frames_read == 100 and stats.frames_handed == len(frames)
    if policy == "buffer":
        assert stats.frames_dropped == 0 and [f.frame.index for f in frames] == list(range(100))
        return
    # Whole clips are dropped, each drop ends a run, and each run numbers its frames from 0.
    assert stats.clips_dropped >= 1 and stats.frames_handed + stats.frames_dropped == 100
    assert (stats.clips_dropped - 1) * 8 < stats.frames_dropped <= stats.clips_dropped * 8
    runs: dict[int, list[int]] = {}
    for f in frames:
        runs.setdefault(f.run, []).append(f.frame.index)
    assert len(runs) >= 2 and all(v == list(range(len(v))) for v in runs.values())
    assert [f.sequence for f in frames] == sorted(f.sequence for f in frames)
    assert sum(1 for x in items if x is RUN_END) >= len(runs) - 1


@pytest.mark.slow
def test_source_restart_mid_stream_is_a_gap_with_new_track_ids(tmp_path: Path) -> None:
    video = tmp_path / "long.ts"
    make_video(video, 120, 96, 64, container="mpegts", fps=FPS)
    port = _free_port()
    out = tmp_path / "live_out"
    env = {"STEMSEG_LIVE_RECONNECT_BACKOFF_S": "0.5"}
    with open(tmp_path / "stderr", "w+") as stderr:
        with _http_server(video, 120 / FPS, "--once", "--port", str(port)) as (first_server, _):
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "segment", f"http://127.0.0.1:{port}/v.ts",
                                     "--out", str(out), "--jsonl", "-", "--backlog", "buffer", "--reconnect", "5"],
                                    stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT.parent,
                                    env={**os.environ, "PYTHONPATH": str(ROOT.parent), **env})
            first = proc.stdout.readline()
            first_server.kill()  # the source dies mid-stream
        time.sleep(0.5)
        with _http_server(video, 120 / FPS, "--once", "--port", str(port)):  # ... and comes back
            rest = proc.stdout.read()
            proc.wait(timeout=120)
        stderr.seek(0)
        err = stderr.read()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in [first, *rest.splitlines()]]
    assert [x["frame"] for x in lines] == list(range(len(lines)))
    runs = sorted({x["run"] for x in lines})
    assert runs == [0, 1] and "1 reconnects" in err
    before = {t["id"] for x in lines if x["run"] == 0 for t in x["tracks"]}
    after = {t["id"] for x in lines if x["run"] == 1 for t in x["tracks"]}
    assert before and after and min(after) > max(before)  # chaining is cut at the gap
    assert sum(1 for x in lines if x["run"] == 1) == 120  # the restarted source from its start
    assert len(list((out / "davis").iterdir())) == len(lines)


def test_hls_playlist_over_http_gives_the_files_tracks(ts_video, tmp_path: Path) -> None:
    video, file_out = ts_video
    hls = tmp_path / "hls"
    hls.mkdir()
    # PyAV's own HLS muxer cuts the file's packets (not re-encoded) into segments and a playlist.
    with av.open(str(video)) as src, av.open(str(hls / "index.m3u8"), "w", format="hls",
                                             options={"hls_time": "0.5", "hls_list_size": "0"}) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    assert len(list(hls.glob("*.ts"))) > 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(hls)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out_dir = tmp_path / "live_out"
    try:
        r = _cli("segment", f"http://127.0.0.1:{server.server_address[1]}/index.m3u8", "--out", str(out_dir),
                 "--reconnect", "0", "--backlog", "buffer")
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr
    _same_outputs(out_dir, file_out)


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_a_protocol_this_ffmpeg_lacks_is_one_line(tmp_path: Path) -> None:
    try:
        av.open("srt://127.0.0.1:9", timeout=1).close()
    except av.error.ProtocolNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - any other failure means FFmpeg knows the protocol
        pytest.skip("this FFmpeg has SRT")
    _one_line_error(_cli("segment", "srt://127.0.0.1:9", "--out", str(tmp_path / "x")),
                    "does not support the protocol")


def test_a_stalled_stream_ends_after_the_read_timeout_with_what_was_seen(ts_video, tmp_path: Path) -> None:
    video, _ = ts_video
    out = tmp_path / "live_out"
    with _http_server(video, FRAMES / FPS, "--once", "--stall", "30") as (_, line):
        start = time.monotonic()
        r = _cli("segment", f"http://127.0.0.1:{line.split()[1]}/v.ts", "--out", str(out), "--reconnect", "0",
                 "--read-timeout", "2", "--format", "ytvis", "davis")
    assert r.returncode == 0, r.stderr
    assert "timed out" in r.stdout and time.monotonic() - start < 30
    seen = len(list((out / "davis").iterdir()))
    assert 0 < seen < FRAMES  # the first half, sent before the stall
    assert all(len(e["segmentations"]) == seen for e in json.loads((out / "results.json").read_text()))


def test_garbage_datagrams_before_the_stream_change_nothing(ts_video, tmp_path: Path) -> None:
    video, file_out = ts_video
    port = _free_port(socket.SOCK_DGRAM)
    out = tmp_path / "live_out"
    with _server(sys.executable, str(ROOT / "live_server.py"), "udp", str(video), "--seconds", str(FRAMES / FPS),
                 "--port", str(port), "--delay", "0.5", "--garbage", ready="ready"):
        r = _cli("segment", f"udp://127.0.0.1:{port}", "--out", str(out), "--reconnect", "0", "--read-timeout", "2",
                 "--open-timeout", "20", "--backlog", "buffer")
    assert r.returncode == 0, r.stderr
    _same_outputs(out, file_out)


def test_a_change_of_frame_size_ends_the_stream_there(tmp_path: Path) -> None:
    first, second = tmp_path / "a.ts", tmp_path / "b.ts"
    make_video(first, 24, 96, 64, container="mpegts", fps=FPS)
    make_video(second, 24, 128, 96, container="mpegts", fps=FPS)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())  # MPEG-TS concatenates
    out = tmp_path / "live_out"
    with _http_server(joined, 48 / FPS, "--once") as (_, line):
        r = _cli("segment", f"http://127.0.0.1:{line.split()[1]}/joined.ts", "--out", str(out), "--reconnect", "0",
                 "--backlog", "buffer")
    assert r.returncode == 0, r.stderr
    assert "the frame size changed from 96x64 to 128x96" in r.stdout
    assert len(list((out / "davis").iterdir())) == 24


# ---------------------------------------------------------------------------------------------
# The service's policy on which sources a client may have it open (STEMSEG_STREAM_HOSTS).

def _resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror("unknown host")
        return table[host]
    return resolve


def test_stream_hosts_allow_nothing_by_default_and_private_ranges_only_when_listed() -> None:
    from service.jobs.sources import parse_nets
    from service.jobs.stream_sources import check_stream_url

    assert "not enabled" in check_stream_url("rtsp://93.184.216.34/live", [], [])
    names = _resolver({"cam.example.com": ["93.184.216.34"], "inside.example.com": ["10.1.2.3"],
                       "mixed.example.com": ["93.184.216.34", "192.168.0.9"]})
    hosts = ["cam.example.com", "inside.example.com", "mixed.example.com", "203.0.113.7:8554", "10.9.9.9:5000",
             "127.0.0.1"]
    assert check_stream_url("rtsp://user:pass@cam.example.com/live", hosts, [], names) is None
    assert "not allowed" in check_stream_url("rtsp://cam.example.com:8554/live", hosts, [], names)  # 554 only
    assert "not allowed" in check_stream_url("rtsp://elsewhere.example.com/live", hosts, [], names)
    assert "private" in check_stream_url("rtsp://inside.example.com/live", hosts, [], names)
    assert "private" in check_stream_url("rtsp://mixed.example.com/live", hosts, [], names)  # every address
    assert "private" in check_stream_url("rtsp://127.0.0.1/live", hosts, [], names)  # listed, still loopback
    assert "could not be resolved" in check_stream_url("http://cam.example.com/x.ts", hosts, [], _resolver({}))
    assert "must give its port" in check_stream_url("udp://10.9.9.9", hosts, [], names)
    nets = parse_nets("10.0.0.0/8, 127.0.0.1")
    assert check_stream_url("rtsp://inside.example.com/live", hosts, nets, names) is None
    assert check_stream_url("udp://10.9.9.9:5000", hosts, nets, names) is None
    assert check_stream_url("rtsp://127.0.0.1/live", hosts, nets, names) is None
    assert "private" in check_stream_url("rtsp://mixed.example.com/live", hosts, nets, names)
    assert "http://" in check_stream_url("file:///etc/passwd", hosts, nets, names)
    assert "with a host" in check_stream_url("/dev/video0", hosts, nets, names)
    assert "whitespace" in check_stream_url("rtsp://10.9.9.9/a b", hosts, nets, names)


def test_a_bad_stream_hosts_entry_stops_the_settings() -> None:
    from pydantic import ValidationError

    from service.config import Settings

    assert Settings(stream_hosts="cam.example.com:554, [::1]:8554").stream_hosts
    for bad in ("host:99999", "::1:8080", "a b"):
        with pytest.raises(ValidationError):
            Settings(stream_hosts=bad)
