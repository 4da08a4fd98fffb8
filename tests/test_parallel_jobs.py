"""One job's outputs written by output tasks on several workers: a worker killed with SIGKILL
in the middle of rendering loses nothing (its task is redelivered), the tracks are announced
only with the job's success, and every output equals `stemseg segment`'s."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from service_env import REDIS_URL, ServiceEnv
from videos import make_video

from service.jobs.keys import Keys
from service.jobs.lease import Lease
from service.outputs.names import NAMES, davis_frame


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(video=0)]


def _held_output_task(r: redis.Redis, prefix: str) -> tuple[str, tuple[int, int]] | None:
    """The consumer holding an output task right now and the task's frames, if any."""
    stream = Keys(prefix).tasks
    if not r.exists(stream):
        return None
    for p in r.xpending_range(stream, "workers", "-", "+", 100):
        entry = r.xrange(stream, p["message_id"], p["message_id"])
        if entry and entry[0][1].get(b"kind") == b"outputs":
            return p["consumer"].decode(), (int(entry[0][1][b"start"]), int(entry[0][1][b"stop"]))
    return None


@pytest.mark.slow
def test_worker_killed_mid_render_loses_nothing_and_outputs_equal_segment(tmp_path: Path, small_weights: Path) -> None:
    weights = small_weights
    n, per_task = 40, 10
    video = tmp_path / "v.mp4"
    make_video(video, n, 320, 240)
    env = ServiceEnv(tmp_path, weights, STEMSEG_RENDER_FRAMES_PER_TASK=str(per_task))
    try:
        env.start_api()
        workers = {p.pid: p for p in (env.start_worker(), env.start_worker())}
        with video.open("rb") as f:
            r = httpx.post(f"{env.base}/v1/jobs", files={"file": ("v.mp4", f, "video/mp4")},
                           params={"formats": "ytvis,davis,mots,overlay"}, timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while (held := _held_output_task(env.redis, env.prefix)) is None:
            assert time.monotonic() < deadline, "no output task was ever taken"
            time.sleep(0.005)
        holder, lost = held
        victim = int(holder.rsplit("-", 1)[1])
        assert victim in workers
        os.kill(victim, signal.SIGKILL)  # in the middle of its range
        workers[victim].wait(10)
        job = env.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", job

        timeline = [json.loads(e) for e in env.redis.lrange(Keys(env.prefix).timeline(job_id), 0, -1)]
        outputs = [e for e in timeline if e["kind"] == "outputs"]
        spans = [(a, min(a + per_task, n)) for a in range(0, n, per_task)]
        done = sorted((e["start"], e["stop"]) for e in outputs)
        # The killed worker's range was rendered again by the other worker (a redelivery); only if
        # it had written the range's last file before the kill is there nothing to redo.
        assert done == spans or (done == [s for s in spans if s != lost]), (done, lost)
        assert all(e["deliveries"] >= 2 for e in outputs if (e["start"], e["stop"]) == lost)
        assert sum(e["kind"] == "finish" for e in timeline) == 1

        # Tracks are announced after the success, in the same step, and only once.
        events = [(e[1][b"type"], json.loads(e[1][b"data"])) for e in
                  env.redis.xrange(Keys(env.prefix).events(job_id))]
        kinds = [k for k, _ in events]
        end = kinds.index(b"status", max(i for i, k in enumerate(kinds) if k == b"frame"))
        assert events[end][1]["status"] == "succeeded"
        assert kinds[end + 1:] == [b"track"] * job["tracks"] and job["tracks"] > 0

        stored = env.stored(job_id)  # from the directory or the bucket (STEMSEG_TEST_STORAGE)
        assert not any(n.startswith("render/") for n in stored)  # the parts are gone
        out = tmp_path / "served"
        for name, data in stored.items():
            if name.startswith("out/"):
                (out / name[4:]).parent.mkdir(parents=True, exist_ok=True)
                (out / name[4:]).write_bytes(data)
        cli = tmp_path / "cli"
        from service.cli import main
        assert main(["segment", str(video), "--weights", str(weights), "--out", str(cli), "--device", "cpu",
                     "--no-progress"]) == 0
        for fmt in ("ytvis", "mots"):  # every track, score and RLE
            assert (out / NAMES[fmt]).read_bytes() == (cli / NAMES[fmt]).read_bytes(), fmt
        for f in range(n):
            assert np.array_equal(np.asarray(Image.open(out / "davis" / davis_frame(f))),
                                  np.asarray(Image.open(cli / "davis" / davis_frame(f))))
        service_overlay, cli_overlay = _frames(out / NAMES["overlay"]), _frames(cli / NAMES["overlay"])
        assert len(service_overlay) == len(cli_overlay) == n
        for a, b in zip(service_overlay, cli_overlay):  # the same drawing, cut into other segments
            assert np.abs(a - b).mean() < 4
        manifest = json.loads((out / "stemseg-output.json").read_text())
        assert len([f for f in manifest["files"] if f.startswith("davis/")]) == n
    finally:
        env.close()


def test_lease_is_renewed_while_held_and_fenced() -> None:
    r = redis.Redis.from_url(REDIS_URL)
    key = f"stemseg-test-lease-{os.getpid()}-{time.monotonic_ns()}"
    try:
        a = Lease(r, key, ttl_s=0.3)
        assert a.acquire()
        time.sleep(1.0)  # three TTLs: only the renewals keep it
        assert a.held and not Lease(r, key, ttl_s=0.3).acquire()
        r.set(key, "a stalled holder's successor")  # as if it had lapsed and been taken
        time.sleep(0.3)
        assert not a.held  # the renewal saw the token change and stopped
        a.release()
        assert r.get(key) == b"a stalled holder's successor"  # release never frees someone else's lease
    finally:
        r.delete(key)
        r.close()
