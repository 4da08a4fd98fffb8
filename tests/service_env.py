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
# "s3": every ServiceEnv keeps its jobs in a bucket of its own on one SeaweedFS started for the run,
# so the service tests run on the object store unchanged (README, Tests); "local": a directory.
TEST_STORAGE = os.environ.get("STEMSEG_TEST_STORAGE", "local")
_S3: list = []


def storage_settings() -> dict[str, str]:
    """The settings that choose the store STEMSEG_TEST_STORAGE names: none for a directory; for
    "s3", a new bucket on the run's SeaweedFS (started at first use, stopped at exit)."""
    if TEST_STORAGE == "local":
        return {}
    if TEST_STORAGE != "s3":
        raise ValueError(f"STEMSEG_TEST_STORAGE={TEST_STORAGE!r}: choose local or s3")
    if not _S3:
        import atexit
        import tempfile

        from s3_server import S3Server

        _S3.append(S3Server(Path(tempfile.mkdtemp(prefix="stemseg-test-s3-"))))
        atexit.register(_S3[0].close)
    bucket = f"env-{uuid.uuid4().hex[:12]}"
    _S3[0].client().create_bucket(Bucket=bucket)
    return {"STEMSEG_STORAGE_URL": f"s3://{bucket}/t", **_S3[0].env()}


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

        if "STEMSEG_STORAGE_URL" not in settings and "STEMSEG_S3_ENDPOINT_URL" not in settings:
            settings = {**storage_settings(), **settings}  # a test with an S3 server of its own keeps a directory
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

    def _bucket(self):
        """The boto3 client, bucket and key prefix of STEMSEG_STORAGE_URL (None without one)."""
        url = self.env.get("STEMSEG_STORAGE_URL")
        if not url:
            return None
        import boto3

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        client = boto3.client("s3", endpoint_url=self.env["STEMSEG_S3_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])
        return client, bucket, f"{prefix.strip('/')}/jobs/".lstrip("/")

    def stored_jobs(self) -> list[str]:
        """The names the store holds files under (job ids, "upload-..." for uploads being
        received), from the data directory or the bucket of STEMSEG_STORAGE_URL."""
        bucket = self._bucket()
        if bucket is None:
            root = self.data / "jobs"
            return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        client, name, under = bucket
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=under, Delimiter="/")
        return sorted(c["Prefix"][len(under):].rstrip("/") for page in pages for c in page.get("CommonPrefixes", []))

    def stored(self, job_id: str) -> dict[str, bytes]:
        """Every file the service holds for a job, by its name under the job, from whichever store
        it keeps them in (the data directory, or the bucket of STEMSEG_STORAGE_URL)."""
        bucket = self._bucket()
        if bucket is None:
            root = self.data / "jobs" / job_id
            return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        client, name, under = bucket
        under += f"{job_id}/"
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=under)
                for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return {k[len(under):]: client.get_object(Bucket=name, Key=k)["Body"].read() for k in sorted(keys)}

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
