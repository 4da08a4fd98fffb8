"""Webhooks: allowed hosts, HMAC-SHA256 signature with timestamp, retries with backoff and the
attempts recorded on the job; a real job run by an in-process worker, a local receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from service_env import REDIS_URL, in_process_worker
from videos import make_video

from service.config import Settings
from service.jobs.lifecycle import Limits
from service.jobs.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, check_callback_url

SECRET = "s3cret"


class Receiver:
    """Answers 503 to the first `fail_first` deliveries, then 204; keeps what it got."""

    def __init__(self, fail_first: int) -> None:
        self.got: list[tuple[float, dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.got.append((time.monotonic(), dict(self.headers), body))
                self.send_response(503 if len(outer.got) <= fail_first else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_callback_url_policy() -> None:
    allowed = ["127.0.0.1", "localhost", "[::1]", "127.0.0.1:8080", "[::1]:9000", "hooks.internal:8443"]
    for good in ("http://127.0.0.1/x", "http://127.0.0.1:80/x", "https://localhost/x", "http://[::1]/",
                 "http://127.0.0.1:8080/h?a=1", "http://[::1]:9000/", "https://hooks.internal:8443/a",
                 "HTTP://LOCALHOST./x"):
        assert check_callback_url(good, allowed) is None, good
    for bad in ("http://169.254.169.254/latest/meta-data", "http://example.com/", "ftp://127.0.0.1/",
                "file:///etc/passwd", "http://u:p@127.0.0.1/", "http://[::1", "127.0.0.1/x", "http://127.0.0.1:99999/",
                "http://" + "a" * 3000,
                # a listed host is not every port of it: no mapping a host's services through webhooks
                "http://127.0.0.1:6379/", "http://127.0.0.1:5432/", "http://[::1]:9001/", "https://hooks.internal/a",
                "http://localhost:8080/",
                # control characters and whitespace (what %0D%0A in the query decodes to) never pass
                "http://127.0.0.1/x\r\nX-Injected: 1", "http://127.0.0.1/a b", "http://127.0.0.1/\tx",
                "http://127.0.0.1/\x85", "http://127.0.0.1/\x00", "http://127.0.0.1/caf\u00e9"):
        assert check_callback_url(bad, allowed), bad
    assert "6379" in check_callback_url("http://127.0.0.1:6379/", allowed)


@pytest.fixture
def worker(small_weights: Path, tmp_path: Path):
    with in_process_worker(small_weights, tmp_path / "data", "w-hooks", clips_per_task=4,
                           webhook_secret=SECRET, webhook_attempts=4, webhook_backoff_s=0.2) as w:
        yield w


def _job_with_callback(worker, video: Path, url: str) -> str:
    # Admitted as the API would: its host and port are on the allow-list, which delivery checks again.
    worker.notifier.allowed_hosts.append(url.split("/")[2])
    staging = "upload-" + uuid.uuid4().hex
    worker.storage.write(staging, "video", video.read_bytes())
    return worker.jobs.admit(staging, "", model=worker.engine.cfg, min_dim=None, clips_per_task=4,
                             limits=Limits(10**9, 10**6, 1e9), quota=0,
                             fields={"formats": ["ytvis"], "filename": "v.mp4", "callback_url": url}).id


def _wait(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_success_webhook_signed_retried_and_recorded(worker, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    receiver = Receiver(fail_first=2)
    try:
        job_id = _job_with_callback(worker, video, receiver.url)
        while worker.jobs.get(job_id).status != "succeeded":
            worker.step()
        _wait(lambda: (worker.jobs.get(job_id).webhook or {}).get("delivered"))
    finally:
        receiver.close()
    assert len(receiver.got) == 3  # two 503s, then delivered
    gaps = [b[0] - a[0] for a, b in zip(receiver.got, receiver.got[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # exponential backoff
    _, headers, body = receiver.got[-1]
    ts = headers[TIMESTAMP_HEADER]
    assert abs(int(ts) - time.time()) < 60
    expected = "sha256=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    payload = json.loads(body)
    assert payload["id"] == job_id and payload["status"] == "succeeded" and payload["tracks"] is not None
    record = worker.jobs.get(job_id).webhook
    assert record["url"] == receiver.url and record["delivered"] is True
    assert [a["status"] for a in record["attempts"]] == [503, 503, 204]


def test_failure_webhook_and_giving_up(worker, tmp_path: Path) -> None:
    receiver = Receiver(fail_first=100)
    try:
        video = tmp_path / "v.mp4"
        make_video(video, 9, 64, 48)
        job_id = _job_with_callback(worker, video, receiver.url)
        worker.storage.path(job_id, "video").write_bytes(b"no longer a video" * 10)
        from service.video.decode import clear_cache
        clear_cache()
        while worker.jobs.get(job_id).status != "failed":
            worker.step()
        _wait(lambda: len((worker.jobs.get(job_id).webhook or {}).get("attempts", [])) == 4)
    finally:
        receiver.close()
    record = worker.jobs.get(job_id).webhook
    assert record["delivered"] is False and [a["status"] for a in record["attempts"]] == [503] * 4
    payload = json.loads(receiver.got[0][2])
    assert payload["status"] == "failed" and payload["error"].startswith("video:")


def test_api_takes_callback_url_from_allowed_hosts_only(tmp_path: Path, redis_prefix: str) -> None:
    from fastapi.testclient import TestClient

    from service.api.main import create_app
    from service.model.presets import get_preset

    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    s = Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, data_dir=tmp_path / "data", rate_limit_jobs=0,
                 webhook_hosts="hooks.internal")
    with TestClient(create_app(s, model_cfg=get_preset("kitti_mots"))) as c:
        r = c.post("/v1/jobs", params={"callback_url": "http://127.0.0.1:9/x"}, content=video.read_bytes(),
                   headers={"content-type": "video/mp4"})
        assert r.status_code == 422 and "STEMSEG_WEBHOOK_HOSTS" in r.json()["detail"]
        r = c.post("/v1/jobs", params={"callback_url": "https://hooks.internal/stemseg"}, content=video.read_bytes(),
                   headers={"content-type": "video/mp4"})
        assert r.status_code == 202, r.text
        assert r.json()["webhook"] == {"url": "https://hooks.internal/stemseg", "delivered": None, "attempts": []}
