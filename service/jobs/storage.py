"""Where uploads, clip results and outputs live: a directory (`LocalStorage`, the default) or an
S3-compatible object store (`service.jobs.s3_storage.S3Storage`, `STEMSEG_STORAGE_URL=s3://...`).

Both hold the same layout, owned here (`job_prefix`, `object_name`): a job's files under
`jobs/JOB_ID/` (service.jobs.files names them), below the directory or below the bucket's
prefix. Callers never need a path shared with another process: they stream into `writer`, read
with `read`, get a local file or folder for the span of a block (`local`, `fetch`, `scratch`)
and `publish` a folder they built locally; the API serves objects with `iter_range` or a
presigned URL. LocalStorage's local files *are* the store (`shared_paths`), so nothing is
copied and it behaves as it always has.

Writes are atomic (temporary name then rename; a multipart upload completed only when the block
ends without an error), so a reader never sees half a file and a redelivered task can rewrite its
result safely; a failed write leaves nothing behind. A full disk is `NoSpace`; a store that is
down or refuses (connection refused, 403, 5xx, quota) is `StoreUnavailable`; a missing file is
FileNotFoundError on both.
"""

from __future__ import annotations

import errno
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from service.config import Settings


class NoSpace(Exception):
    """The disk filled up (ENOSPC/EDQUOT) while writing; the partial file is already gone."""


class StoreUnavailable(Exception):
    """The object store failed: unreachable, timed out, refused (403) or full (quota). The
    message names the failure, never a bucket or path. `lasting`: retrying will not help
    (access denied, quota) until an operator acts."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


# -- the layout (one owner) ----------------------------------------------------------------------
JOBS = "jobs"


def check_job_name(job_id: str) -> str:
    """A job id or staging name as a single path segment (never a way out of the job's folder)."""
    if not job_id or "/" in job_id or job_id.startswith(".") or "\\" in job_id:
        raise ValueError(f"bad job id {job_id!r}")
    return job_id


def job_prefix(job_id: str) -> str:
    """The job's folder, relative to the store's root: `jobs/JOB_ID`."""
    return f"{JOBS}/{check_job_name(job_id)}"


def object_name(job_id: str, name: str) -> str:
    """One file of a job, relative to the store's root: `jobs/JOB_ID/NAME`."""
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"bad file name {name!r}")
    return f"{job_prefix(job_id)}/{name}"


class Storage(Protocol):
    #: True when `path()`'s files are the store itself (a directory shared by every process).
    shared_paths: bool

    def writer(self, job_id: str, name: str, *, seekable: bool = False) -> AbstractContextManager[BinaryIO]: ...
    def write(self, job_id: str, name: str, data: bytes) -> None: ...
    def read(self, job_id: str, name: str) -> bytes: ...
    def exists(self, job_id: str, name: str) -> bool: ...
    def size(self, job_id: str, name: str) -> int: ...
    def sizes(self, job_id: str, folder: str) -> dict[str, int]: ...
    def local(self, job_id: str, name: str) -> AbstractContextManager[Path]: ...
    def download(self, job_id: str, name: str, target: Path) -> int: ...
    def fetch(self, job_id: str, folder: str) -> AbstractContextManager[Path]: ...
    def scratch(self, job_id: str, folder: str) -> AbstractContextManager[Path]: ...
    def publish(self, job_id: str, folder: str, local: Path, last: Sequence[str] = ()) -> None: ...
    def iter_range(self, job_id: str, name: str, start: int, stop: int) -> Iterator[bytes]: ...
    def presigned_url(self, job_id: str, name: str, expires_s: int, filename: str) -> str | None: ...
    def delete(self, job_id: str, folder: str) -> None: ...
    def rename_job(self, old: str, new: str) -> None: ...
    def delete_job(self, job_id: str) -> None: ...
    def jobs(self) -> Iterator[str]: ...
    def age_s(self, job_id: str) -> float: ...


class LocalStorage:
    """A directory (on a volume every process mounts when there are several)."""

    shared_paths = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / JOBS).mkdir(parents=True, exist_ok=True)

    def _job_dir(self, job_id: str) -> Path:
        return self.root / job_prefix(job_id)

    def path(self, job_id: str, name: str) -> Path:
        return self.root / object_name(job_id, name)

    @contextmanager
    def writer(self, job_id: str, name: str, *, seekable: bool = False) -> Iterator[BinaryIO]:
        """A file to stream into: renamed into place when the block ends without an error,
        removed otherwise. A full disk raises NoSpace. (Always seekable: it is a file.)"""
        target = self.path(job_id, name)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                yield f
            tmp.replace(target)
        except OSError as e:
            if is_no_space(e):
                raise NoSpace(f"no space left on device while writing {name}") from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, job_id: str, name: str, data: bytes) -> None:
        with self.writer(job_id, name) as f:
            f.write(data)

    def read(self, job_id: str, name: str) -> bytes:
        return self.path(job_id, name).read_bytes()

    def exists(self, job_id: str, name: str) -> bool:
        return self.path(job_id, name).exists()

    def size(self, job_id: str, name: str) -> int:
        path = self.path(job_id, name)
        if not path.is_file():
            raise FileNotFoundError(name)
        return path.stat().st_size

    def sizes(self, job_id: str, folder: str) -> dict[str, int]:
        """Every file under `folder` (names relative to it, sorted) with its size; {} if none."""
        root = self.path(job_id, folder)
        if not root.is_dir():
            return {}
        found = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
        return {n: found[n].stat().st_size for n in sorted(found)}

    @contextmanager
    def local(self, job_id: str, name: str) -> Iterator[Path]:
        """A local file holding `name` for the block: here, the file itself."""
        yield self.path(job_id, name)

    def download(self, job_id: str, name: str, target: Path) -> int:
        shutil.copyfile(self.path(job_id, name), target)
        return target.stat().st_size

    @contextmanager
    def fetch(self, job_id: str, folder: str) -> Iterator[Path]:
        """A local directory holding `folder`'s files for the block: here, the folder itself."""
        yield self.path(job_id, folder)

    @contextmanager
    def scratch(self, job_id: str, folder: str) -> Iterator[Path]:
        """A local directory to build files of `folder` in, then `publish`: here, the folder
        itself (made if needed), so publishing costs nothing."""
        d = self.path(job_id, folder)
        d.mkdir(parents=True, exist_ok=True)
        yield d

    def publish(self, job_id: str, folder: str, local: Path, last: Sequence[str] = ()) -> None:
        """Make every file under `local` part of `folder`. From `scratch` they already are."""
        target = self.path(job_id, folder)
        if Path(local).resolve() == target.resolve():
            return
        for p in sorted(Path(local).rglob("*"), key=lambda p: p.relative_to(local).as_posix() in last):
            if p.is_file():
                name = f"{folder}/{p.relative_to(local).as_posix()}"
                with self.writer(job_id, name) as out, p.open("rb") as f:
                    shutil.copyfileobj(f, out)

    def iter_range(self, job_id: str, name: str, start: int, stop: int) -> Iterator[bytes]:
        with self.path(job_id, name).open("rb") as f:
            f.seek(start)
            left = stop - start
            while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                left -= len(chunk)
                yield chunk

    def presigned_url(self, job_id: str, name: str, expires_s: int, filename: str) -> str | None:
        return None  # a directory has no URLs: the API serves the file itself

    def delete(self, job_id: str, folder: str) -> None:
        shutil.rmtree(self.path(job_id, folder), ignore_errors=True)

    def rename_job(self, old: str, new: str) -> None:
        self._job_dir(old).rename(self._job_dir(new))

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self._job_dir(job_id), ignore_errors=True)

    def jobs(self) -> Iterator[str]:
        yield from (p.name for p in (self.root / JOBS).iterdir() if p.is_dir())

    def age_s(self, job_id: str) -> float:
        """Seconds since anything in the job's directory last changed (inf once it is gone)."""
        d = self._job_dir(job_id)
        try:
            newest = d.stat().st_mtime
        except FileNotFoundError:
            return float("inf")
        for p in d.rglob("*"):
            try:
                newest = max(newest, p.stat().st_mtime)
            except FileNotFoundError:  # renamed or deleted during the walk (an upload being finished)
                return 0.0
        return time.time() - newest


def open_storage(settings: Settings) -> Storage:
    """The store the settings choose: `STEMSEG_STORAGE_URL` (s3://BUCKET/PREFIX) or, when it is
    empty, the directory `STEMSEG_DATA_DIR`."""
    url = settings.storage_url
    if not url:
        return LocalStorage(settings.data_dir)
    from service.jobs.s3_storage import S3Storage

    return S3Storage.from_settings(settings)


def scratch_root() -> Path:
    """Where a process keeps its local copies of objects: under its own TMPDIR (nothing shared with
    other machines), each use in a fresh temporary file or directory of its own that it removes."""
    import tempfile

    root = Path(tempfile.gettempdir()) / "stemseg"
    root.mkdir(parents=True, exist_ok=True)
    return root
