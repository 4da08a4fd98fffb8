"""A worker's local copies of objects it reads whole many times (a job's video): each fetched
from the store at most once while it stays cached, not once per task.

A video is cut into many tasks (clip tasks, output tasks), and a worker takes several of one
job; each needs a local, seekable file for FFmpeg. With an object store, downloading it per
task would read the whole video T times; here it is downloaded once into this worker's own
directory (under its TMPDIR) and kept, least recently used dropped first once the copies pass
`STEMSEG_CACHE_BYTES`. A copy in use (`local` block open) is never dropped; a copy larger
than the whole budget is kept only while in use. Concurrent task slots asking for the same
object wait for one download. With a store whose paths are shared (LocalStorage) the file
itself is used and nothing is copied.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.jobs import files
from service.jobs.storage import Storage, check_job_name, scratch_root
from service.video.decode import forget as forget_video

log = logging.getLogger("stemseg.cache")


def _process_tag(pid: int) -> str:
    """PID and start time (Linux /proc; "0" elsewhere): unlike a PID alone, never reused by a
    later process, such as the same worker restarted in its container."""
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    return f"{pid}-{started}"


def _alive(name: str) -> bool:
    """Whether the process that made cache folder `name` (cache-PID-START-TAG) still runs."""
    parts = name.split("-")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    pid, started = int(parts[1]), parts[2]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return started == "0" or _process_tag(pid) == f"{pid}-{started}"


class FileCache:
    def __init__(self, storage: Storage, root: Path, max_bytes: int) -> None:
        self.storage, self.root, self.max_bytes = storage, Path(root), max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], int] = OrderedDict()  # (job, name) -> bytes, LRU first
        self._pins: dict[tuple[str, str], int] = {}
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._fetched = threading.local()
        if not storage.shared_paths:
            self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def of(cls, storage: Storage, max_bytes: int) -> FileCache:
        """This process's cache for `storage`, in its own scratch space (service.jobs.storage).
        The caches of dead processes there are deleted first: a worker killed and restarted in
        the same pod (whose emptyDir outlives it) would otherwise leave a full cache per crash."""
        if storage.shared_paths:
            return cls(storage, Path(), max_bytes)  # never written: the store's own files are used
        root = scratch_root()
        for old in root.glob("cache-*"):
            if not _alive(old.name):
                shutil.rmtree(old, ignore_errors=True)
        return cls(storage, root / f"cache-{_process_tag(os.getpid())}-{uuid.uuid4().hex[:8]}", max_bytes)

    def _path(self, job_id: str, name: str) -> Path:
        return self.root / check_job_name(job_id) / name

    def take_fetched(self) -> int:
        """Bytes this thread downloaded into the cache since it last asked (a task's cost)."""
        n, self._fetched.n = getattr(self._fetched, "n", 0), 0
        return n

    @contextmanager
    def local(self, job_id: str, name: str) -> Iterator[Path]:
        """A local file holding the object for the block (fetched now unless cached)."""
        if self.storage.shared_paths:
            yield self.storage.path(job_id, name)  # type: ignore[attr-defined]
            return
        key = (job_id, name)
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
            loading = self._loading.setdefault(key, threading.Lock())
        try:
            with loading:  # one download per object, whoever asks first
                with self._lock:
                    cached = key in self._entries
                    if cached:
                        self._entries.move_to_end(key)
                if not cached:
                    self._fetch(key)
            yield self._path(job_id, name)
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]
                self._evict()

    def _fetch(self, key: tuple[str, str]) -> None:
        target = self._path(*key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            n = self.storage.download(key[0], key[1], tmp)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        self._fetched.n = getattr(self._fetched, "n", 0) + n
        with self._lock:
            self._entries[key] = n
            self._evict()
        log.info("cached %s of job %s (%d bytes)", key[1], key[0], n)

    def _evict(self) -> None:
        """Drop least recently used copies not in use until within the budget (lock held)."""
        total = sum(self._entries.values())
        for key in list(self._entries):
            if total <= self.max_bytes:
                break
            if key in self._pins:
                continue
            total -= self._entries.pop(key)
            self._remove(key)

    def _remove(self, key: tuple[str, str]) -> None:
        path = self._path(*key)
        forget_video(path)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass
        self._loading.pop(key, None) if key not in self._pins else None

    def forget(self, job_id: str) -> None:
        """The job is gone: drop its copies (and what the decoder knows of its files)."""
        if self.storage.shared_paths:
            forget_video(self.storage.path(job_id, files.VIDEO))  # type: ignore[attr-defined]
            return
        with self._lock:
            for key in [k for k in self._entries if k[0] == job_id and k not in self._pins]:
                del self._entries[key]
                self._remove(key)

    def close(self) -> None:
        """Delete every copy (the worker is stopping)."""
        if not self.storage.shared_paths:
            with self._lock:
                self._entries.clear()
            shutil.rmtree(self.root, ignore_errors=True)

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(self._entries.values())
