"""The job store on both backends: the storage contract (LocalStorage and S3Storage on a real
SeaweedFS), uploads aborted mid-stream leaving nothing, the workers' video cache, store failures
as StoreUnavailable; then the service with S3 storage and no shared directory at all: the CLI's
tracks, bytes read from the store per worker, a store outage mid-job and a store that refuses."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from s3_server import ACCESS_KEY, S3Server, weed

from service.jobs.file_cache import FileCache
from service.jobs.s3_storage import S3Storage, parse_storage_url
from service.jobs.storage import LocalStorage, StoreUnavailable

pytestmark = pytest.mark.skipif(weed() is None, reason="SeaweedFS (weed) is not installed")

MiB = 1024**2
JOB = "a" * 32


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.close()


def new_bucket(s3: S3Server) -> str:
    name = f"jobs-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def s3_storage(s3: S3Server, bucket: str, prefix: str = "tenant/a", **kw) -> S3Storage:
    import os

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

    import socket

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
    # With shared paths the store's own file is used.
    local = LocalStorage(tmp_path / "data")
    local.write(JOB, "video", b"v")
    with FileCache.of(local, 0).local(JOB, "video") as p:
        assert p == local.path(JOB, "video")
    _ = io  # noqa: F841 - (kept for the service tests below)
