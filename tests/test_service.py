"""The service end to end against the real Redis: HTTP API and worker processes."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from service_env import ServiceEnv
from videos import make_video

from service.jobs.keys import Keys


@pytest.fixture
def env(tmp_path: Path, small_weights: Path):
    e = ServiceEnv(tmp_path, small_weights)
    yield e
    e.close()


def _upload(env: ServiceEnv, path: Path, headers: dict | None = None, **params) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(f"{env.base}/v1/jobs", files={"file": (path.name, f, "video/mp4")},
                          params=params, headers=headers or {}, timeout=60)


def _tracks(env: ServiceEnv, job_id: str, headers: dict | None = None) -> list[dict]:
    r = httpx.get(f"{env.base}/v1/jobs/{job_id}/result", headers=headers or {}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tracks"]


def _check_ranges(url: str, whole: bytes) -> None:
    """RFC 9110 ranges: a byte range is 206, an unknown unit is ignored (200, the whole file),
    a malformed or unsatisfiable one is problem+json (400, 416 with Content-Range)."""
    part = httpx.get(url, headers={"range": "bytes=4-11"})
    assert part.status_code == 206 and part.content == whole[4:12]
    assert part.headers["content-range"] == f"bytes 4-11/{len(whole)}"
    for unit in ("items=0-3", "frames=1-2", "x"):
        r = httpx.get(url, headers={"range": unit})
        assert r.status_code == 200 and r.content == whole, unit
    for bad in ("bytes=abc", "bytes=5-2", "bytes="):
        r = httpx.get(url, headers={"range": bad})
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", (bad, r.text)
    r = httpx.get(url, headers={"range": f"bytes={len(whole) + 10}-"})
    assert r.status_code == 416 and r.headers["content-type"] == "application/problem+json"
    assert r.headers["content-range"] == f"bytes */{len(whole)}"


def test_upload_poll_result_and_cli_agree(env: ServiceEnv, tmp_path: Path, small_weights: Path) -> None:
    video = tmp_path / "clip.mp4"
    make_video(video, 21, 64, 48)
    env.start_api()
    env.start_worker()
    r = _upload(env, video, formats="ytvis,davis,mots,overlay")
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    job = env.wait(job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"]["frames_done"] == job["progress"]["frames_total"] == 21
    tracks = _tracks(env, job_id)
    assert tracks and all(len(t["segmentations"]) == 21 and len(t["boxes"]) == 21 for t in tracks)

    # The same video through `stemseg segment` gives the same tracks.
    out = tmp_path / "cli"
    from service.cli import main
    assert main(["segment", str(video), "--weights", str(small_weights), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    cli = json.loads((out / "results.json").read_text())
    assert [(t["category_id"], t["segmentations"]) for t in tracks] == [
        (c["category_id"], c["segmentations"]) for c in cli]

    davis = httpx.get(f"{env.base}/v1/jobs/{job_id}/result", params={"format": "davis"})
    assert davis.headers["content-type"] == "application/zip"
    mots = httpx.get(f"{env.base}/v1/jobs/{job_id}/result", params={"format": "mots"})
    assert mots.status_code == 200 and mots.text.strip()
    overlay = httpx.get(f"{env.base}/v1/jobs/{job_id}/overlay.mp4")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "video/mp4"
    _check_ranges(f"{env.base}/v1/jobs/{job_id}/overlay.mp4", overlay.content)

    events = httpx.get(f"{env.base}/v1/jobs/{job_id}/events", timeout=30).text
    assert "event: frame" in events and "event: end" in events
    ready = httpx.get(f"{env.base}/readyz").json()
    assert ready["workers"] >= 1
    metrics = httpx.get(f"{env.base}/metrics").text
    assert 'stemseg_jobs{state="succeeded"} 1.0' in metrics and "stemseg_queue_depth" in metrics


@pytest.mark.slow
def test_worker_killed_mid_clip_job_still_succeeds_with_same_tracks(env: ServiceEnv, tmp_path: Path) -> None:
    video = tmp_path / "long.mp4"
    make_video(video, 45, 64, 48)
    env.start_api()
    undisturbed_worker = env.start_worker()
    first = env.wait(_upload(env, video).json()["id"])
    assert first["status"] == "succeeded"
    expected = _tracks(env, first["id"])
    undisturbed_worker.terminate()
    undisturbed_worker.wait(30)

    victim = env.start_worker()
    job_id = _upload(env, video).json()["id"]
    deadline = time.monotonic() + 120
    while httpx.get(f"{env.base}/v1/jobs/{job_id}").json()["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    env.start_worker()  # a restarted worker takes the orphaned task after the visibility timeout
    job = env.wait(job_id)
    assert job["status"] == "succeeded", job
    assert _tracks(env, job_id) == expected


def test_cancel_deletes_job_and_files(env: ServiceEnv, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 13, 64, 48)
    env.start_api()
    job_id = _upload(env, video).json()["id"]  # no worker: stays queued
    assert "video" in env.stored(job_id)
    assert httpx.delete(f"{env.base}/v1/jobs/{job_id}").status_code == 204
    assert httpx.get(f"{env.base}/v1/jobs/{job_id}").status_code == 404
    assert env.stored(job_id) == {}
    keys = Keys(env.prefix)
    assert env.redis.xlen(keys.tasks) > 0  # the cancelled job's tasks are still queued
    env.start_worker()
    deadline = time.monotonic() + 120
    while env.redis.xlen(keys.tasks):  # the worker takes each, finds the job gone, acknowledges it
        assert time.monotonic() < deadline, "the worker never took the cancelled job's tasks"
        time.sleep(0.1)
    # Skipped, not resurrected: no record, no files.
    assert httpx.get(f"{env.base}/v1/jobs/{job_id}").status_code == 404
    assert not env.redis.exists(keys.job(job_id))
    assert not (env.data / "jobs" / job_id).exists()


@pytest.mark.slow
def test_twenty_concurrent_uploads(env: ServiceEnv, tmp_path: Path) -> None:
    video = tmp_path / "short.mp4"
    make_video(video, 9, 64, 48)
    env.start_api()
    env.start_worker()
    env.start_worker()
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: _upload(env, video, formats="ytvis"), range(20)))
    assert [r.status_code for r in responses] == [202] * 20
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 20
    results = [env.wait(i, timeout=300) for i in ids]
    assert all(j["status"] == "succeeded" for j in results)
    listing = httpx.get(f"{env.base}/v1/jobs", params={"limit": 100}).json()
    assert listing["total"] == 20
