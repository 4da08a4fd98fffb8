"""One job on 1 worker and on N workers over a real Redis: wall time, the ratio, and where the time went.

    python bench/workers.py VIDEO [--workers 2] [--threads 1] [--formats ytvis,davis,mots,overlay] [--json out.json]

Each run starts its worker processes (`stemseg worker`, OMP_NUM_THREADS=--threads each) under a
private key prefix and data directory, waits until every worker has loaded its model and beats,
then admits the video as the API does (Jobs.admit) and times it from admission to `succeeded`.
The report (JSON on stdout) gives per run: the wall time, when the last clip was stitched and
the tail after it (the finishing share of the job), the stages summed over tasks (queue wait,
decode, network, clustering, post-processing, clip writes, stitching, rendering, finishing),
and the job's timeline (one entry per task); then the speed-up and whether both runs wrote
byte-identical results.json, mots.txt and DAVIS PNGs (they must).
Redis: STEMSEG_REDIS_URL (default redis://127.0.0.1:6379/0); the keys are deleted afterwards.
With --storage-url s3://BUCKET/PREFIX (and STEMSEG_S3_ENDPOINT_URL, AWS_* in the environment) the
job lives in that object store and every worker has a data directory and TMPDIR of its own (no
shared disk); each run then also reports the bytes every worker read from the store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.config import Settings, get_settings
from service.jobs.keys import Keys
from service.jobs.lifecycle import Jobs, Limits
from service.jobs.model_info import served_model
from service.jobs.redis_clients import sync_client
from service.jobs.storage import open_storage
from service.outputs.names import NAMES

NETWORK = ("preprocess", "backbone", "heads")


def _worker_env(base: dict, redis_url: str, prefix: str, data: Path, threads: int, extra: dict) -> dict:
    env = {**base, "STEMSEG_REDIS_URL": redis_url, "STEMSEG_REDIS_PREFIX": prefix, "STEMSEG_DATA_DIR": str(data),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT),
           "STEMSEG_SWEEP_INTERVAL_S": "3600", **extra}
    return env


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for name in (NAMES["ytvis"], NAMES["mots"]):
        if (out / name).is_file():
            h.update((out / name).read_bytes())
    davis = out / NAMES["davis"]
    if davis.is_dir():
        for p in sorted(davis.iterdir()):
            h.update(p.read_bytes())
    return h.hexdigest()


def summarise(timeline: list[dict], created: float, finished: float) -> dict:
    stages: dict[str, float] = {}
    waits = {"clips": [], "outputs": []}
    for e in timeline:
        if e["kind"] in waits:
            waits[e["kind"]].append(e["taken"] - e["queued"])
            for k, v in e.get("seconds", {}).items():
                name = "network" if k in NETWORK else k
                stages[name] = stages.get(name, 0.0) + v
    stitched = max((e["end"] for e in timeline if e["kind"] == "stitched"), default=None)
    first_output = min((e["taken"] for e in timeline if e["kind"] == "outputs"), default=None)
    finish = [e for e in timeline if e["kind"] == "finish"]
    wall = finished - created
    return {
        "wall_s": round(wall, 3),
        "last_clip_stitched_s": round(stitched - created, 3) if stitched else None,
        "after_last_clip_s": round(finished - stitched, 3) if stitched else None,
        "after_last_clip_share": round((finished - stitched) / wall, 4) if stitched and wall else None,
        "first_output_task_s": round(first_output - created, 3) if first_output else None,
        "finish_step_s": round(finish[-1]["end"] - finish[-1]["start"], 3) if finish else None,
        "tasks": {k: len(v) for k, v in waits.items()},
        "queue_wait_s": {k: {"sum": round(sum(v), 3), "max": round(max(v), 3) if v else 0.0} for k, v in waits.items()},
        "stage_seconds_summed_over_tasks": {k: round(v, 3) for k, v in sorted(stages.items())},
    }


def run_one(video: Path, workers: int, args: argparse.Namespace, settings: Settings) -> dict:
    prefix = f"stemseg-bench-{uuid.uuid4().hex[:8]}"
    r = sync_client(args.redis_url)
    with tempfile.TemporaryDirectory(prefix="stemseg-workers-") as tmp:
        data = Path(tmp) / "data"
        extra = {"STEMSEG_CLIPS_PER_TASK": str(args.clips_per_task),
                 "STEMSEG_RENDER_FRAMES_PER_TASK": str(args.render_frames)}
        if args.storage_url:
            extra["STEMSEG_STORAGE_URL"] = args.storage_url
        env = _worker_env(dict(os.environ), args.redis_url, prefix, data, args.threads, extra)
        procs = []
        for k in range(workers):
            own = {}
            if args.storage_url:  # nothing shared but Redis and the store
                own = {"STEMSEG_DATA_DIR": str(Path(tmp) / f"w{k}" / "data"), "TMPDIR": str(Path(tmp) / f"w{k}")}
                Path(own["STEMSEG_DATA_DIR"]).mkdir(parents=True)
            procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env={**env, **own},
                                          stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL if not args.verbose else None))
        try:
            deadline = time.monotonic() + 300
            while sum(1 for _ in r.scan_iter(Keys(prefix).workers_pattern)) < workers:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("the workers did not come up (run with --verbose to see why)")
                time.sleep(0.2)
            ws = env_settings(env)
            storage = open_storage(ws)
            jobs = Jobs(r, prefix, 3600, storage)
            staging = "upload-" + uuid.uuid4().hex
            storage.write(staging, "video", video.read_bytes())
            cfg = served_model(ws.weights_path, ws.preset)
            job = jobs.admit(staging, "", model=cfg, min_dim=None, clips_per_task=args.clips_per_task,
                             limits=Limits(10**12, 10**9, 1e12), quota=0,
                             fields={"formats": args.formats.split(","), "filename": video.name})
            job_id = job.id
            while True:
                state = jobs.get(job_id)
                if state.final:
                    break
                time.sleep(0.1)
            if state.status != "succeeded":
                raise RuntimeError(f"the job ended {state.status}: {state.error}")
            timeline = jobs.timeline(job_id)
            with storage.fetch(job_id, "out") as out:
                digest = _digest(out)
            report = {"workers": workers, "frames": state.num_frames,
                      "size": f"{state.width}x{state.height}", "tracks": state.tracks,
                      **summarise(timeline, state.created_at, state.finished_at), "outputs_sha256": digest}
            if args.storage_url:
                size = video.stat().st_size
                read: dict[str, dict[str, int]] = {}
                for e in timeline:
                    if "worker" in e:
                        w = read.setdefault(e["worker"], {"store_bytes_read": 0, "video_bytes_fetched": 0})
                        for k in w:
                            w[k] += e.get(k, 0)
                report["video_bytes"] = size
                report["read_per_worker"] = {
                    name: {**w, "video_fetched_over_size": round(w["video_bytes_fetched"] / size, 3)}
                    for name, w in sorted(read.items())}
            if args.timeline:
                report["timeline"] = jobs.timeline(job_id)
            return report
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
            keys = [k for pattern in Keys(prefix).patterns for k in r.scan_iter(pattern)]
            if keys:
                r.delete(*keys)


def env_settings(env: dict) -> Settings:
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("video", type=Path)
    p.add_argument("--workers", type=int, default=2, help="N (compared with 1)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each worker")
    p.add_argument("--formats", default="ytvis,davis,mots,overlay")
    p.add_argument("--clips-per-task", type=int, default=8)
    p.add_argument("--render-frames", type=int, default=get_settings().render_frames_per_task)
    p.add_argument("--redis-url", default=os.environ.get("STEMSEG_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--timeline", action="store_true", help="include every task's entry")
    p.add_argument("--storage-url", default="", help="s3://BUCKET/PREFIX: the job in an object store, no shared disk")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--verbose", action="store_true", help="show the workers' logs")
    args = p.parse_args(argv)
    settings = get_settings()
    runs = [run_one(args.video, 1, args, settings), run_one(args.video, args.workers, args, settings)]
    report = {"video": str(args.video), "formats": args.formats, "threads_per_worker": args.threads,
              "cpus": os.cpu_count(), "runs": runs,
              "speedup": round(runs[0]["wall_s"] / runs[1]["wall_s"], 3),
              "outputs_identical": runs[0]["outputs_sha256"] == runs[1]["outputs_sha256"]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
