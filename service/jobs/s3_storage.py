"""The job store on an S3-compatible object store (AWS S3, MinIO, SeaweedFS, Ceph, GCS's XML
API): `STEMSEG_STORAGE_URL=s3://BUCKET/PREFIX`, endpoint `STEMSEG_S3_ENDPOINT_URL`, credentials
from the standard AWS chain (AWS_* variables, profiles, IAM roles).

Objects follow service.jobs.storage's layout under PREFIX: a job's files are
`PREFIX/jobs/JOB_ID/NAME`. What each operation costs:

* `writer`: a multipart upload, one part per `STEMSEG_S3_PART_BYTES` as the bytes arrive (an
  upload is never held whole in memory or on disk); completed when the block ends without an
  error, aborted otherwise, so an aborted upload leaves neither an object nor parts. Smaller
  than one part: a single PutObject. `seekable=True` (a muxer that seeks back) spools to a local
  temporary file and uploads that on success.
* `read`, `exists`, `size`: one GET / HEAD. `sizes`: one LIST per 1000 objects.
* `local`, `download`, `fetch`: GETs into local files (boto3's managed transfer: ranged GETs
  in parallel for large objects); `publish`: one PUT (or multipart upload) per file.
* `iter_range`: one ranged GET, streamed; `presigned_url`: no request at all.
* `rename_job`: a server-side copy per object then its delete (only an accepted upload's
  `video` is renamed, once per job); `delete_job`: LIST, DeleteObjects per 1000, and an abort
  of every multipart upload left under the job (an API that died mid-upload).

Every failure of the store becomes `StoreUnavailable` (its `lasting` flag set for access
denied and quota), a missing object FileNotFoundError, as on the local backend. The client is
made lazily per process, so an S3Storage pickles (the API's probes run in child processes).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from service.errors import UserError
from service.jobs.storage import JOBS, StoreUnavailable, job_prefix, object_name, scratch_root

log = logging.getLogger("stemseg.storage")

if TYPE_CHECKING:
    from service.config import Settings

_LASTING = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccountProblem", "AllAccessDisabled",
            "QuotaExceeded", "StorageQuotaExceeded", "EntityTooLarge", "NoSuchBucket"}
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


def parse_storage_url(url: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] -> (bucket, prefix without slashes at its ends)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"STEMSEG_STORAGE_URL must be s3://BUCKET[/PREFIX], not {url!r}")
    return parts.netloc, parts.path.strip("/")


def translate(e: BaseException, what: str) -> BaseException:
    """A boto3/botocore failure as this module raises it (see the module docstring)."""
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _MISSING or status == 404:
            return FileNotFoundError(what)
        lasting = code in _LASTING or status in (403, 507)
        kind = ("refused access" if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                                               "SignatureDoesNotMatch") else
                "is full" if code in ("QuotaExceeded", "StorageQuotaExceeded") or status == 507 else "failed")
        return StoreUnavailable(f"the object store {kind} ({code or status})", lasting=lasting)
    return StoreUnavailable(f"the object store could not be reached ({type(e).__name__})")


class _Counter:
    """Bytes read from the store by the current thread (a worker reports them per task)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def add(self, n: int) -> None:
        self._local.n = getattr(self._local, "n", 0) + n

    def take(self) -> int:
        n, self._local.n = getattr(self._local, "n", 0), 0
        return n


class _MultipartWriter:
    """A write-only stream into one object: parts uploaded as they fill (see the module docstring)."""

    def __init__(self, store: S3Storage, key: str) -> None:
        self.store, self.key = store, key
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.closed = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        self.buf += data
        size = self.store.part_bytes
        while len(self.buf) >= size:
            self._part(bytes(self.buf[:size]))
            del self.buf[:size]
        return len(data)

    def flush(self) -> None:
        pass

    def _part(self, body: bytes) -> None:
        c = self.store.client
        if self.upload_id is None:
            self.upload_id = c.create_multipart_upload(Bucket=self.store.bucket, Key=self.key)["UploadId"]
        n = len(self.parts) + 1
        answer = c.upload_part(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n,
                               Body=body)
        self.parts.append({"PartNumber": n, "ETag": answer["ETag"]})

    def commit(self) -> None:
        c = self.store.client
        if self.upload_id is None:
            c.put_object(Bucket=self.store.bucket, Key=self.key, Body=bytes(self.buf))
        else:
            if self.buf:
                self._part(bytes(self.buf))
            c.complete_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                                        MultipartUpload={"Parts": self.parts})
        self.buf.clear()
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.buf.clear()
        if self.upload_id is not None:
            try:
                self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                         UploadId=self.upload_id)
            except Exception as e:  # noqa: BLE001 - the store is failing: the sweeper aborts what is left (delete_job)
                log.warning("could not abort an upload (%s); the sweeper will", type(e).__name__)


class S3Storage:
    shared_paths = False

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, timeout_s: float = 10.0,
                 attempts: int = 3, part_bytes: int = 8 * 1024**2) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.timeout_s, self.attempts, self.part_bytes = timeout_s, attempts, max(part_bytes, 5 * 1024**2)
        self.bytes_read = _Counter()
        self._client = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, s: Settings) -> S3Storage:
        bucket, prefix = parse_storage_url(s.storage_url)
        return cls(bucket, prefix, endpoint_url=s.s3_endpoint_url or None, timeout_s=s.s3_timeout_s,
                   attempts=s.s3_attempts, part_bytes=s.s3_part_bytes)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_client=None, _lock=None, bytes_read=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), bytes_read=_Counter())

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise UserError("STEMSEG_STORAGE_URL=s3://... needs boto3: pip install 'stemseg-serve[s3]'"
                                    ) from None
                # Short timeouts and few attempts: a dead store is a 503 or a retried task within
                # seconds, not a request hanging for minutes.
                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=Config(
                    connect_timeout=self.timeout_s, read_timeout=self.timeout_s,
                    retries={"max_attempts": self.attempts, "mode": "standard"}, max_pool_connections=32,
                    signature_version="s3v4"))  # SigV4: presigned URLs with response headers verify everywhere
            return self._client

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.part_bytes, multipart_chunksize=self.part_bytes,
                              max_concurrency=4)

    # -- the layout --------------------------------------------------------------------------
    def key(self, job_id: str, name: str) -> str:
        return f"{self.prefix}/{object_name(job_id, name)}" if self.prefix else object_name(job_id, name)

    def _job_key(self, job_id: str) -> str:
        p = job_prefix(job_id)
        return f"{self.prefix}/{p}/" if self.prefix else f"{p}/"

    def _jobs_key(self) -> str:
        return f"{self.prefix}/{JOBS}/" if self.prefix else f"{JOBS}/"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as e:
            raise translate(e, what) from None

    def _list(self, prefix: str) -> Iterator[dict]:
        with self._errors(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    def _uploads(self, prefix: str) -> Iterator[dict]:
        """Multipart uploads begun and never completed nor aborted under `prefix`."""
        with self._errors(prefix):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                       Prefix=prefix):
                yield from page.get("Uploads", [])

    # -- files -------------------------------------------------------------------------------
    @contextmanager
    def writer(self, job_id: str, name: str, *, seekable: bool = False) -> Iterator[BinaryIO]:
        key = self.key(job_id, name)
        if seekable:
            with tempfile.NamedTemporaryFile(dir=scratch_root(), suffix=".part") as f:
                yield f
                f.flush()
                with self._errors(name):
                    self.client.upload_file(f.name, self.bucket, key, Config=self._transfer())
            return
        out = _MultipartWriter(self, key)
        try:
            with self._errors(name):
                yield out  # the parts are uploaded in write(): their failures come out of the block
                out.commit()
        except BaseException:
            out.abort()
            raise

    def write(self, job_id: str, name: str, data: bytes) -> None:
        with self._errors(name):
            self.client.put_object(Bucket=self.bucket, Key=self.key(job_id, name), Body=data)

    def read(self, job_id: str, name: str) -> bytes:
        with self._errors(name):
            data = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, name))["Body"].read()
        self.bytes_read.add(len(data))
        return data

    def exists(self, job_id: str, name: str) -> bool:
        try:
            self.size(job_id, name)
        except FileNotFoundError:
            return False
        return True

    def size(self, job_id: str, name: str) -> int:
        with self._errors(name):
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(job_id, name))["ContentLength"])

    def sizes(self, job_id: str, folder: str) -> dict[str, int]:
        prefix = self.key(job_id, folder) + "/"
        found = {o["Key"][len(prefix):]: int(o["Size"]) for o in self._list(prefix)}
        return {n: found[n] for n in sorted(found)}

    def download(self, job_id: str, name: str, target: Path) -> int:
        """GET one object into a local file; returns its bytes (counted in `bytes_read`)."""
        got = [0]

        def count(n: int) -> None:
            got[0] += n

        with self._errors(name):
            self.client.download_file(self.bucket, self.key(job_id, name), str(target), Config=self._transfer(),
                                      Callback=count)
        self.bytes_read.add(got[0])
        return got[0]

    @contextmanager
    def local(self, job_id: str, name: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(dir=scratch_root()) as d:
            path = Path(d) / name.rsplit("/", 1)[-1]
            self.download(job_id, name, path)
            yield path

    @contextmanager
    def fetch(self, job_id: str, folder: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(dir=scratch_root()) as d:
            root = Path(d) / folder.rsplit("/", 1)[-1]
            root.mkdir()
            for name in self.sizes(job_id, folder):
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self.download(job_id, f"{folder}/{name}", target)
            yield root

    @contextmanager
    def scratch(self, job_id: str, folder: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(dir=scratch_root()) as d:
            root = Path(d) / folder.rsplit("/", 1)[-1]
            root.mkdir()
            yield root

    def publish(self, job_id: str, folder: str, local: Path, last: Sequence[str] = ()) -> None:
        """Upload every file under `local` as `folder`/..., the names in `last` after all the
        others (a marker that says the rest is there, a manifest)."""
        local = Path(local)
        files = sorted((p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: (p.relative_to(local).as_posix() in last, p.relative_to(local).as_posix()))
        for p in files:
            name = f"{folder}/{p.relative_to(local).as_posix()}"
            with self._errors(name):
                self.client.upload_file(str(p), self.bucket, self.key(job_id, name), Config=self._transfer())

    def iter_range(self, job_id: str, name: str, start: int, stop: int) -> Iterator[bytes]:
        """Bytes [start, stop) of one object, streamed from one ranged GET."""
        if stop <= start:
            return
        with self._errors(name):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, name),
                                          Range=f"bytes={start}-{stop - 1}")["Body"]
            try:
                for chunk in body.iter_chunks(1 << 20):
                    self.bytes_read.add(len(chunk))
                    yield chunk
            finally:
                body.close()

    def presigned_url(self, job_id: str, name: str, expires_s: int, filename: str) -> str | None:
        with self._errors(name):
            return self.client.generate_presigned_url("get_object", ExpiresIn=expires_s, Params={
                "Bucket": self.bucket, "Key": self.key(job_id, name),
                "ResponseContentDisposition": f'attachment; filename="{filename}"'})

    def _delete_under(self, prefix: str) -> None:
        keys = [o["Key"] for o in self._list(prefix)]
        # Then the folders, deepest first: stores backed by a file system (SeaweedFS) keep empty
        # ones and list them as prefixes; on S3 itself these deletes of absent keys are no-ops.
        folders = {prefix} | {k[:i + 1] for k in keys for i in range(len(prefix), len(k)) if k[i] == "/"}
        batch = keys + sorted(folders, key=lambda f: -f.count("/"))
        with self._errors(prefix):
            for i in range(0, len(batch), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch[i:i + 1000]], "Quiet": True})
            for u in self._uploads(prefix):
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                except Exception as e:
                    if not isinstance(translate(e, prefix), FileNotFoundError):
                        raise

    def delete(self, job_id: str, folder: str) -> None:
        self._delete_under(self.key(job_id, folder) + "/")

    # -- jobs --------------------------------------------------------------------------------
    def rename_job(self, old: str, new: str) -> None:
        src, dst = self._job_key(old), self._job_key(new)
        objects = list(self._list(src))
        with self._errors(old):
            for o in objects:
                self.client.copy({"Bucket": self.bucket, "Key": o["Key"]}, self.bucket, dst + o["Key"][len(src):],
                                 Config=self._transfer())
        self._delete_under(src)

    def delete_job(self, job_id: str) -> None:
        self._delete_under(self._job_key(job_id))

    def jobs(self) -> Iterator[str]:
        """Every job or staging name with objects or an unfinished multipart upload."""
        root = self._jobs_key()
        names: set[str] = set()
        with self._errors(root):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root,
                                                                               Delimiter="/"):
                names.update(p["Prefix"][len(root):].rstrip("/") for p in page.get("CommonPrefixes", []))
        names.update(u["Key"][len(root):].split("/", 1)[0] for u in self._uploads(root))
        yield from sorted(n for n in names if n)

    def age_s(self, job_id: str) -> float:
        """Seconds since the newest object (or unfinished upload) of the job; inf if none."""
        prefix = self._job_key(job_id)
        stamps = [o["LastModified"].timestamp() for o in self._list(prefix)]
        stamps += [u["Initiated"].timestamp() for u in self._uploads(prefix)]
        return time.time() - max(stamps) if stamps else float("inf")
