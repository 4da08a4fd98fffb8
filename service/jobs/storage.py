"""Where uploads, clip results and outputs live: a directory on a shared volume.

Kept behind a small interface (`Storage`) so an S3-compatible store can follow; the API and
the workers go through it. Writes are atomic (temporary name, then rename), so a reader never
sees half a file and a redelivered task can rewrite its result safely; a failed write leaves
nothing behind, and a full disk is reported as `NoSpace`.
"""

from __future__ import annotations

import errno
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol


class NoSpace(Exception):
    """The disk filled up (ENOSPC/EDQUOT) while writing; the partial file is already gone."""


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class Storage(Protocol):
    def writer(self, job_id: str, name: str) -> AbstractContextManager[BinaryIO]: ...
    def write(self, job_id: str, name: str, data: bytes) -> None: ...
    def read(self, job_id: str, name: str) -> bytes: ...
    def exists(self, job_id: str, name: str) -> bool: ...
    def path(self, job_id: str, name: str) -> Path: ...
    def rename_job(self, old: str, new: str) -> None: ...
    def delete_job(self, job_id: str) -> None: ...
    def jobs(self) -> Iterator[str]: ...
    def age_s(self, job_id: str) -> float: ...


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def _job_dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"bad job id {job_id!r}")
        return self.root / "jobs" / job_id

    def path(self, job_id: str, name: str) -> Path:
        return self._job_dir(job_id) / name

    @contextmanager
    def writer(self, job_id: str, name: str) -> Iterator[BinaryIO]:
        """A file to stream into: renamed into place when the block ends without an error,
        removed otherwise. A full disk raises NoSpace."""
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

    def rename_job(self, old: str, new: str) -> None:
        self._job_dir(old).rename(self._job_dir(new))

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self._job_dir(job_id), ignore_errors=True)

    def jobs(self) -> Iterator[str]:
        yield from (p.name for p in (self.root / "jobs").iterdir() if p.is_dir())

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
