"""Running the real service for tests: Redis under a private key prefix, API and worker
processes started with `stemseg serve` / `stemseg worker`, cleaned up afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx

REDIS_URL = os.environ.get("STEMSEG_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def new_prefix() -> str:
    """A Redis key prefix no other test uses."""
    return f"stemseg-test-{uuid.uuid4().hex[:8]}"


def drop_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every Redis key under a test's prefix (on a cluster: on every master)."""
    from service.jobs.keys import Keys
    from service.jobs.redis_clients import sync_client

    client = sync_client(url)
    try:
        keys = [k for pattern in Keys(prefix).patterns for k in client.scan_iter(pattern, count=500)]
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceEnv:
    def __init__(self, tmp: Path, weights: Path, **settings: str) -> None:
        from service.jobs.redis_clients import sync_client

        self.prefix = new_prefix()
        self.data = tmp / "data"
        self.redis_url = settings.get("STEMSEG_REDIS_URL", REDIS_URL)
        self.env = {**os.environ, "STEMSEG_REDIS_URL": REDIS_URL, "STEMSEG_REDIS_PREFIX": self.prefix,
                    "STEMSEG_DATA_DIR": str(self.data), "STEMSEG_WEIGHTS": str(weights), "STEMSEG_DEVICE": "cpu",
                    "STEMSEG_VISIBILITY_TIMEOUT_S": "3", "STEMSEG_CLIPS_PER_TASK": "2",
                    "OMP_NUM_THREADS": "1", **settings}
        self.procs: list[subprocess.Popen] = []
        self.tmp = tmp
        self.logs: list[Path] = []  # each process's stdout and stderr, for tests that read the logs
        self.redis = sync_client(self.redis_url)
        self.base = ""

    def start_api(self, **env: str) -> str:
        """Start an API process (`env`: settings of its own); returns its base URL, the latest in `base`."""
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.procs.append(self._spawn("serve", "--port", str(port), env=env))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return self.base
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the API did not come up")

    def start_worker(self, **env: str) -> subprocess.Popen:
        p = self._spawn("worker", env=env)
        self.procs.append(p)
        return p

    def _spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.tmp / f"{args[0]}-{len(self.procs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env={**self.env, **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        """What every process started so far wrote."""
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def wait(self, job_id: str, timeout: float = 180, headers: dict | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = httpx.get(f"{self.base}/v1/jobs/{job_id}", headers=headers or {}).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        drop_prefix(self.prefix, self.redis_url)
        self.redis.close()


@contextmanager
def in_process_worker(weights: Path, data_dir: Path, name: str, redis_url: str = REDIS_URL, **settings: object):
    """A Worker in this process under a private key prefix (small clips per task, no sweeps unless
    asked), initialised, and its keys deleted afterwards."""
    from service.config import Settings
    from service.jobs.worker import Worker

    options: dict[str, object] = {"visibility_timeout_s": 3, "clips_per_task": 2, "sweep_interval_s": 3600,
                                  **settings}
    s = Settings(redis_url=redis_url, redis_prefix=new_prefix(), data_dir=data_dir, weights=weights, device="cpu",
                 **options)
    w = Worker(s, name=name)
    w.initialize()
    try:
        yield w
    finally:
        w.finalize()
        drop_prefix(s.redis_prefix, redis_url)
