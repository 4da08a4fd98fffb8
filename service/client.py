"""A Python client of the stemseg-serve API, sync (`Client`) and async (`AsyncClient`), on httpx.

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit("video.mp4", formats=["ytvis", "overlay"])
        job.wait(progress=True)              # follows the event stream; JobFailed if it failed
        tracks = job.result()["tracks"]      # id, category, score, RLE per frame, boxes
        job.download("video_stemseg")        # the folder `stemseg segment` writes, manifest included

Every error the service answers is raised as a `ServiceError` subclass carrying the RFC 9457
problem (`.status`, `.title`, `.detail`, `.problem`). 429 and 503 are retried after the
server's Retry-After (an upload too: its file is sent again from the start), and GET/DELETE
also after a dropped connection. `Job.events()` yields the job's server-sent events and
reconnects with Last-Event-ID where the stream dropped, so no event is lost or repeated.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import mimetypes
import os
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

import httpx

FINAL = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20


def _store_location(response: httpx.Response) -> str | None:
    """Where a result lives when the service answers 307 to a presigned URL of its object store
    (STEMSEG_RESULTS_REDIRECT). Followed by a request of its own, without this client's headers:
    the API key is for the API, never for the store's host."""
    if response.status_code in (307, 308) and response.headers.get("location"):
        return response.headers["location"]
    return None


@contextmanager
def _get_stream(http: httpx.Client, url: str) -> Iterator[httpx.Response]:
    with http.stream("GET", url) as response:
        location = _store_location(response)
        if location is None:
            yield response
            return
    with httpx.stream("GET", location, timeout=http.timeout) as response:
        yield response


@asynccontextmanager
async def _aget_stream(http: httpx.AsyncClient, url: str) -> AsyncIterator[httpx.Response]:
    async with http.stream("GET", url) as response:
        location = _store_location(response)
        if location is None:
            yield response
            return
    async with httpx.AsyncClient(timeout=http.timeout) as plain, plain.stream("GET", location) as response:
        yield response
# Statuses worth retrying: the server says when (Retry-After), nothing was done.
RETRY_STATUSES = (429, 503)


# --- errors -----------------------------------------------------------------------------------
class ServiceError(Exception):
    """An error answer of the service, with its problem+json (RFC 9457) body."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: float | None = None) -> None:
        self.status = status
        self.problem = problem
        self.title: str = str(problem.get("title") or f"HTTP {status}")
        self.detail: str = str(problem.get("detail") or "")
        self.retry_after = retry_after
        super().__init__(f"{status} {self.title}: {self.detail}" if self.detail else f"{status} {self.title}")


class BadRequest(ServiceError):
    """400: not a usable video, or a malformed request."""


class Unauthorized(ServiceError):
    """401: no API key, or a wrong one."""


class NotFound(ServiceError):
    """404: no such job (or another key's)."""


class Conflict(ServiceError):
    """409: the job has not succeeded, or was not asked for that output."""


class Gone(ServiceError):
    """410: the job's output files are gone from the server."""


class TooLarge(ServiceError):
    """413: the upload, its frames or its duration is over a limit."""


class UnsupportedMedia(ServiceError):
    """415: the upload's content type is not accepted."""


class InvalidRequest(ServiceError):
    """422: a parameter is out of range or unknown (formats, min_dim, callback_url...)."""


class RateLimited(ServiceError):
    """429: rate limit or job quota reached (retried first, up to the client's retries)."""


class Unavailable(ServiceError):
    """503: Redis is unreachable or too many event streams are open (retried first)."""


class InsufficientStorage(ServiceError):
    """507: the server's disk is full."""


class ServerError(ServiceError):
    """Any other 5xx."""


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 410: Gone, 413: TooLarge,
    415: UnsupportedMedia, 422: InvalidRequest, 429: RateLimited, 503: Unavailable, 507: InsufficientStorage}


class JobFailed(Exception):
    """The job ended failed or cancelled; `.job` is its last JSON (`.job["error"]`: the reason)."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        reason = job.get("error") or job["status"]
        super().__init__(f"job {job['id']} {job['status']}: {reason}")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:  # an HTTP date
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def error_from(response: httpx.Response) -> ServiceError:
    """The typed error for an error response (its body read already)."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"title": response.reason_phrase or f"HTTP {response.status_code}",
                   "detail": response.text[:500], "status": response.status_code}
    cls = _BY_STATUS.get(response.status_code) or (ServerError if response.status_code >= 500 else ServiceError)
    return cls(response.status_code, problem, _retry_after(response))


# --- what the sync and async clients share ----------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One server-sent event of a job: `type` is status, frame, track, end or error."""

    id: str | None
    type: str
    data: dict[str, Any]


# What a comment line (the server's keep-alive) gives: not an event, but proof the stream lives.
KEEPALIVE = Event(None, "keep-alive", {})


class _SSEParser:
    """Lines of a text/event-stream in, events out (comments and keep-alives dropped)."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self._data and self._type == "message":
                return None
            text = "\n".join(self._data)
            event = Event(self._id, self._type, json.loads(text) if text else {})
            self._id, self._type, self._data = None, "message", []
            return event
        if line.startswith(":"):
            return KEEPALIVE
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self._id = value
        elif name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        return None


@dataclass
class _Retry:
    """How long to wait before try number `attempt` (0-based) of a request that got `error`."""

    retries: int
    max_wait_s: float

    def delay(self, attempt: int, error: ServiceError | None) -> float | None:
        if attempt >= self.retries:
            return None
        if error is not None and error.retry_after is not None:
            return min(error.retry_after, self.max_wait_s)
        return min(self.max_wait_s, 0.5 * 2 ** attempt) * (0.5 + random.random() / 2)


def _formats_param(formats: Sequence[str] | str | None) -> dict[str, str]:
    if formats is None:
        return {}
    return {"formats": formats if isinstance(formats, str) else ",".join(formats)}


def _source_body(url: str, formats, callback_url: str | None, min_dim: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"source": url}
    if formats is not None:
        body["formats"] = [f for f in (formats.split(",") if isinstance(formats, str) else formats) if f]
    if callback_url is not None:
        body["callback_url"] = callback_url
    if min_dim is not None:
        body["min_dim"] = min_dim
    return body


def _stream_body(url: str, formats: Sequence[str] | None, max_duration_s: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url}
    if formats is not None:
        body["formats"] = list(formats)
    if max_duration_s is not None:
        body["max_duration_s"] = max_duration_s
    return body


def _upload_params(formats, callback_url: str | None, min_dim: int | None) -> dict[str, str]:
    params = _formats_param(formats)
    if callback_url:
        params["callback_url"] = callback_url
    if min_dim is not None:
        params["min_dim"] = str(min_dim)
    return params


class _Source:
    """What `submit` uploads: a path, bytes or a binary file object; sent again from its start on a
    retry, in chunks that report progress."""

    def __init__(self, source: str | os.PathLike | bytes | BinaryIO, filename: str | None) -> None:
        self._owned: BinaryIO | None = None
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            self._owned = self.file = path.open("rb")
            self.filename = filename or path.name
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self.file = io.BytesIO(bytes(source))
            self.filename = filename
        else:
            self.file = source
            self.filename = filename or os.path.basename(str(getattr(source, "name", ""))) or None
        self.start = self.file.tell() if self.file.seekable() else 0
        try:
            self.size: int | None = os.fstat(self.file.fileno()).st_size - self.start
        except (AttributeError, OSError, io.UnsupportedOperation):
            self.size = len(self.file.getvalue()) - self.start if isinstance(self.file, io.BytesIO) else None

    def headers(self) -> dict[str, str]:
        kind = mimetypes.guess_type(self.filename or "")[0] or ""
        headers = {"Content-Type": kind if kind.startswith("video/") else "application/octet-stream"}
        if self.filename:
            # Header values are latin-1: a name that is not keeps only its ASCII characters.
            headers["X-Filename"] = self.filename.encode("ascii", "ignore").decode() or "video"
        if self.size is not None:
            headers["Content-Length"] = str(self.size)
        return headers

    def rewind(self) -> None:
        if not self.file.seekable():
            raise RuntimeError("the upload cannot be retried: its file object is not seekable")
        self.file.seek(self.start)

    def chunks(self, progress: Callable[[int], None] | None) -> Iterator[bytes]:
        while chunk := self.file.read(CHUNK):
            if progress is not None:
                progress(len(chunk))
            yield chunk

    async def achunks(self, progress: Callable[[int], None] | None) -> AsyncIterator[bytes]:
        for chunk in self.chunks(progress):
            yield chunk

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def _bar(total: int | None, unit: str, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                desc=desc, disable=not enabled, leave=True)


def _frames_done(event: Event, done: int) -> int:
    return max(done, int(event.data["frame"]) + 1) if event.type == "frame" else done


def _fill_from(files: list[dict[str, Any]], fetch: Callable[[str, Path], None]) -> Callable[[Path, list[str]], None]:
    """The `publish_output` filler that downloads the server's output files (its manifest aside:
    publish_output writes the same one from what arrived)."""
    from service.outputs.write import MANIFEST

    def fill(tmp: Path, formats: list[str]) -> None:
        for f in files:
            if f["path"] == MANIFEST:
                continue
            target = tmp / f["path"]
            if target.resolve().parent != tmp.resolve() and tmp.resolve() not in target.resolve().parents:
                raise ValueError(f"the server listed a file outside the output folder: {f['path']!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            fetch(f["url"], target)
            if target.stat().st_size != f["size"]:
                raise OSError(f"{f['path']}: got {target.stat().st_size} of {f['size']} bytes")
    return fill


# --- sync -------------------------------------------------------------------------------------
class Client:
    """The service at `url`. `retries` retries on 429/503 (after Retry-After, at most
    `max_retry_wait_s` each) and, for GET/DELETE, on dropped connections."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0, retries: int = 5,
                 max_retry_wait_s: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._retry = _Retry(retries, max_retry_wait_s)
        self._http = httpx.Client(base_url=self.url, headers=_headers(api_key), transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, source: _Source | None = None,
                progress: Callable[[int], None] | None = None, **kwargs: Any) -> httpx.Response:
        """One API call with the retry rules; an error answer raises its ServiceError."""
        attempt = 0
        while True:
            error: ServiceError | None = None
            try:
                if source is not None:
                    source.rewind()
                    kwargs["content"] = source.chunks(progress)
                response = self._http.request(method, path, **kwargs)
                if method == "GET" and (location := _store_location(response)) is not None:
                    response = httpx.get(location, timeout=self._http.timeout)
            except httpx.TransportError:
                # An upload may have been received: never resent after a lost answer.
                if method not in ("GET", "DELETE", "HEAD") or (wait := self._retry.delay(attempt, None)) is None:
                    raise
                time.sleep(wait)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            error = error_from(response)
            if response.status_code not in RETRY_STATUSES or (wait := self._retry.delay(attempt, error)) is None:
                raise error
            time.sleep(wait)
            attempt += 1

    def submit(self, source: str | os.PathLike | bytes | BinaryIO, formats: Sequence[str] | str | None = None, *,
               callback_url: str | None = None, min_dim: int | None = None, filename: str | None = None,
               progress: bool | Callable[[int], None] = False) -> Job:
        """Upload a video (a path, bytes or a binary file) and return its queued Job. progress:
        True for a tqdm bar on stderr, or a callable given the bytes of each chunk sent."""
        src = _Source(source, filename)
        try:
            with _bar(src.size, "B", "upload", progress is True) as bar:
                callback = progress if callable(progress) else bar.update
                response = self.request("POST", "/v1/jobs", source=src, progress=callback, headers=src.headers(),
                                        params=_upload_params(formats, callback_url, min_dim))
        finally:
            src.close()
        return Job(self, response.json())

    def submit_url(self, url: str, formats: Sequence[str] | str | None = None, *, callback_url: str | None = None,
                   min_dim: int | None = None) -> Job:
        """A job of a video the service fetches itself (its host must be in the service's
        STEMSEG_SOURCE_HOSTS); returns it queued, once fetched and admitted."""
        body = _source_body(url, formats, callback_url, min_dim)
        return Job(self, self.request("POST", "/v1/jobs", json=body).json())

    def job(self, job_id: str) -> Job:
        return Job(self, self.request("GET", f"/v1/jobs/{job_id}").json())

    def stream(self, url: str, formats: Sequence[str] | None = None, *,
               max_duration_s: float | None = None) -> LiveStream:
        """Have the service segment a live source (its host listed in the service's
        STEMSEG_STREAM_HOSTS) until it ends, is stopped or max_duration_s passes."""
        return LiveStream(self, self.request("POST", "/v1/streams", json=_stream_body(url, formats,
                                                                                      max_duration_s)).json())

    def jobs(self, offset: int = 0, limit: int = 20) -> list[Job]:
        """This API key's jobs, newest first."""
        page = self.request("GET", "/v1/jobs", params={"offset": offset, "limit": limit}).json()
        return [Job(self, j) for j in page["items"]]

    def ready(self) -> dict[str, Any]:
        """/readyz: raises Unavailable without a live worker (after the retries)."""
        return self.request("GET", "/readyz").json()


class Job:
    """A job of the service: `.data` is its JSON as last fetched (`refresh()` fetches again)."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        self.client, self.data = client, data
        self.id: str = data["id"]

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status}>"

    @property
    def status(self) -> str:
        return self.data["status"]

    def refresh(self) -> Job:
        self.data = self.client.request("GET", f"/v1/jobs/{self.id}").json()
        return self

    def events(self, last_event_id: str | None = None, *, max_reconnects: int = 10,
               keepalives: bool = False) -> Iterator[Event]:
        """The job's events until `end`, reconnecting with Last-Event-ID after a dropped
        stream (at most max_reconnects times in a row without an event); with keepalives,
        the server's keep-alive comments too (as KEEPALIVE)."""
        return _follow(self.client, f"/v1/jobs/{self.id}/events", f"job {self.id}", last_event_id,
                       max_reconnects, keepalives)

    def wait(self, timeout: float | None = None, *, progress: bool = False, raise_on_failure: bool = True) -> Job:
        """Follow the events until the job ends, then refresh. timeout (seconds) is checked as events
        and the server's keep-alives (every STEMSEG_SSE_KEEPALIVE_S) arrive. progress: a tqdm bar of
        frames on stderr. JobFailed if it failed or was cancelled (unless raise_on_failure=False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        total = self.data["progress"]["frames_total"] or None
        with _bar(total, "frame", "segment", progress) as bar:
            done = self.data["progress"]["frames_done"]
            bar.update(done)
            for event in self.events(keepalives=True):  # a deadline is checked at least every keep-alive
                new = _frames_done(event, done)
                bar.update(new - done)
                done = new
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} has not ended after {timeout} s")
        self.refresh()
        if raise_on_failure and self.status in ("failed", "cancelled"):
            raise JobFailed(self.data)
        return self

    def result(self, format: str = "json") -> Any:
        """The tracks as JSON (a dict), or `davis` (zip bytes) or `mots` (text)."""
        response = self.client.request("GET", f"/v1/jobs/{self.id}/result", params={"format": format})
        return response.json() if format == "json" else response.content if format == "davis" else response.text

    def files(self) -> dict[str, Any]:
        """The output folder's formats and files (path, size, url)."""
        return self.client.request("GET", f"/v1/jobs/{self.id}/files").json()

    def download(self, out_dir: str | os.PathLike, *, replace: bool = False) -> dict[str, Path]:
        """Write the job's output folder to out_dir under `stemseg segment`'s rules (absent or empty,
        or with replace a previous output; atomic, with its manifest). Returns format -> path."""
        from service.outputs.write import check_output_dir, publish_output

        check_output_dir(Path(os.path.abspath(out_dir)), replace=replace)  # before any download
        listing = self.files()

        def fetch(url: str, target: Path) -> None:
            with _get_stream(self.client._http, url) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from(response)
                with target.open("wb") as f:
                    for chunk in response.iter_bytes(CHUNK):
                        f.write(chunk)

        return publish_output(Path(out_dir), listing["formats"], _fill_from(listing["files"], fetch), replace=replace)

    def cancel(self) -> None:
        """Stop the job: the service's DELETE cancels a queued or running job and removes it with
        its files (there is no cancelled job left to look at)."""
        self.client.request("DELETE", f"/v1/jobs/{self.id}")

    def delete(self) -> None:
        """Remove the job's record and files (a running job is cancelled first)."""
        self.client.request("DELETE", f"/v1/jobs/{self.id}")


def _follow(client: Client, path: str, what: str, last_event_id: str | None, max_reconnects: int,
            keepalives: bool) -> Iterator[Event]:
    """Server-sent events at `path` until `end` (a job's or a live stream's), resuming with
    Last-Event-ID after a dropped stream."""
    failures = 0
    while True:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with client._http.stream("GET", path, headers=headers,
                                     timeout=httpx.Timeout(60.0, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    error = error_from(response)
                    if response.status_code not in RETRY_STATUSES:
                        raise error
                    raise _Dropped(error)
                parser = _SSEParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is None or (event is KEEPALIVE and not keepalives):
                        continue
                    failures = 0
                    if event.id:
                        last_event_id = event.id
                    yield event
                    if event.type == "end":
                        return
        except (httpx.TransportError, _Dropped) as e:
            error = e.error if isinstance(e, _Dropped) else None
            wait = client._retry.delay(failures, error) if failures < max_reconnects else None
            if wait is None:
                raise error if error is not None else e
        else:  # ended without `end` (the server's sse_max_s, or an error event): resume
            wait = client._retry.delay(failures, None) if failures < max_reconnects else None
            if wait is None:
                raise ConnectionError(f"the event stream of {what} keeps ending without an end event")
        failures += 1
        time.sleep(wait)


class LiveStream:
    """A live stream the service segments (POST /v1/streams): `.data` is its JSON as last fetched."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        self.client, self.data = client, data
        self.id: str = data["id"]

    def __repr__(self) -> str:
        return f"<LiveStream {self.id} {self.status}>"

    @property
    def status(self) -> str:
        return self.data["status"]

    def refresh(self) -> LiveStream:
        self.data = self.client.request("GET", f"/v1/streams/{self.id}").json()
        return self

    def events(self, last_event_id: str | None = None, *, max_reconnects: int = 10,
               keepalives: bool = False) -> Iterator[Event]:
        """status, frame (each frame's tracks as they are final), gap and track events until `end`,
        resuming with Last-Event-ID after a dropped connection."""
        return _follow(self.client, f"/v1/streams/{self.id}/events", f"stream {self.id}", last_event_id,
                       max_reconnects, keepalives)

    def stop(self) -> LiveStream:
        """DELETE: the service stops reading and writes the outputs of what it saw (kept until expiry)."""
        self.data = self.client.request("DELETE", f"/v1/streams/{self.id}").json()
        return self


class _Dropped(Exception):
    def __init__(self, error: ServiceError) -> None:
        self.error = error


# --- async ------------------------------------------------------------------------------------
class AsyncClient:
    """`Client` for asyncio: the same calls, awaited (`events()` is an async iterator)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0, retries: int = 5,
                 max_retry_wait_s: float = 60.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._retry = _Retry(retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key), transport=transport,
                                       timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, *, source: _Source | None = None,
                      progress: Callable[[int], None] | None = None, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                if source is not None:
                    source.rewind()
                    kwargs["content"] = source.achunks(progress)
                response = await self._http.request(method, path, **kwargs)
                if method == "GET" and (location := _store_location(response)) is not None:
                    async with httpx.AsyncClient(timeout=self._http.timeout) as plain:
                        response = await plain.get(location)
            except httpx.TransportError:
                if method not in ("GET", "DELETE", "HEAD") or (wait := self._retry.delay(attempt, None)) is None:
                    raise
                await asyncio.sleep(wait)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            error = error_from(response)
            if response.status_code not in RETRY_STATUSES or (wait := self._retry.delay(attempt, error)) is None:
                raise error
            await asyncio.sleep(wait)
            attempt += 1

    async def submit(self, source: str | os.PathLike | bytes | BinaryIO, formats: Sequence[str] | str | None = None,
                     *, callback_url: str | None = None, min_dim: int | None = None, filename: str | None = None,
                     progress: Callable[[int], None] | None = None) -> AsyncJob:
        src = _Source(source, filename)
        try:
            response = await self.request("POST", "/v1/jobs", source=src, progress=progress, headers=src.headers(),
                                          params=_upload_params(formats, callback_url, min_dim))
        finally:
            src.close()
        return AsyncJob(self, response.json())

    async def submit_url(self, url: str, formats: Sequence[str] | str | None = None, *,
                         callback_url: str | None = None, min_dim: int | None = None) -> AsyncJob:
        """As Client.submit_url."""
        body = _source_body(url, formats, callback_url, min_dim)
        return AsyncJob(self, (await self.request("POST", "/v1/jobs", json=body)).json())

    async def stream(self, url: str, formats: Sequence[str] | None = None, *,
                     max_duration_s: float | None = None) -> AsyncLiveStream:
        """`Client.stream` for asyncio."""
        return AsyncLiveStream(self, (await self.request("POST", "/v1/streams",
                                                         json=_stream_body(url, formats, max_duration_s))).json())

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, (await self.request("GET", f"/v1/jobs/{job_id}")).json())

    async def jobs(self, offset: int = 0, limit: int = 20) -> list[AsyncJob]:
        page = (await self.request("GET", "/v1/jobs", params={"offset": offset, "limit": limit})).json()
        return [AsyncJob(self, j) for j in page["items"]]

    async def ready(self) -> dict[str, Any]:
        return (await self.request("GET", "/readyz")).json()


class AsyncJob:
    """`Job` for asyncio."""

    def __init__(self, client: AsyncClient, data: dict[str, Any]) -> None:
        self.client, self.data = client, data
        self.id: str = data["id"]

    def __repr__(self) -> str:
        return f"<AsyncJob {self.id} {self.status}>"

    @property
    def status(self) -> str:
        return self.data["status"]

    async def refresh(self) -> AsyncJob:
        self.data = (await self.client.request("GET", f"/v1/jobs/{self.id}")).json()
        return self

    def events(self, last_event_id: str | None = None, *, max_reconnects: int = 10,
               keepalives: bool = False) -> AsyncIterator[Event]:
        return _afollow(self.client, f"/v1/jobs/{self.id}/events", f"job {self.id}", last_event_id,
                        max_reconnects, keepalives)

    async def wait(self, timeout: float | None = None, *, progress: Callable[[int, int], None] | None = None,
                   raise_on_failure: bool = True) -> AsyncJob:
        """Follow the events until the job ends; progress(frames_done, frames_total) on each frame."""
        total = self.data["progress"]["frames_total"]
        done = self.data["progress"]["frames_done"]

        async def follow() -> None:
            nonlocal done
            async for event in self.events():
                new = _frames_done(event, done)
                if new != done and progress is not None:
                    progress(new, total)
                done = new

        try:
            await asyncio.wait_for(follow(), timeout)
        except TimeoutError:
            raise TimeoutError(f"job {self.id} has not ended after {timeout} s") from None
        await self.refresh()
        if raise_on_failure and self.status in ("failed", "cancelled"):
            raise JobFailed(self.data)
        return self

    async def result(self, format: str = "json") -> Any:
        response = await self.client.request("GET", f"/v1/jobs/{self.id}/result", params={"format": format})
        return response.json() if format == "json" else response.content if format == "davis" else response.text

    async def files(self) -> dict[str, Any]:
        return (await self.client.request("GET", f"/v1/jobs/{self.id}/files")).json()

    async def download(self, out_dir: str | os.PathLike, *, replace: bool = False) -> dict[str, Path]:
        """As Job.download; the files are streamed into a temporary directory, then published."""
        from service.outputs.write import check_output_dir, publish_output

        check_output_dir(Path(os.path.abspath(out_dir)), replace=replace)  # before any download
        listing = await self.files()
        with tempfile.TemporaryDirectory(prefix="stemseg-download-") as staging:
            fetched: dict[str, Path] = {}
            for i, f in enumerate(listing["files"]):
                part = Path(staging) / str(i)
                async with _aget_stream(self.client._http, f["url"]) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise error_from(response)
                    with part.open("wb") as out:
                        async for chunk in response.aiter_bytes(CHUNK):
                            out.write(chunk)
                fetched[f["url"]] = part

            def fetch(url: str, target: Path) -> None:
                shutil.move(fetched[url], target)

            return publish_output(Path(out_dir), listing["formats"], _fill_from(listing["files"], fetch),
                                  replace=replace)

    async def cancel(self) -> None:
        await self.client.request("DELETE", f"/v1/jobs/{self.id}")

    async def delete(self) -> None:
        await self.client.request("DELETE", f"/v1/jobs/{self.id}")


async def _afollow(client: AsyncClient, path: str, what: str, last_event_id: str | None, max_reconnects: int,
                   keepalives: bool) -> AsyncIterator[Event]:
    """`_follow` for asyncio."""
    failures = 0
    while True:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            async with client._http.stream("GET", path, headers=headers,
                                           timeout=httpx.Timeout(60.0, read=None)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    error = error_from(response)
                    if response.status_code not in RETRY_STATUSES:
                        raise error
                    raise _Dropped(error)
                parser = _SSEParser()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is None or (event is KEEPALIVE and not keepalives):
                        continue
                    failures = 0
                    if event.id:
                        last_event_id = event.id
                    yield event
                    if event.type == "end":
                        return
        except (httpx.TransportError, _Dropped) as e:
            error = e.error if isinstance(e, _Dropped) else None
            wait = client._retry.delay(failures, error) if failures < max_reconnects else None
            if wait is None:
                raise error if error is not None else e
        else:
            wait = client._retry.delay(failures, None) if failures < max_reconnects else None
            if wait is None:
                raise ConnectionError(f"the event stream of {what} keeps ending without an end event")
        failures += 1
        await asyncio.sleep(wait)


class AsyncLiveStream:
    """`LiveStream` for asyncio."""

    def __init__(self, client: AsyncClient, data: dict[str, Any]) -> None:
        self.client, self.data = client, data
        self.id: str = data["id"]

    def __repr__(self) -> str:
        return f"<AsyncLiveStream {self.id} {self.status}>"

    @property
    def status(self) -> str:
        return self.data["status"]

    async def refresh(self) -> AsyncLiveStream:
        self.data = (await self.client.request("GET", f"/v1/streams/{self.id}")).json()
        return self

    def events(self, last_event_id: str | None = None, *, max_reconnects: int = 10,
               keepalives: bool = False) -> AsyncIterator[Event]:
        return _afollow(self.client, f"/v1/streams/{self.id}/events", f"stream {self.id}", last_event_id,
                        max_reconnects, keepalives)

    async def stop(self) -> AsyncLiveStream:
        self.data = (await self.client.request("DELETE", f"/v1/streams/{self.id}")).json()
        return self


__all__ = ["KEEPALIVE", "AsyncClient", "AsyncJob", "AsyncLiveStream", "BadRequest", "Client", "Conflict", "Event",
           "Gone", "InsufficientStorage", "InvalidRequest", "Job", "JobFailed", "LiveStream", "NotFound", "RateLimited",
           "ServerError", "ServiceError", "TooLarge", "Unauthorized", "Unavailable", "UnsupportedMedia", "error_from"]
