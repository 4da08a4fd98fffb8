"""Hostile inputs against the real service (API and worker processes, Redis): uploads that claim
millions of frames or need decoding to count, raw streams without an index, huge or slow request
heads, malformed Last-Event-IDs, hundreds of event streams, webhooks aimed at other ports or
trickling their answer, and a DELETE in the middle of a task."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from service_env import REDIS_URL, ServiceEnv, in_process_worker
from videos import make_long_video, make_video

from service.jobs.queue import GROUP
from service.jobs.webhooks import CONNECTION_FAILED, TIMED_OUT, Notifier
from service.video import decode
from service.video.decode import OverLimit, Unindexed, check_indexable, probe, read_frames

PROBLEM = "application/problem+json"


@pytest.fixture
def make_env(tmp_path: Path, small_weights: Path):
    envs: list[ServiceEnv] = []

    def make(**settings: str) -> ServiceEnv:
        env = ServiceEnv(tmp_path / f"env{len(envs)}", small_weights, **settings)
        env.data.mkdir(parents=True)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _post_video(env: ServiceEnv, path: Path, **params) -> httpx.Response:
    return httpx.post(f"{env.base}/v1/jobs", content=path.read_bytes(), params=params,
                      headers={"content-type": "application/octet-stream", "x-filename": path.name}, timeout=120)


def _clean_logs(env: ServiceEnv) -> None:
    text = env.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert str(env.data) not in text, text[-3000:]


# --- probing: bounded memory and time -------------------------------------------------------------

def test_frame_limit_stops_reading_before_the_end(tmp_path: Path, monkeypatch) -> None:
    # A Matroska file cut at 70%: read to the end it is refused as truncated; with a frame limit
    # the probe stops at the limit, long before the damage.
    video = tmp_path / "long.mkv"
    make_long_video(video, 6000)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) * 7 // 10])
    with pytest.raises(decode.VideoError) as whole:
        probe(video)
    assert not isinstance(whole.value, OverLimit)
    with pytest.raises(OverLimit) as limited:
        probe(video, max_frames=1000)
    assert limited.value.kind == "frames" and "more than 1000 frames" in str(limited.value)

    # An MP4's sample table is counted from its boxes: FFmpeg never opens (and indexes) it.
    mp4 = tmp_path / "long.mp4"
    make_long_video(mp4, 300_000)

    def no_open(path):
        raise AssertionError("FFmpeg opened a file whose sample table is over the limit")

    monkeypatch.setattr(decode, "_open", no_open)
    with pytest.raises(OverLimit):
        probe(mp4, max_frames=20_000)
    with pytest.raises(OverLimit) as samples:
        probe(mp4, max_frames=10**9, max_samples=100_000)
    assert samples.value.kind == "samples"
    avi = tmp_path / "long.avi"  # FFmpeg reads an AVI's whole idx1 while opening it
    make_long_video(avi, 150_000)
    with pytest.raises(OverLimit) as entries:
        probe(avi, max_frames=10**9, max_samples=100_000)
    assert entries.value.kind == "samples"
    for cut in (20, 200, 3000):  # a damaged header is FFmpeg's to judge, never an unexpected error
        (tmp_path / "cut.avi").write_bytes(avi.read_bytes()[:cut])
        monkeypatch.undo()
        with pytest.raises(decode.VideoError):
            probe(tmp_path / "cut.avi", max_frames=1000, max_samples=100_000)


def test_probe_time_budget(tmp_path: Path) -> None:
    raw = tmp_path / "v.h264"
    make_long_video(raw, 3000)
    with pytest.raises(OverLimit) as e:
        probe(raw, budget_s=1e-6)
    assert e.value.kind == "time"
    assert probe(raw, budget_s=60).num_frames == 3000


def test_index_cache_is_bounded_in_bytes_and_dropped_with_the_file(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"d{i}" / "video")
        paths[-1].parent.mkdir()
        make_video(paths[-1], 30, 32, 32, container="mp4")
    decode.clear_cache()
    read_frames(paths[0], [5])
    one = decode.cache_bytes()
    assert one > 0
    try:
        decode.configure_cache(int(one * 2.5))
        for p in paths:
            read_frames(p, [5])
        assert one * 2 <= decode.cache_bytes() <= one * 2.5  # the oldest went
        decode.forget(paths[2].parent)
        assert decode.cache_bytes() == one
        probe(paths[0])  # admission probes are never cached
        decode.forget(paths[1])
        assert decode.cache_bytes() == 0
    finally:
        decode.configure_cache(decode.DEFAULT_CACHE_BYTES)
        decode.clear_cache()


def test_refusing_a_file_of_many_frames_costs_the_api_no_memory(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_MAX_FRAMES="1000", STEMSEG_RATE_LIMIT_JOBS="0")
    env.start_api()
    api = env.procs[0].pid
    mp4 = tmp_path / "many.mp4"
    make_long_video(mp4, 300_000)  # 6.6 MB; a full probe of it took the API from 60 to 120 MB
    raw = tmp_path / "many.h264"
    make_long_video(raw, 30_000)
    r = _post_video(env, mp4)  # warm-up: first-request allocations are not the probe's
    assert r.status_code == 413
    before = _rss_mb(api)
    for path in (mp4, raw) * 5:
        t0 = time.monotonic()
        r = _post_video(env, path)
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM, r.text
        assert "more than 1000 frames" in r.json()["detail"] and "STEMSEG_MAX_FRAMES" in r.json()["detail"]
        assert time.monotonic() - t0 < 10
    assert _rss_mb(api) - before < 15, (before, _rss_mb(api))
    assert env.stored_jobs() == []  # nothing left in the store
    _clean_logs(env)


@pytest.mark.slow
def test_five_million_frames_refused_within_100_mb(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0")
    env.start_api()
    api = env.procs[0].pid
    big = tmp_path / "5m.mp4"
    make_long_video(big, 5_000_000)
    before = _rss_mb(api)
    rss = [before]
    for _ in range(3):
        r = _post_video(env, big)
        assert r.status_code == 413 and "STEMSEG_MAX_FRAMES" in r.json()["detail"], r.text
        rss.append(_rss_mb(api))
    assert max(rss) - before < 100, rss
    _clean_logs(env)


# --- raw streams: normalised once at admission ---------------------------------------------------

def test_raw_h264_is_remuxed_seekable_at_admission(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_MAX_FRAMES="2000", STEMSEG_RATE_LIMIT_JOBS="0")
    env.start_api()
    raw = tmp_path / "camera.h264"
    make_video(raw, 60, 64, 48, container="h264")  # B-frames: decode order is not display order
    with pytest.raises(Unindexed):
        check_indexable(raw)
    r = _post_video(env, raw)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["video"]["num_frames"] == 60 and job["video"]["fps"] == pytest.approx(25)
    stored = tmp_path / "stored-video"
    stored.write_bytes(env.stored(job["id"])["video"])  # from the directory or the bucket
    info = check_indexable(stored)  # placed by timestamps: a worker seeks instead of decoding from 0
    assert info.num_frames == 60
    index, _ = decode._index(stored, decode.DEFAULT_MAX_PIXELS)
    late = list(range(50, 60))
    assert index.seekable and decode._read_seeking(stored, index, late, False) is not None
    original = [f.image for f in decode.iter_frames(raw)]
    assert all(np.array_equal(f.image, original[f.index]) for f in read_frames(stored, [0, 17, 33, 59]))

    # Over the limits while counting: refused before the whole stream is decoded.
    many = tmp_path / "many.h264"
    make_long_video(many, 20_000)
    r = _post_video(env, many)
    assert r.status_code == 413 and "more than 2000 frames" in r.json()["detail"], r.text
    assert not [n for n in env.stored_jobs() if n.startswith("upload-")]
    _clean_logs(env)


def test_raw_h264_job_gives_the_clis_tracks(make_env, tmp_path: Path, small_weights: Path) -> None:
    from service.cli import main

    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0")
    env.start_api()
    env.start_worker()
    raw = tmp_path / "camera.h264"
    make_video(raw, 21, 64, 48, container="h264")
    r = _post_video(env, raw, formats="ytvis")
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["id"])
    assert job["status"] == "succeeded", job
    tracks = httpx.get(f"{env.base}/v1/jobs/{job['id']}/result", timeout=60).json()["tracks"]
    out = tmp_path / "cli"
    assert main(["segment", str(raw), "--weights", str(small_weights), "--out", str(out), "--device", "cpu",
                 "--format", "ytvis", "--no-progress"]) == 0
    cli = json.loads((out / "results.json").read_text())
    assert tracks and [(t["category_id"], t["segmentations"]) for t in tracks] == [
        (c["category_id"], c["segmentations"]) for c in cli]
    _clean_logs(env)


@pytest.mark.parametrize("name, codec, container", [("raw.h264", "libx264", "h264"), ("raw.hevc", "libx265", "hevc"),
                                                    ("bframes.avi", "libx264", "avi")])
def test_normalise_keeps_every_frame_and_makes_it_seekable(tmp_path: Path, name: str, codec: str,
                                                          container: str) -> None:
    from service.video.normalise import normalise

    src = tmp_path / name
    make_video(src, 50, 64, 48, codec=codec, container=container)
    with pytest.raises(Unindexed):
        check_indexable(src)
    out = tmp_path / "out.mkv"
    with out.open("wb") as f:
        assert normalise(src, f) == 50
    assert check_indexable(out).num_frames == 50
    original = [f.image for f in decode.iter_frames(src)]
    got = read_frames(out, [49, 0, 25, 13])
    assert all(np.array_equal(f.image, original[f.index]) for f in got)
    with out.open("wb") as f, pytest.raises(OverLimit):
        normalise(src, f, max_frames=1)  # counted while it decodes: 1 + the start-of-stream slack
    with out.open("wb") as f, pytest.raises(OverLimit):
        normalise(src, f, max_bytes=100)


def test_openapi_declares_the_new_statuses(tmp_path: Path, redis_prefix: str) -> None:
    from service.api.main import create_app
    from service.config import Settings
    from service.model.presets import get_preset

    s = Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, data_dir=tmp_path / "d")
    paths = create_app(s, model_cfg=get_preset("kitti_mots")).openapi()["paths"]
    assert {"200", "206", "400", "416"} <= set(paths["/v1/jobs/{job_id}/overlay.mp4"]["get"]["responses"])
    assert {"200", "206", "400", "416"} <= set(paths["/v1/jobs/{job_id}/result"]["get"]["responses"])
    assert "400" in paths["/v1/jobs/{job_id}/events"]["get"]["responses"]
    ranged = paths["/v1/jobs/{job_id}/overlay.mp4"]["get"]["responses"]
    assert PROBLEM in ranged["416"]["content"] and "Content-Range" in ranged["416"]["headers"]


def test_raw_stream_over_the_probe_budget_is_refused(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_PROBE_BUDGET_S="0.05", STEMSEG_RATE_LIMIT_JOBS="0")
    env.start_api()
    raw = tmp_path / "slow.h264"
    make_video(raw, 400, 320, 240, container="h264", content="noise")
    r = _post_video(env, raw)
    assert r.status_code == 413 and "STEMSEG_PROBE_BUDGET_S" in r.json()["detail"], r.text


# --- request heads, ids, event streams -------------------------------------------------------------

def _raw_request(port: int, data: bytes, wait: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait)
        try:
            s.sendall(data)
        except OSError:  # the server answered and closed while we were still sending
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_request_head_size_limit_and_deadline(make_env) -> None:
    env = make_env(STEMSEG_HEADER_TIMEOUT_S="1", STEMSEG_MAX_HEADER_BYTES="16384")
    env.start_api()
    port = int(env.base.rsplit(":", 1)[1])
    done = {}

    def huge() -> None:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 20) + b"\r\n\r\n"
        done["answer"] = _raw_request(port, head)

    t = threading.Thread(target=huge)
    t.start()
    t0 = time.monotonic()
    assert httpx.get(f"{env.base}/healthz", timeout=5).status_code == 200  # the loop is not held
    assert time.monotonic() - t0 < 2
    t.join(60)
    head, _, body = done["answer"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"application/problem+json" in head, done["answer"][:300]
    assert json.loads(body)["status"] == 431 and "STEMSEG_MAX_HEADER_BYTES" in json.loads(body)["detail"]
    ok = _raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"a" * 8000 +
                      b"\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ")
    t0 = time.monotonic()
    slow = _raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    assert slow.startswith(b"HTTP/1.1 408 ") and 0.9 < time.monotonic() - t0 < 5, slow


def test_last_event_id_is_validated(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0")
    env.start_api()
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    job_id = _post_video(env, video).json()["id"]
    url = f"{env.base}/v1/jobs/{job_id}/events"
    for bad in ("9" * 5000, "1" * 21, "1-" + "2" * 21, "18446744073709551616-0", "1-x", "-1", "1-2-3",
                "\u00b9-0", "1 0", "0x10"):
        r = httpx.get(url, headers={"last-event-id": bad.encode("utf-8")}, timeout=10)
        assert r.status_code == 400 and r.headers["content-type"] == PROBLEM, (bad, r.status_code)
        assert "Last-Event-ID" in r.json()["detail"]
    with httpx.stream("GET", url, headers={"last-event-id": "0-0"}, timeout=10) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("id: ")
    _clean_logs(env)


def test_250_event_streams_get_no_false_503(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0", STEMSEG_SSE_KEEPALIVE_S="60")
    env.start_api()
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    job_id = _post_video(env, video).json()["id"]  # no worker: the job stays queued, streams stay open
    statuses: list[int] = []
    opened = asyncio.Event

    async def main() -> None:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        release = opened()
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            async def one() -> None:
                async with client.stream("GET", f"{env.base}/v1/jobs/{job_id}/events") as r:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        await release.wait()

            tasks = [asyncio.create_task(one()) for _ in range(250)]
            deadline = time.monotonic() + 60
            while len(statuses) < 250 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # All open at once: a GET still answers (the request pool is not the streams' pool).
            async with httpx.AsyncClient(timeout=10) as other:
                assert (await other.get(f"{env.base}/v1/jobs/{job_id}")).status_code == 200
            release.set()
            await asyncio.gather(*tasks)

    asyncio.run(main())
    assert statuses.count(200) == 250, sorted(set(statuses))
    _clean_logs(env)


def test_a_full_redis_pool_says_so(tmp_path: Path, redis_prefix: str) -> None:
    from fastapi.testclient import TestClient

    from service.api.main import create_app
    from service.config import Settings
    from service.model.presets import get_preset

    s = Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, data_dir=tmp_path / "d", api_threads=1,
                 redis_pool_margin=1, max_concurrent_probes=1)
    assert s.redis_pool_sizes == (3, 256 + 1)
    app = create_app(s, model_cfg=get_preset("kitti_mots"))
    pool = app.state.services.redis.connection_pool
    held = [pool.get_connection() for _ in range(3)]
    try:
        with TestClient(app) as c:
            r = c.get("/v1/jobs")
        assert r.status_code == 503 and r.headers["retry-after"]
        detail = r.json()["detail"]
        assert "all in use" in detail and "unreachable" not in detail and "STEMSEG_API_THREADS" in detail
    finally:
        for conn in held:
            pool.release(conn)


# --- webhooks -------------------------------------------------------------------------------------

def test_callback_url_with_control_characters_or_other_ports_is_refused(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0", STEMSEG_WEBHOOK_HOSTS="127.0.0.1:9999,localhost")
    env.start_api()
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    for url in ("http://127.0.0.1:9999/x\r\nInjected-Line: yes", "http://127.0.0.1:9999/a b",
                "http://127.0.0.1:9999/\tx", "http://127.0.0.1:6379/", "http://localhost:5432/",
                "http://127.0.0.1/x"):
        r = _post_video(env, video, callback_url=url)
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, (url, r.text)
    assert _post_video(env, video, callback_url="http://127.0.0.1:9999/hook").status_code == 202
    assert _post_video(env, video, callback_url="http://localhost/hook").status_code == 202
    _clean_logs(env)


class _Trickle:
    """Accepts, reads the request, then sends an HTTP answer one byte every `every` seconds."""

    def __init__(self, every: float, answer: bytes) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.every, self.answer = every, answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                for b in self.answer:
                    conn.sendall(bytes([b]))
                    time.sleep(self.every)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def test_webhook_attempt_has_one_deadline_and_records_no_peer_text() -> None:
    trickle = _Trickle(0.2, b"HTTP/1.1 204 No Content\r\nX-Padding: " + b"." * 100 + b"\r\n\r\n")
    garbage = _Trickle(0, b"-ERR unknown command 'POST', with args beginning with: '/x'\r\n")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    records: list[dict] = []
    try:
        notifier = Notifier("", attempts=1, backoff_s=0, timeout_s=1.0)
        t0 = time.monotonic()
        assert notifier.deliver(f"http://127.0.0.1:{trickle.port}/hook", {"id": "x"}, records.append) is False
        assert time.monotonic() - t0 < 2.5  # one byte every 0.2 s would hold a per-read timeout for 25 s
        assert records[-1]["attempts"][0]["error"] == TIMED_OUT
        for port in (garbage.port, closed_port):
            assert notifier.deliver(f"http://127.0.0.1:{port}/x", {"id": "x"}, records.append) is False
            attempt = records[-1]["attempts"][0]
            assert attempt == {"at": attempt["at"], "status": None, "error": CONNECTION_FAILED}, attempt

        def broken_record(state: dict) -> None:
            raise RuntimeError("the job store went away")

        assert Notifier("", attempts=2, backoff_s=0, timeout_s=1.0).deliver(
            f"http://127.0.0.1:{closed_port}/x", {"id": "x"}, broken_record) is False
    finally:
        trickle.close()
        garbage.close()


# --- a DELETE while a task runs ------------------------------------------------------------------

def test_task_of_a_deleted_job_ends_as_done(small_weights: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    from service.jobs.lifecycle import Limits

    with in_process_worker(small_weights, tmp_path / "data", "w-deleted", clips_per_task=2) as w:
        video = tmp_path / "v.mp4"
        make_video(video, 30, 64, 48)
        staging = "upload-" + uuid.uuid4().hex
        w.storage.write(staging, "video", video.read_bytes())
        job_id = w.jobs.admit(staging, "", model=w.engine.cfg, min_dim=None, clips_per_task=2,
                              limits=Limits(10**9, 10**6, 1e9), quota=0, fields={"formats": ["ytvis"]}).id
        real_read = w.storage.read

        def deleted_meanwhile(jid: str, name: str) -> bytes:
            w.jobs.cancel(job_id)  # the DELETE lands as the stitcher reads a clip: record and files go
            return real_read(jid, name)  # FileNotFoundError, naming a path under the data directory

        monkeypatch.setattr(w.storage, "read", deleted_meanwhile)
        caplog.set_level("INFO")
        w.step()
        assert w.jobs.get(job_id) is None
        assert w.r.xpending(w.jobs.keys.tasks, GROUP)["pending"] == 0  # acknowledged, never redelivered
        assert not (tmp_path / "data" / "jobs" / job_id).exists()
        logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
        assert "retried" not in logged and "Traceback" not in logged and str(tmp_path) not in logged, logged


def test_delete_during_a_running_job_real_processes(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0", STEMSEG_CLIPS_PER_TASK="1")
    env.start_api()
    env.start_worker()
    video = tmp_path / "v.mp4"
    make_video(video, 120, 96, 64)
    job_id = _post_video(env, video).json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = httpx.get(f"{env.base}/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["clips_done"] >= 1:
            break
        time.sleep(0.05)
    assert httpx.delete(f"{env.base}/v1/jobs/{job_id}").status_code == 204
    r = redis.Redis.from_url(REDIS_URL)
    from service.jobs.keys import Keys

    tasks = Keys(env.prefix).tasks
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        groups = r.xinfo_groups(tasks) if r.exists(tasks) else []
        if all(g["pending"] == 0 for g in groups):
            break
        time.sleep(0.2)
    time.sleep(1)
    assert all(g["pending"] == 0 for g in (r.xinfo_groups(tasks) if r.exists(tasks) else []))
    r.close()
    text = env.log_text()
    assert "retried" not in text and "FileNotFoundError" not in text, text[-3000:]
    _clean_logs(env)
