"""Where uploads, clip results and outputs live: a directory on a shared volume.

Kept behind a small interface (`Storage`) so an S3-compatible store can follow; everything
the queue and the API need goes through it. Writes are atomic (temporary name, then rename),
so a reader never sees half a file and a redelivered task can rewrite its result safely.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol


class TooLarge(Exception):
    """An upload went past the size limit; what was written is already gone."""


class Storage(Protocol):
    def save_stream(self, job_id: str, name: str, chunks: Iterable[bytes], limit: int) -> int: ...
    def write(self, job_id: str, name: str, data: bytes) -> None: ...
    def read(self, job_id: str, name: str) -> bytes: ...
    def exists(self, job_id: str, name: str) -> bool: ...
    def path(self, job_id: str, name: str) -> Path: ...
    def delete_job(self, job_id: str) -> None: ...
    def expire(self, older_than_s: float) -> list[str]: ...


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

    def _tmp(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")

    def save_stream(self, job_id: str, name: str, chunks: Iterable[bytes], limit: int) -> int:
        """Stream to disk without holding the data; over `limit` bytes raises TooLarge."""
        target = self.path(job_id, name)
        tmp = self._tmp(target)
        size = 0
        try:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"upload exceeds the limit of {limit} bytes")
                    f.write(chunk)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def write(self, job_id: str, name: str, data: bytes) -> None:
        target = self.path(job_id, name)
        tmp = self._tmp(target)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, job_id: str, name: str) -> bytes:
        return self.path(job_id, name).read_bytes()

    def exists(self, job_id: str, name: str) -> bool:
        return self.path(job_id, name).exists()

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self._job_dir(job_id), ignore_errors=True)

    def jobs(self) -> Iterator[str]:
        yield from (p.name for p in (self.root / "jobs").iterdir() if p.is_dir())

    def expire(self, older_than_s: float) -> list[str]:
        """Delete job directories untouched for longer than the TTL; returns their ids."""
        cutoff = time.time() - older_than_s
        gone = []
        for job_id in list(self.jobs()):
            d = self._job_dir(job_id)
            try:
                newest = max((p.stat().st_mtime for p in d.rglob("*")), default=d.stat().st_mtime)
            except FileNotFoundError:
                continue
            if newest < cutoff:
                self.delete_job(job_id)
                gone.append(job_id)
        return gone


def copy_file_chunks(f: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk
