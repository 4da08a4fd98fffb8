"""The job store on both backends: the storage contract (LocalStorage and S3Storage on a real
SeaweedFS), uploads aborted mid-stream leaving nothing, the workers' video cache, store failures
as StoreUnavailable; then the service with S3 storage and no shared directory at all: the CLI's
tracks, bytes read from the store per worker, a store outage mid-job and a store that refuses."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from s3_server import ACCESS_KEY, S3Server, weed
from service_env import REDIS_URL, ServiceEnv
from test_service import _check_ranges
from videos import make_video

from service.jobs.file_cache import FileCache
from service.jobs.keys import Keys
from service.jobs.lifecycle import Jobs
from service.jobs.s3_storage import S3Storage, parse_storage_url
from service.jobs.storage import LocalStorage, StoreUnavailable

pytestmark = pytest.mark.skipif(weed() is None, reason="SeaweedFS (weed) is not installed")

MiB = 1024**2
JOB = "a" * 32


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    return s3_server  # one SeaweedFS for the session (tests/conftest.py); a bucket per test


def new_bucket(s3: S3Server) -> str:
    return s3.new_bucket()


def s3_storage(s3: S3Server, bucket: str, prefix: str = "tenant/a", **kw) -> S3Storage:
    os.environ.update({k: v for k, v in s3.env().items() if k.startswith("AWS_")})
    return S3Storage(bucket, prefix, endpoint_url=s3.endpoint, part_bytes=5 * MiB, **kw)


def bucket_contents(s3: S3Server, bucket: str) -> tuple[list[str], list[str]]:
    """Every object key and every unfinished multipart upload's key in the bucket."""
    c = s3.client()
    keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    uploads = [u["Key"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return keys, uploads


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalStorage(tmp_path / "data")
    s3 = request.getfixturevalue("s3")
    return s3_storage(s3, new_bucket(s3))


def test_storage_contract(storage, tmp_path: Path) -> None:
    assert not storage.exists(JOB, "video") and list(storage.jobs()) == []
    assert storage.age_s(JOB) == float("inf")
    with pytest.raises(FileNotFoundError):
        storage.read(JOB, "video")
    with pytest.raises(FileNotFoundError):
        storage.size(JOB, "video")
    # Streamed in pieces, over two multipart parts (5 MiB each) on S3.
    data = np.random.default_rng(0).integers(0, 256, 11 * MiB + 123, dtype=np.uint8).tobytes()
    with storage.writer(JOB, "video") as out:
        for i in range(0, len(data), 1 * MiB + 7):
            out.write(data[i:i + 1 * MiB + 7])
        assert not storage.exists(JOB, "video")  # nothing visible before the block ends
    assert storage.read(JOB, "video") == data and storage.size(JOB, "video") == len(data)
    assert b"".join(storage.iter_range(JOB, "video", 5 * MiB - 3, 5 * MiB + 10)) == data[5 * MiB - 3:5 * MiB + 10]
    with storage.local(JOB, "video") as p:
        assert p.read_bytes() == data
    storage.write(JOB, "clips/00000.npz", b"clip 0")
    storage.write(JOB, "clips/00001.npz", b"clip 1!")
    assert storage.sizes(JOB, "clips") == {"00000.npz": 6, "00001.npz": 7}
    assert storage.sizes(JOB, "nothing") == {}
    # A rewrite replaces; a failed rewrite leaves the previous version.
    storage.write(JOB, "stitch.npz", b"one")
    storage.write(JOB, "stitch.npz", b"two")
    with pytest.raises(RuntimeError), storage.writer(JOB, "stitch.npz") as out:
        out.write(b"three, half")
        raise RuntimeError("died mid-write")
    assert storage.read(JOB, "stitch.npz") == b"two"
    # A muxer that seeks back.
    with storage.writer(JOB, "seeked", seekable=True) as out:
        out.write(b"xxxx-tail")
        out.seek(0)
        out.write(b"head")
    assert storage.read(JOB, "seeked") == b"head-tail"
    # A folder built locally and published, its marker last; fetched back whole.
    with storage.scratch(JOB, "render") as parts:
        (parts / "davis").mkdir(exist_ok=True)
        (parts / "davis" / "00000.png").write_bytes(b"png")
        (parts / "mots-0000000.txt").write_text("1 2 3\n")
        (parts / "done-0000000").write_text("")
        storage.publish(JOB, "render", parts, last=["done-0000000"])
    assert storage.sizes(JOB, "render") == {"davis/00000.png": 3, "done-0000000": 0, "mots-0000000.txt": 6}
    with storage.fetch(JOB, "render") as got:
        assert (got / "davis" / "00000.png").read_bytes() == b"png" and (got / "mots-0000000.txt").is_file()
    storage.delete(JOB, "render")
    assert storage.sizes(JOB, "render") == {} and storage.exists(JOB, "video")
    # Jobs: listed, aged, renamed, deleted.
    assert list(storage.jobs()) == [JOB] and 0 <= storage.age_s(JOB) < 60
    storage.rename_job(JOB, "b" * 32)
    assert list(storage.jobs()) == ["b" * 32] and storage.read("b" * 32, "video") == data
    assert not storage.exists(JOB, "video")
    storage.delete_job("b" * 32)
    assert list(storage.jobs()) == [] and storage.age_s("b" * 32) == float("inf")
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            storage.exists(bad, "video")
    with pytest.raises(ValueError):
        storage.read(JOB, "../../etc/passwd")


def test_s3_layout_presigned_urls_and_an_upload_aborted_mid_stream(s3: S3Server) -> None:
    bucket = new_bucket(s3)
    storage = s3_storage(s3, bucket)
    storage.write(JOB, "out/overlay.mp4", b"0123456789")
    assert bucket_contents(s3, bucket) == ([f"tenant/a/jobs/{JOB}/out/overlay.mp4"], [])
    url = storage.presigned_url(JOB, "out/overlay.mp4", 60, "overlay.mp4")
    got = httpx.get(url, headers={"Range": "bytes=2-4"})
    assert got.status_code == 206 and got.content == b"234"
    assert 'filename="overlay.mp4"' in got.headers["content-disposition"]
    storage.delete_job(JOB)
    # An upload cut off after two parts went up: no object, no parts, no unfinished upload.
    with pytest.raises(ConnectionResetError), storage.writer("upload-x", "video") as out:
        for _ in range(12):
            out.write(b"v" * MiB)
        assert bucket_contents(s3, bucket)[1] == ["tenant/a/jobs/upload-x/video"]  # under way
        raise ConnectionResetError("the client went away")
    assert bucket_contents(s3, bucket) == ([], [])
    # One left behind by a process that died mid-upload is listed as the staging name, and
    # delete_job (what the sweeper calls) aborts it.
    s3.client().create_multipart_upload(Bucket=bucket, Key="tenant/a/jobs/upload-y/video")
    assert list(storage.jobs()) == ["upload-y"] and storage.age_s("upload-y") < 60
    storage.delete_job("upload-y")
    assert bucket_contents(s3, bucket) == ([], [])
    assert parse_storage_url("s3://b/p/q/") == ("b", "p/q")
    for bad in ("s3://", "http://b/p", "s3://b/p?x=1"):
        with pytest.raises(ValueError):
            parse_storage_url(bad)


def test_a_failing_store_is_store_unavailable_and_never_names_the_bucket(s3: S3Server, tmp_path: Path) -> None:
    import pickle

    bucket = new_bucket(s3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = S3Storage(bucket, "p", endpoint_url=f"http://127.0.0.1:{closed}", timeout_s=1, attempts=1)
    for call in (lambda: down.read(JOB, "video"), lambda: down.exists(JOB, "video"), lambda: list(down.jobs()),
                 lambda: down.write(JOB, "x", b"x")):
        with pytest.raises(StoreUnavailable) as e:
            call()
        assert not e.value.lasting and "could not be reached" in str(e.value) and bucket not in str(e.value)
    refused = s3_storage(s3, bucket)
    refused._client = s3.client(secret="wrong")
    with pytest.raises(StoreUnavailable) as e:
        refused.write(JOB, "x", b"x")
    assert e.value.lasting and "refused access" in str(e.value) and bucket not in str(e.value)
    # Picklable (the API probes uploads in child processes); the copy makes its own client.
    ok = s3_storage(s3, bucket)
    ok.write(JOB, "x", b"x")
    assert pickle.loads(pickle.dumps(ok)).read(JOB, "x") == b"x"
    assert ACCESS_KEY


class _Counting(S3Storage):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.downloads = 0

    def download(self, job_id: str, name: str, target: Path) -> int:
        self.downloads += 1
        time.sleep(0.2)  # long enough for the other threads to ask meanwhile
        return super().download(job_id, name, target)


def test_worker_cache_downloads_once_bounded_lru_and_keeps_what_is_in_use(s3: S3Server, tmp_path: Path) -> None:
    bucket = new_bucket(s3)
    store = _Counting(bucket, "", endpoint_url=s3.endpoint)
    s3_storage(s3, bucket)  # the AWS_* variables
    for j in ("1" * 32, "2" * 32, "3" * 32):
        store.write(j, "video", j.encode() * 1000)  # 32 kB each
    cache = FileCache(store, tmp_path / "cache", max_bytes=70_000)
    seen: list[bytes] = []

    def use() -> None:
        with cache.local("1" * 32, "video") as p:
            seen.append(p.read_bytes())

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.downloads == 1 and seen == [b"1" * 32000] * 4
    with cache.local("2" * 32, "video"):
        pass
    assert store.downloads == 2 and cache.cached_bytes() == 64_000
    with cache.local("1" * 32, "video") as held:  # 1 now most recent; 3 pushes out 2, not 1
        with cache.local("3" * 32, "video"):
            pass
        assert held.is_file()
    assert store.downloads == 3 and cache.cached_bytes() == 64_000
    assert not (tmp_path / "cache" / ("2" * 32)).exists()
    with cache.local("1" * 32, "video"):
        pass
    assert store.downloads == 3  # still cached
    cache.forget("1" * 32)
    assert cache.cached_bytes() == 32_000
    # A copy bigger than the budget is kept only while in use.
    small = FileCache(store, tmp_path / "small", max_bytes=10)
    with small.local("1" * 32, "video") as p:
        assert p.is_file()
    assert not p.exists() and small.cached_bytes() == 0
    # Caches of dead processes (a worker killed and restarted in its pod) are deleted at start.
    import tempfile

    from service.jobs.file_cache import _process_tag
    from service.jobs.storage import scratch_root

    tempfile.tempdir, saved = str(tmp_path / "tmp"), tempfile.tempdir
    try:
        (tmp_path / "tmp").mkdir()
        stale = scratch_root() / "cache-1-1-gone"  # pid 1 runs, but started at another time
        live = scratch_root() / f"cache-{_process_tag(os.getpid())}-other"
        for d in (stale, live):
            d.mkdir()
            (d / "x").write_bytes(b"x")
        mine = FileCache.of(store, 10)
        assert not stale.exists() and live.exists() and mine.root.parent == scratch_root()
        mine.close()
        assert not mine.root.exists()
    finally:
        tempfile.tempdir = saved
    # With shared paths the store's own file is used.
    local = LocalStorage(tmp_path / "data")
    local.write(JOB, "video", b"v")
    with FileCache.of(local, 0).local(JOB, "video") as p:
        assert p == local.path(JOB, "video")


def test_the_sweeper_deletes_objects_without_a_record(s3: S3Server, redis_prefix: str) -> None:
    from service.jobs.redis_clients import sync_client

    bucket = new_bucket(s3)
    storage = s3_storage(s3, bucket)
    r = sync_client(REDIS_URL)
    try:
        jobs = Jobs(r, redis_prefix, 60, storage)
        alive = jobs.new_id()
        r.hset(jobs.keys.job(alive), "status", "running")
        expired = jobs.new_id()
        for job_id in (alive, expired, "upload-" + jobs.new_id()):
            storage.write(job_id, "video", b"v")
            storage.write(job_id, "out/stemseg-output.json", b"{}")
        s3.client().create_multipart_upload(Bucket=bucket, Key="tenant/a/jobs/upload-half/video")
        assert jobs.sweep(grace_s=3600, consumer_idle_s=3600)["job_dirs"] == 0  # all too young
        assert jobs.sweep(grace_s=0, consumer_idle_s=3600)["job_dirs"] == 3
        keys, uploads = bucket_contents(s3, bucket)
        assert sorted(keys) == sorted(f"tenant/a/jobs/{alive}/{n}" for n in ("video", "out/stemseg-output.json"))
        assert uploads == [] and list(storage.jobs()) == [alive]
    finally:
        r.close()


# -- the service with no shared directory ----------------------------------------------------------
def _own_dirs(env: ServiceEnv, name: str) -> dict[str, str]:
    """A process's own, empty data directory and TMPDIR: nothing it writes is seen by another."""
    root = env.tmp / name
    (root / "data").mkdir(parents=True)
    (root / "tmp").mkdir()
    return {"STEMSEG_DATA_DIR": str(root / "data"), "TMPDIR": str(root / "tmp")}


def _s3_env(tmp_path: Path, weights: Path, s3: S3Server, bucket: str, **settings: str) -> ServiceEnv:
    return ServiceEnv(tmp_path, weights, STEMSEG_STORAGE_URL=f"s3://{bucket}/svc", STEMSEG_S3_PART_BYTES=str(5 * MiB),
                      STEMSEG_S3_TIMEOUT_S="2", STEMSEG_S3_ATTEMPTS="2", **s3.env(), **settings)


def _upload(base: str, path: Path, formats: str = "ytvis,davis,mots,overlay") -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(f"{base}/v1/jobs", files={"file": (path.name, f, "video/mp4")}, params={"formats": formats},
                          timeout=60)


def _frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(video=0)]


@pytest.mark.slow
def test_api_and_two_workers_sharing_no_directory_give_the_cli_outputs(tmp_path: Path, small_weights: Path,
                                                                        s3: S3Server) -> None:
    from PIL import Image

    from service.cli import main
    from service.outputs.names import NAMES, davis_frame

    n = 32
    video = tmp_path / "v.mp4"
    make_video(video, n, 160, 120)
    bucket = new_bucket(s3)
    env = _s3_env(tmp_path, small_weights, s3, bucket, STEMSEG_RENDER_FRAMES_PER_TASK="8")
    dirs = {name: _own_dirs(env, name) for name in ("api", "redirect", "w1", "w2")}
    try:
        base = env.start_api(**dirs["api"])
        workers = [env.start_worker(**dirs["w1"]), env.start_worker(**dirs["w2"])]
        r = _upload(base, video)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = env.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", job
        assert all(w.poll() is None for w in workers)

        # The outputs, downloaded file by file, are the CLI's.
        listing = httpx.get(f"{base}/v1/jobs/{job_id}/files").json()
        got = tmp_path / "got"
        for f in listing["files"]:
            body = httpx.get(f"{base}{f['url']}", timeout=60)
            assert body.status_code == 200 and len(body.content) == f["size"], f
            (got / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            (got / f["path"]).write_bytes(body.content)
        cli = tmp_path / "cli"
        assert main(["segment", str(video), "--weights", str(small_weights), "--out", str(cli), "--device", "cpu",
                     "--no-progress"]) == 0
        for fmt in ("ytvis", "mots"):
            assert (got / NAMES[fmt]).read_bytes() == (cli / NAMES[fmt]).read_bytes(), fmt
        for f in range(n):
            assert np.array_equal(np.asarray(Image.open(got / "davis" / davis_frame(f))),
                                  np.asarray(Image.open(cli / "davis" / davis_frame(f))))
        ours, theirs = _frames(got / NAMES["overlay"]), _frames(cli / NAMES["overlay"])
        assert len(ours) == len(theirs) == n and all(np.abs(a - b).mean() < 4 for a, b in zip(ours, theirs))
        tracks = httpx.get(f"{base}/v1/jobs/{job_id}/result", timeout=60).json()["tracks"]
        assert [(t["category_id"], t["segmentations"]) for t in tracks] == [
            (c["category_id"], c["segmentations"]) for c in json.loads((cli / NAMES["ytvis"]).read_text())]
        davis = httpx.get(f"{base}/v1/jobs/{job_id}/result", params={"format": "davis"}, timeout=60)
        assert davis.status_code == 200 and davis.headers["content-type"] == "application/zip"
        _check_ranges(f"{base}/v1/jobs/{job_id}/overlay.mp4", (got / NAMES["overlay"]).read_bytes())
        _check_ranges(f"{base}/v1/jobs/{job_id}/result?format=mots", (got / NAMES["mots"]).read_bytes())

        # Bytes each worker read from the store: the video at most once per worker, not per task.
        timeline = [json.loads(e) for e in env.redis.lrange(Keys(env.prefix).timeline(job_id), 0, -1)]
        tasks = [e for e in timeline if e["kind"] in ("clips", "outputs")]
        per_worker: dict[str, dict[str, int]] = {}
        for e in tasks:
            w = per_worker.setdefault(e["worker"], {"tasks": 0, "video": 0, "all": 0})
            w["tasks"] += 1
            w["video"] += e["video_bytes_fetched"]
            w["all"] += e["store_bytes_read"]
        size = video.stat().st_size
        print(f"\nvideo {size} bytes, {len(tasks)} tasks; per worker: {per_worker}")
        assert len(tasks) >= 6
        for w in per_worker.values():
            assert w["video"] <= 1.5 * size, (w, size)
        assert sum(w["video"] for w in per_worker.values()) <= 2 * size  # once per worker at most

        # Nothing was written to any process's own directories: the store holds everything.
        for d in dirs.values():
            assert not any(Path(d["STEMSEG_DATA_DIR"]).rglob("*")), d
        keys, uploads = bucket_contents(s3, bucket)
        assert uploads == [] and all(k.startswith(f"svc/jobs/{job_id}/") for k in keys)
        assert f"svc/jobs/{job_id}/out/stemseg-output.json" in keys and not any("/render/" in k for k in keys)

        # An API set to redirect answers 307 to a presigned URL of the object.
        other = env.start_api(STEMSEG_RESULTS_REDIRECT="1", **dirs["redirect"])
        moved = httpx.get(f"{other}/v1/jobs/{job_id}/overlay.mp4")
        assert moved.status_code == 307 and moved.headers["location"].startswith(s3.endpoint)
        assert httpx.get(moved.headers["location"]).content == (got / NAMES["overlay"]).read_bytes()
        # The Python client follows it (without its API key) for downloads and results, sync and async.
        import asyncio

        from service.client import AsyncClient, Client

        with Client(other) as client:
            job = client.job(job_id)
            job.download(tmp_path / "via-redirect")
            assert job.result("mots") == (got / NAMES["mots"]).read_text()

        async def download_async() -> None:
            async with AsyncClient(other) as client:
                await (await client.job(job_id)).download(tmp_path / "via-redirect-async")

        asyncio.run(download_async())
        for folder in ("via-redirect", "via-redirect-async"):
            for f in listing["files"]:
                assert (tmp_path / folder / f["path"]).read_bytes() == (got / f["path"]).read_bytes(), (folder, f)

        # DELETE takes the job's objects.
        assert httpx.delete(f"{base}/v1/jobs/{job_id}").status_code == 204
        assert bucket_contents(s3, bucket) == ([], [])
    finally:
        env.close()


def test_an_upload_cut_off_mid_stream_leaves_nothing_in_the_bucket(tmp_path: Path, lite_weights: Path,
                                                                   s3: S3Server) -> None:
    bucket = new_bucket(s3)
    env = _s3_env(tmp_path, lite_weights, s3, bucket, STEMSEG_MAX_UPLOAD_BYTES=str(12 * MiB))
    try:
        base = env.start_api(**_own_dirs(env, "api"))

        def body() -> Iterator[bytes]:
            for _ in range(20):
                yield b"\0" * MiB

        r = httpx.post(f"{base}/v1/jobs", content=body(), headers={"content-type": "application/octet-stream"},
                       timeout=60)
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        # A client that goes away after 11 MiB (two parts stored) of an upload under the limit.
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as c:
            c.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: {12 * MiB - 1}\r\n\r\n".encode())
            for _ in range(11):
                c.sendall(b"\0" * MiB)
            deadline = time.monotonic() + 30
            while not bucket_contents(s3, bucket)[1]:  # the multipart upload is under way
                assert time.monotonic() < deadline
                time.sleep(0.1)
        deadline = time.monotonic() + 30
        while bucket_contents(s3, bucket) != ([], []):
            assert time.monotonic() < deadline, bucket_contents(s3, bucket)
            time.sleep(0.2)
    finally:
        env.close()


@pytest.mark.slow
def test_store_down_mid_job_503s_then_the_job_completes_and_a_refusing_store_fails_the_job(
        tmp_path: Path, small_weights: Path) -> None:
    s3 = S3Server(tmp_path / "own-s3")  # its own: stopped and started here
    bucket = new_bucket(s3)
    env = _s3_env(tmp_path, small_weights, s3, bucket, STEMSEG_MAX_DELIVERIES="30")
    try:
        base = env.start_api(**_own_dirs(env, "api"))
        workers = [env.start_worker(**_own_dirs(env, "w1")), env.start_worker(**_own_dirs(env, "w2"))]
        short, long = tmp_path / "short.mp4", tmp_path / "long.mp4"
        make_video(short, 8, 64, 48)
        make_video(long, 48, 64, 48)
        done = _upload(base, short, "ytvis,overlay").json()["id"]
        assert env.wait(done, timeout=180)["status"] == "succeeded"
        r = _upload(base, long, "ytvis,overlay")
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 180
        while httpx.get(f"{base}/v1/jobs/{job_id}").json()["progress"]["clips_done"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s3.stop()
        try:
            for url in (f"/v1/jobs/{done}/result", f"/v1/jobs/{done}/overlay.mp4", f"/v1/jobs/{done}/files"):
                down = httpx.get(f"{base}{url}", timeout=30)
                assert down.status_code == 503, (url, down.text)
                assert down.headers["content-type"] == "application/problem+json" and "retry-after" in down.headers
                assert bucket not in down.text and "/svc" not in down.text, down.text
            refused = _upload(base, short)
            assert refused.status_code == 503 and "job store" in refused.json()["detail"], refused.text
            time.sleep(4)  # over a visibility timeout: tasks fail against the dead store and are redelivered
            assert httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] in ("queued", "running")
            assert all(w.poll() is None for w in workers)
            why = json.loads(env.redis.hget(Keys(env.prefix).job(job_id), "retry_reason") or b"null")
            assert why and why.startswith("job store: the object store could not be reached"), why
        finally:
            s3.start()
        job = env.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", job
        assert all(w.poll() is None for w in workers)
        assert httpx.get(f"{base}/v1/jobs/{job_id}/result", timeout=60).status_code == 200

        # A worker the store refuses (a wrong secret: 403) fails the job with the reason, and lives.
        for w in workers:
            w.send_signal(signal.SIGTERM)
            w.wait(30)
        refused_worker = env.start_worker(AWS_SECRET_ACCESS_KEY="not-the-secret", **_own_dirs(env, "w3"))
        r = _upload(base, short, "ytvis")
        assert r.status_code == 202, r.text
        job = env.wait(r.json()["id"], timeout=180)
        assert job["status"] == "failed" and "job store: the object store refused access" in job["error"], job
        assert refused_worker.poll() is None
    finally:
        env.close()
        s3.close()


def test_in_process_worker_on_s3_runs_a_job_and_fails_one_whose_video_is_gone(s3: S3Server, small_weights: Path,
                                                                              tmp_path: Path) -> None:
    from service_env import in_process_worker

    from service.jobs.lifecycle import Limits

    bucket = new_bucket(s3)
    s3_storage(s3, bucket)  # the AWS_* variables
    with in_process_worker(small_weights, tmp_path / "data", "w-s3", storage_url=f"s3://{bucket}/w",
                           s3_endpoint_url=s3.endpoint) as w:
        video = tmp_path / "v.mp4"
        make_video(video, 13, 64, 48)

        def admit() -> str:
            staging = "upload-" + uuid.uuid4().hex
            w.storage.write(staging, "video", video.read_bytes())
            return w.jobs.admit(staging, "", model=w.engine.cfg, min_dim=None, clips_per_task=2,
                                limits=Limits(10**9, 10**6, 1e9), quota=0,
                                fields={"formats": ["ytvis", "mots"], "filename": "v.mp4"}).id

        def drain(job_id: str):
            for _ in range(30):
                job = w.jobs.get(job_id)
                if job.final:
                    return job
                w.step()
            return w.jobs.get(job_id)

        ok = admit()  # probed in a child process with its own client, moved under the job id
        assert drain(ok).status == "succeeded"
        assert json.loads(w.storage.read(ok, "out/stemseg-output.json"))["formats"] == ["ytvis", "mots"]
        gone = admit()
        s3.client().delete_object(Bucket=bucket, Key=f"w/jobs/{gone}/video")
        job = drain(gone)
        assert job.status == "failed" and job.error == "job store: the job's video is missing from the store", job
        assert not (tmp_path / "data").exists()  # nothing in the data directory


def test_a_hung_store_stalls_only_the_requests_that_need_it(tmp_path: Path, lite_weights: Path) -> None:
    """A store that accepts connections and never answers: the upload gets 503 after the timeout,
    and meanwhile the API answers everything else at once (store calls never run on its event loop)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes connections; nobody ever reads or answers
        env = ServiceEnv(tmp_path, lite_weights, STEMSEG_STORAGE_URL="s3://hung-bucket/x",
                         STEMSEG_S3_ENDPOINT_URL=f"http://127.0.0.1:{hung.getsockname()[1]}",
                         STEMSEG_S3_TIMEOUT_S="3", STEMSEG_S3_ATTEMPTS="1", AWS_ACCESS_KEY_ID="k",
                         AWS_SECRET_ACCESS_KEY="s", AWS_REGION="us-east-1")
        try:
            base = env.start_api(**_own_dirs(env, "api"))
            answer: list[httpx.Response] = []
            video = tmp_path / "v.mp4"
            make_video(video, 8, 64, 48)
            upload = threading.Thread(target=lambda: answer.append(_upload(base, video, "ytvis")))
            started = time.monotonic()
            upload.start()
            time.sleep(0.5)
            for _ in range(5):
                t = time.monotonic()
                assert httpx.get(f"{base}/v1/jobs", timeout=10).status_code == 200
                assert time.monotonic() - t < 1.0, "the event loop was held by a store call"
            upload.join(60)
            assert answer and answer[0].status_code == 503, answer
            assert time.monotonic() - started >= 3 and "hung-bucket" not in answer[0].text
            assert "timed out" in answer[0].json()["detail"] or "could not be reached" in answer[0].json()["detail"]
        finally:
            env.close()


@pytest.mark.slow
def test_a_worker_killed_mid_job_with_no_shared_directory_loses_nothing(tmp_path: Path, small_weights: Path,
                                                                        s3: S3Server) -> None:
    from service.cli import main

    video = tmp_path / "v.mp4"
    make_video(video, 40, 64, 48)
    bucket = new_bucket(s3)
    env = _s3_env(tmp_path, small_weights, s3, bucket, STEMSEG_RENDER_FRAMES_PER_TASK="10")
    try:
        base = env.start_api(**_own_dirs(env, "api"))
        workers = {p.pid: p for p in (env.start_worker(**_own_dirs(env, "w1")),
                                      env.start_worker(**_own_dirs(env, "w2")))}
        r = _upload(base, video, "ytvis,mots")
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        stream = Keys(env.prefix).tasks
        deadline = time.monotonic() + 180
        while True:  # the first task taken: its worker is killed in the middle of it
            pending = env.redis.xpending_range(stream, "workers", "-", "+", 10) if env.redis.exists(stream) else []
            if pending:
                break
            assert time.monotonic() < deadline, "no task was ever taken"
            time.sleep(0.005)
        victim = int(pending[0]["consumer"].decode().rsplit("-", 1)[1])
        os.kill(victim, signal.SIGKILL)
        workers[victim].wait(10)
        job = env.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", job
        assert [w.poll() for pid, w in workers.items() if pid != victim] == [None]
        timeline = [json.loads(e) for e in env.redis.lrange(Keys(env.prefix).timeline(job_id), 0, -1)]
        assert any(e.get("deliveries", 1) >= 2 for e in timeline), "the killed worker's task was redelivered"
        cli = tmp_path / "cli"
        assert main(["segment", str(video), "--weights", str(small_weights), "--out", str(cli), "--device", "cpu",
                     "--no-progress", "--format", "ytvis"]) == 0
        tracks = httpx.get(f"{base}/v1/jobs/{job_id}/result", timeout=60).json()["tracks"]
        assert [(t["category_id"], t["segmentations"]) for t in tracks] == [
            (c["category_id"], c["segmentations"]) for c in json.loads((cli / "results.json").read_text())]
        assert httpx.delete(f"{base}/v1/jobs/{job_id}").status_code == 204
        assert bucket_contents(s3, bucket) == ([], [])
    finally:
        env.close()
