"""Smoke test of the real compose stack (run by deploy/smoke.sh, which builds the bases and podman-compose).

Builds the API image (which is also the CPU worker's), brings up docker-compose.yml's `cpu` profile (redis,
api, worker-cpu) with podman-compose, waits until every container's own healthcheck passes, makes a video
with `stemseg synth`, uploads it, restarts the worker container while the job runs, fetches the result and
checks it equals `stemseg segment` on the same video with the same weights (run in the same image), then
`down -v`. A second upload has its worker process killed with SIGKILL mid-task: the restart policy
brings the container back, the unacknowledged task is redelivered after the visibility timeout, and the
result is again the CLI's. Standard library only; every step prints its wall time. Exit 0 only if every
check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "stemseg-smoke"
SERVICES = ("redis", "api", "worker-cpu")
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def run(*cmd: str, check: bool = True, capture: bool = False, env: dict | None = None,
        timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, timeout=timeout, env=env, cwd=ROOT,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)


class Failure(Exception):
    pass


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise Failure(msg)
    log(f"ok: {msg}")


# --------------------------------------------------------------------------- images and stack


def build_api_image(image: str, base: str, wheels: str | None, ca: str | None) -> None:
    """podman build with the local base; the layer cache makes a rebuild with unchanged sources seconds."""
    cmd = ["podman", "build", "-f", "docker/api.Dockerfile", "-t", image, "--build-arg", f"BASE_IMAGE={base}"]
    if wheels:  # torch's CPU wheel from a local directory, the rest from PyPI
        cmd += ["--volume", f"{wheels}:/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/wheels",
                "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"]
    if ca:  # a TLS-intercepting proxy's CA bundle, for pip
        cmd += ["--volume", f"{ca}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    out = run(*cmd, ".", capture=True)
    steps = [ln for ln in out.stdout.splitlines() if ln.startswith("STEP ") or "Using cache" in ln]
    cached = sum("Using cache" in ln for ln in steps)
    log(f"built {image} ({cached} cached layers)")


def compose(pc: str, env: dict, *args: str, capture: bool = False, check: bool = True):
    return run(pc, "-p", PROJECT, "--profile", "cpu", *args, env=env, capture=capture, check=check)


def container(service: str) -> str:
    out = run("podman", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
              "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}",
              capture=True).stdout.split()
    if len(out) != 1:
        raise Failure(f"expected one container of {service}, found {out}")
    return out[0]


def wait_healthy(service: str, timeout: float) -> None:
    """Run the container's configured healthcheck until it passes (podman runs healthchecks from systemd
    timers, absent here, and podman-compose < podman 4.6 ignores `condition: service_healthy`)."""
    name, deadline, last = container(service), time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        proc = run("podman", "healthcheck", "run", name, check=False, capture=True)
        if proc.returncode == 0:
            log(f"{service}: healthcheck passes")
            return
        last = proc.stdout.strip()
        time.sleep(2)
    logs = run("podman", "logs", "--tail", "30", name, check=False, capture=True).stdout
    raise Failure(f"{service} not healthy after {timeout:.0f}s ({last}); its log:\n{logs}")


# --------------------------------------------------------------------------- HTTP


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def upload(base: str, video: Path, formats: str) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{video.name}\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode() + video.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, data, _ = http("POST", f"{base}/v1/jobs?formats={formats}", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if status != 202:
        raise Failure(f"upload: {status} {data[:500]!r}")
    return json.loads(data)


def get_job(base: str, job_id: str) -> dict:
    status, data, _ = http("GET", f"{base}/v1/jobs/{job_id}")
    if status != 200:
        raise Failure(f"GET job: {status} {data[:500]!r}")
    return json.loads(data)


def wait_job(base: str, job_id: str, timeout: float, until=lambda j: j["status"] not in ("queued", "running")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(base, job_id)
        if until(job):
            return job
        time.sleep(0.5)
    raise Failure(f"job {job_id} still {job['status']} after {timeout:.0f}s: {job['progress']}")


# --------------------------------------------------------------------------- the test


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--podman-compose", default=shutil.which("podman-compose") or "podman-compose")
    ap.add_argument("--python-base", default="localhost/stemseg-base/python:3.11-bookworm")
    ap.add_argument("--redis-image", default="localhost/stemseg-base/redis:7-bookworm")
    ap.add_argument("--image", default="localhost/stemseg-serve-api:smoke")
    ap.add_argument("--wheels", help="directory with torch's CPU wheel (when download.pytorch.org is unreachable)")
    ap.add_argument("--ca-bundle", help="CA bundle for pip inside the build (TLS-intercepting proxy)")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--frames", type=int, default=96, help="frames of the test video")
    ap.add_argument("--size", default="128x160")
    ap.add_argument("--keep", action="store_true", help="leave the stack up (no `down -v`) for a look")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stemseg-smoke-"))
    work.chmod(0o777)  # the containers write here as uid 10001
    build_api_image(a.image, a.python_base, a.wheels, a.ca_bundle)

    # What compose interpolates: local images; a host STEMSEG_WEIGHTS that must *not* reach the containers.
    bogus_host_weights = "/nonexistent/host/path/youtube_vis.pth"
    env = {**os.environ, "STEMSEG_API_IMAGE": a.image, "STEMSEG_REDIS_IMAGE": a.redis_image,
           "STEMSEG_PYTHON_IMAGE": a.python_base, "STEMSEG_PORT": str(a.port), "STEMSEG_WEIGHTS": bogus_host_weights}
    env.pop("STEMSEG_WEIGHTS_NAME", None)
    base = f"http://127.0.0.1:{a.port}"
    compose(a.podman_compose, env, "down", "-v", check=False, capture=True)  # leftovers of an aborted run
    try:
        t = time.monotonic()
        compose(a.podman_compose, env, "up", "-d", *SERVICES, capture=True)
        log(f"compose up ({time.monotonic() - t:.1f}s)")
        expect(not run("podman", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                       "--filter", "label=com.docker.compose.service=worker", "--format", "{{.Names}}",
                       capture=True).stdout.strip(), "no GPU worker container was created")
        t = time.monotonic()
        for svc in SERVICES:
            wait_healthy(svc, 240)
        log(f"all healthy ({time.monotonic() - t:.1f}s)")
        deadline = time.monotonic() + 120
        while (ready := http("GET", f"{base}/readyz"))[0] != 200 and time.monotonic() < deadline:
            time.sleep(1)
        expect(ready[0] == 200 and json.loads(ready[1])["workers"] == 1, f"/readyz: {ready[0]} {ready[1]!r}")

        api, worker = container("api"), container("worker-cpu")
        for name in (api, worker):
            got = run("podman", "exec", name, "sh", "-c", 'echo "$(id -u) $STEMSEG_WEIGHTS $(stat -c %u /data)"',
                      capture=True).stdout.split()
            expect(got == ["10001", "/weights/lite.safetensors", "10001"],
                   f"{name}: runs as uid 10001, weights by in-container path (host STEMSEG_WEIGHTS ignored), "
                   f"/data writable ({got})")

            ro = run("podman", "exec", name, "sh", "-c", "touch /opt/venv/x", check=False, capture=True)
            expect(ro.returncode != 0 and "Read-only file system" in ro.stdout, f"{name}: root filesystem read-only")

        # The video and the reference, both in the image: same libraries, same weights file.
        t = time.monotonic()
        run("podman", "run", "--rm", "-v", f"{work}:/work", a.image, "stemseg", "synth", "--out", "/work/synth",
            "--videos", "1", "--seed", "3", "--frames", str(a.frames), "--size", a.size, capture=True)
        video = next((work / "synth" / "videos").glob("*.mp4"))
        log(f"video {video.name}: {a.frames} frames {a.size}, {video.stat().st_size} bytes "
            f"({time.monotonic() - t:.1f}s)")

        t = time.monotonic()
        job = upload(base, video, "ytvis")
        log(f"uploaded: job {job['id']} {job['status']} {job['progress']}")
        clips = job["progress"]["clips_total"]
        expect(clips > 8, f"the job has several tasks ({clips} clips)")
        started_before = run("podman", "inspect", "-f", "{{.State.StartedAt}}", worker, capture=True).stdout.strip()
        job = wait_job(base, job["id"], 600, until=lambda j: j["progress"]["clips_done"] > 0 or
                       j["status"] not in ("queued", "running"))
        expect(job["status"] == "running" and job["progress"]["clips_done"] < job["progress"]["clips_total"],
               f"job running when the worker is restarted: {job['progress']}")
        tr = time.monotonic()
        run("podman", "restart", "--time", "120", worker, capture=True)
        started_after = run("podman", "inspect", "-f", "{{.State.StartedAt}}", worker, capture=True).stdout.strip()
        expect(started_after != started_before,
               f"worker container restarted mid-job ({time.monotonic() - tr:.1f}s to stop and start)")
        at_restart = get_job(base, job["id"])["progress"]
        log(f"progress after the restart: {at_restart}")
        job = wait_job(base, job["id"], 900)
        expect(job["status"] == "succeeded", f"job {job['status']}{': ' + job['error'] if job.get('error') else ''} in "
               f"{time.monotonic() - t:.1f}s from upload")
        status, data, _ = http("GET", f"{base}/v1/jobs/{job['id']}/result")
        expect(status == 200, f"GET result: {status}")
        tracks = json.loads(data)["tracks"]

        t = time.monotonic()
        run("podman", "run", "--rm", "-v", f"{work}:/work", "-v", f"{ROOT / 'weights'}:/weights:ro", a.image,
            "stemseg", "segment", f"/work/synth/videos/{video.name}", "--weights", "/weights/lite.safetensors",
            "--out", "/work/cli", "--format", "ytvis", "--device", "cpu", "--no-progress", capture=True)
        cli = json.loads((work / "cli" / "results.json").read_text())
        log(f"stemseg segment in the image: {len(cli)} tracks ({time.monotonic() - t:.1f}s)")
        expect(len(tracks) > 0 and len(tracks) == len(cli),
               f"{len(tracks)} tracks from the service, {len(cli)} from the CLI")
        expect([(x["category_id"], x["segmentations"]) for x in tracks]
               == [(c["category_id"], c["segmentations"]) for c in cli],
               "service result == `stemseg segment` (categories and every frame's RLE)")
        expect(all(abs(x["score"] - c["score"]) <= 1e-6 for x, c in zip(tracks, cli, strict=True)),
               "scores equal within 1e-6")

        # A crash rather than a stop: SIGKILL to the worker process mid-task. The container's restart policy
        # brings it back and the task it held, unacknowledged, is taken over after the visibility timeout.
        t = time.monotonic()
        job = upload(base, video, "ytvis")
        job = wait_job(base, job["id"], 600, until=lambda j: j["progress"]["clips_done"] > 0 or
                       j["status"] not in ("queued", "running"))
        expect(job["status"] == "running" and job["progress"]["clips_done"] < job["progress"]["clips_total"],
               f"second job running when the worker is killed: {job['progress']}")
        restarts = int(run("podman", "inspect", "-f", "{{.RestartCount}}", worker, capture=True).stdout.strip() or 0)
        init_pid = run("podman", "inspect", "-f", "{{.State.Pid}}", worker, capture=True).stdout.strip()
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
        expect(len(children) == 1, f"one worker process under the container's init (pid {init_pid}): {children}")
        run("kill", "-KILL", children[0])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = run("podman", "inspect", "-f", "{{.State.Status}} {{.RestartCount}}", worker,
                        capture=True).stdout.split()
            if state[0] == "running" and int(state[1]) > restarts:
                break
            time.sleep(1)
        expect(state[0] == "running" and int(state[1]) > restarts,
               f"restart policy brought the killed worker back (restart count {state[1]})")
        job = wait_job(base, job["id"], 900)
        expect(job["status"] == "succeeded", f"job after kill -9: {job['status']}"
               f"{': ' + job['error'] if job.get('error') else ''} in "
               f"{time.monotonic() - t:.1f}s from upload")
        status, data, _ = http("GET", f"{base}/v1/jobs/{job['id']}/result")
        again = json.loads(data)["tracks"] if status == 200 else []
        expect([(x["category_id"], x["segmentations"]) for x in again]
               == [(c["category_id"], c["segmentations"]) for c in cli],
               "result after kill -9 == `stemseg segment` too")
    except (Failure, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stdout", None) or ""
        log(f"FAILED: {e}\n{detail}")
        for svc in SERVICES:
            try:
                name = container(svc)
            except Failure:
                continue
            print(f"--- {name} (last 40 lines)\n" + run("podman", "logs", "--tail", "40", name, check=False,
                                                        capture=True).stdout, flush=True)
        return 1
    finally:
        if not a.keep:
            compose(a.podman_compose, env, "down", "-v", check=False, capture=True)
            left = run("podman", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                       capture=True).stdout.split()
            log(f"compose down -v: {'volumes left: ' + ' '.join(left) if left else 'containers and volumes removed'}")
        shutil.rmtree(work, ignore_errors=True)
    log("SMOKE TEST PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
