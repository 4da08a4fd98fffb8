"""API behaviour that needs no worker: bad uploads, problem+json, API keys, listing."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from service_env import REDIS_URL
from videos import make_audio_only, make_video

from service.api.main import create_app
from service.config import Settings
from service.model.presets import get_preset


@pytest.fixture
def settings(tmp_path: Path):
    s = Settings(redis_url=REDIS_URL, redis_prefix=f"stemseg-test-{uuid.uuid4().hex[:8]}",
                 data_dir=tmp_path / "data", max_upload_bytes=200_000)
    yield s
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{s.redis_prefix}:*"))
    if keys:
        r.delete(*keys)


def _client(settings: Settings, **overrides) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=overrides), model_cfg=get_preset("kitti_mots")))


def _assert_problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def _nothing_left(settings: Settings) -> None:
    jobs = settings.data_dir / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir()), list(jobs.rglob("*"))


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.mp4"
    make_video(good, 30, 64, 48)
    files = {
        "random": tmp_path / "random.mp4",
        "truncated": tmp_path / "truncated.mp4",
        "audio": tmp_path / "audio.m4a",
    }
    files["random"].write_bytes(np.random.default_rng(0).bytes(5000))
    data = good.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 3])
    make_audio_only(files["audio"])
    return files


@pytest.mark.parametrize("kind", ["random", "truncated", "audio"])
def test_bad_uploads_are_400_problems_and_leave_nothing(settings, bad_files, kind: str) -> None:
    with _client(settings) as c:
        with bad_files[kind].open("rb") as f:
            r = c.post("/v1/jobs", files={"file": (bad_files[kind].name, f, "video/mp4")})
        _assert_problem(r, 400)
    _nothing_left(settings)


def test_empty_and_oversize_and_wrong_type(settings, tmp_path: Path) -> None:
    with _client(settings) as c:
        _assert_problem(c.post("/v1/jobs", files={"file": ("e.mp4", b"", "video/mp4")}), 422)
        _assert_problem(c.post("/v1/jobs", content=b"x" * 300_000, headers={"content-type": "video/mp4"}), 413)
        _assert_problem(c.post("/v1/jobs", content=b"{}", headers={"content-type": "application/json"}), 415)
        _assert_problem(c.get("/v1/jobs/nope"), 404)
        _assert_problem(c.get("/v1/jobs", params={"limit": 0}), 422)
    _nothing_left(settings)


def test_frame_size_limit(settings, tmp_path: Path) -> None:
    video = tmp_path / "big.mp4"
    make_video(video, 3, 128, 96)
    with _client(settings, max_frame_pixels=64 * 48) as c, video.open("rb") as f:
        _assert_problem(c.post("/v1/jobs", files={"file": ("big.mp4", f, "video/mp4")}), 400)
    _nothing_left(settings)


def test_raw_body_upload_and_api_key_isolation(settings, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    with _client(settings, api_keys="alpha,beta") as c:
        _assert_problem(c.post("/v1/jobs", content=video.read_bytes(), headers={"content-type": "video/mp4"}), 401)
        r = c.post("/v1/jobs", content=video.read_bytes(),
                   headers={"content-type": "video/mp4", "x-api-key": "alpha"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and job["video"]["num_frames"] == 9 and job["progress"]["clips_total"] == 2
        assert c.get(f"/v1/jobs/{job['id']}", headers={"x-api-key": "alpha"}).status_code == 200
        _assert_problem(c.get(f"/v1/jobs/{job['id']}", headers={"authorization": "Bearer beta"}), 404)
        assert c.get("/v1/jobs", headers={"x-api-key": "beta"}).json()["total"] == 0
        assert c.get("/v1/jobs", headers={"x-api-key": "alpha"}).json()["total"] == 1
        _assert_problem(c.get(f"/v1/jobs/{job['id']}/result", headers={"x-api-key": "alpha"}), 409)
        _assert_problem(c.delete(f"/v1/jobs/{job['id']}", headers={"x-api-key": "beta"}), 404)
        assert c.delete(f"/v1/jobs/{job['id']}", headers={"x-api-key": "alpha"}).status_code == 204


def test_health_and_openapi(settings) -> None:
    with _client(settings) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        _assert_problem(c.get("/readyz"), 503)  # no worker heartbeat under this prefix
        spec = c.get("/openapi.json").json()
        paths = spec["paths"]
        for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/events",
                  "/v1/jobs/{job_id}/overlay.mp4", "/healthz", "/readyz", "/metrics"):
            assert p in paths, p
        assert "Job" in spec["components"]["schemas"]
