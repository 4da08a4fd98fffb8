"""Faults: a Redis outage under real API and worker processes (a private redis-server with
AOF, started here), a full disk on upload, and a client that keeps sending past the limit."""

from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
from redis_cluster import start_server
from service_env import REDIS_URL, ServiceEnv, free_port
from videos import make_video


class PrivateRedis:
    """redis-server on a free port with an append-only file, stoppable and restartable."""

    def __init__(self, workdir: Path) -> None:
        self.dir, self.port = workdir, free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_server(self.port, self.dir / "server.log", "--dir", str(self.dir),
                                 "--appendonly", "yes", "--appendfsync", "always")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (CI starts one; the outage test starts its own)")
    pr = PrivateRedis(tmp_path / "redis")
    pr.start()
    yield pr
    pr.stop()


def _uploads_left(env: ServiceEnv) -> list[str]:
    return [n for n in env.stored_jobs() if n.startswith("upload-")]


@pytest.mark.slow
def test_redis_outage_api_503_worker_survives_job_completes(private_redis: PrivateRedis, tmp_path: Path,
                                                            small_weights: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 45, 64, 48)
    env = ServiceEnv(tmp_path, small_weights, STEMSEG_REDIS_URL=private_redis.url)
    env.redis = redis.Redis.from_url(private_redis.url)
    try:
        env.start_api()
        worker = env.start_worker()
        with video.open("rb") as f:
            r = httpx.post(f"{env.base}/v1/jobs", files={"file": ("v.mp4", f, "video/mp4")}, timeout=60)
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while httpx.get(f"{env.base}/v1/jobs/{job_id}").json()["progress"]["clips_done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        private_redis.stop()  # mid-job

        for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", "/v1/jobs"), ("GET", "/metrics"),
                             ("GET", "/readyz"), ("GET", f"/v1/jobs/{job_id}/events"), ("POST", "/v1/jobs")):
            t0 = time.monotonic()
            kwargs = {"files": {"file": ("v.mp4", video.read_bytes(), "video/mp4")}} if method == "POST" else {}
            r = httpx.request(method, f"{env.base}{path}", timeout=10, **kwargs)
            assert time.monotonic() - t0 < 2, path
            assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json", (path, r.text)
            assert int(r.headers["retry-after"]) > 0
        assert httpx.get(f"{env.base}/healthz").status_code == 200
        assert _uploads_left(env) == []
        time.sleep(4)  # the worker keeps retrying with backoff instead of exiting
        assert worker.poll() is None

        private_redis.start()  # same port, same append-only file
        job = env.wait(job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert worker.poll() is None
        assert job["progress"]["frames_done"] == 45
        metrics = httpx.get(f"{env.base}/metrics").text
        assert 'stemseg_jobs{state="running"} 0.0' in metrics and 'stemseg_jobs{state="queued"} 0.0' in metrics
    finally:
        env.close()


def test_upload_past_the_limit_is_stopped_early_by_a_real_server(tmp_path: Path, small_weights: Path) -> None:
    env = ServiceEnv(tmp_path, small_weights, STEMSEG_MAX_UPLOAD_BYTES="1000000")
    sent = {"n": 0}

    def body():  # chunked (no Content-Length), 200 MB if nobody stops it
        chunk = b"\0" * 65536
        for _ in range(3200):
            sent["n"] += len(chunk)
            yield chunk

    try:
        env.start_api()
        try:
            r = httpx.post(f"{env.base}/v1/jobs", content=body(), headers={"content-type": "video/mp4"}, timeout=30)
            assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server answered and closed while we were still sending
        assert sent["n"] < 40_000_000, sent  # not read to the end (socket buffers hold a few MB)
        assert env.stored_jobs() == []
    finally:
        env.close()


class _FillsUp:
    """A file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()


def _api_client(redis_prefix: str, data_dir: Path, **overrides):
    from fastapi.testclient import TestClient

    from service.api.main import create_app
    from service.config import Settings
    from service.model.presets import get_preset

    s = Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, data_dir=data_dir, rate_limit_jobs=0, **overrides)
    return TestClient(create_app(s, model_cfg=get_preset("kitti_mots")))


def test_full_disk_on_upload_is_507_and_the_partial_file_is_removed(tmp_path: Path, monkeypatch,
                                                                    redis_prefix: str) -> None:
    from service.jobs.storage import LocalStorage

    real_writer = LocalStorage.writer

    @contextlib.contextmanager
    def filling_writer(self, job_id, name):
        with real_writer(self, job_id, name) as f:
            yield _FillsUp(f, 20_000)

    monkeypatch.setattr(LocalStorage, "writer", filling_writer)
    video = tmp_path / "v.mp4"
    make_video(video, 30, 160, 120, content="noise")
    assert video.stat().st_size > 20_000
    data = tmp_path / "data"
    with _api_client(redis_prefix, data) as c:
        for kwargs in ({"files": {"file": ("v.mp4", video.read_bytes(), "video/mp4")}},
                       {"content": video.read_bytes(), "headers": {"content-type": "video/mp4"}}):
            r = c.post("/v1/jobs", **kwargs)
            assert r.status_code == 507 and r.headers["content-type"] == "application/problem+json", r.text
            assert "no space" in r.json()["detail"]
    assert [p for p in (data / "jobs").rglob("*")] == []


def test_full_tmpfs_on_upload_is_507(tmp_path: Path, redis_prefix: str) -> None:
    """The same on a real 1 MiB tmpfs, where the machine lets us mount one (root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); test_full_disk_on_upload covers the same path")
    try:
        with _api_client(redis_prefix, disk, max_upload_bytes=10_000_000) as c:
            r = c.post("/v1/jobs", content=b"\0" * 3_000_000, headers={"content-type": "video/mp4"})
            assert r.status_code == 507 and r.headers["content-type"] == "application/problem+json", r.text
        assert [p for p in (disk / "jobs").rglob("*")] == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_stalled_upload_is_dropped_with_408(tmp_path: Path, small_weights: Path) -> None:
    import socket

    env = ServiceEnv(tmp_path, small_weights, STEMSEG_UPLOAD_IDLE_TIMEOUT_S="1")
    try:
        env.start_api()
        port = int(env.base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000)
            t0 = time.monotonic()
            reply = sock.recv(65536)  # then nothing more: the server must not wait forever
            waited = time.monotonic() - t0
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"application/problem+json" in reply and 0.9 < waited < 5
        assert env.stored_jobs() == []
    finally:
        env.close()


def test_hung_redis_is_503_within_2_s(private_redis: PrivateRedis, tmp_path: Path, small_weights: Path) -> None:
    """Redis accepting connections but not answering (SIGSTOP): still 503 within 2 s."""
    import os
    import signal

    env = ServiceEnv(tmp_path, small_weights, STEMSEG_REDIS_URL=private_redis.url)
    env.redis = redis.Redis.from_url(private_redis.url)
    try:
        env.start_api()
        assert httpx.get(f"{env.base}/v1/jobs").status_code == 200
        os.kill(private_redis.proc.pid, signal.SIGSTOP)
        try:
            for path in (f"/v1/jobs/{'a' * 32}", "/v1/jobs", "/metrics", f"/v1/jobs/{'a' * 32}/events"):
                t0 = time.monotonic()
                r = httpx.get(f"{env.base}{path}", timeout=10)
                assert time.monotonic() - t0 < 2, path
                assert r.status_code == 503 and r.headers["retry-after"], (path, r.text)
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        assert httpx.get(f"{env.base}/v1/jobs").status_code == 200
    finally:
        env.close()
