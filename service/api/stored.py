"""Serving a job's stored files whatever the store: with a shared directory (LocalStorage) the
file itself (`RangedFile`, as always); with an object store the object streamed through the
API from ranged GETs (`RangedObject`), or, with `STEMSEG_RESULTS_REDIRECT`, a 307 to a
presigned URL of it, so the bytes go from the store to the client directly.

Range handling follows service.api.ranges: one `bytes` range is 206 with Content-Range, a
malformed one 400, one past the end 416 (problem+json); several ranges, another unit, or an
If-Range (objects are not validated against it here) get the whole object (200), as RFC 9110
allows. A store failure before the first byte is 503 problem+json; after it, the connection is
cut (the client sees a short body, never a complete-looking wrong one).
"""

from __future__ import annotations

import mimetypes
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from service.api.problems import problem_response
from service.api.ranges import RangedFile
from service.jobs.storage import Storage, StoreUnavailable

# OpenAPI: the answer of a result route when STEMSEG_RESULTS_REDIRECT is set.
REDIRECT = {307: {"description": "With STEMSEG_RESULTS_REDIRECT (an object store): the file is at the "
                                 "presigned URL in Location, valid STEMSEG_RESULTS_URL_TTL_S seconds",
                  "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}}}}


def _disposition(filename: str) -> str:
    quoted = quote(filename)
    return f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'


def stored_file(svc, job_id: str, name: str, *, media_type: str | None = None, filename: str | None = None,
                ranged: bool = True) -> Response:
    """The response serving file `name` of the job (see the module docstring). Raises
    FileNotFoundError when it is not stored (the caller says what that means), StoreUnavailable
    when the store fails (503)."""
    storage: Storage = svc.storage
    if storage.shared_paths:
        path = storage.path(job_id, name)  # type: ignore[attr-defined]
        if not path.is_file():
            raise FileNotFoundError(name)
        return RangedFile(path, media_type=media_type, filename=filename) if ranged else FileResponse(
            path, filename=filename)
    size = storage.size(job_id, name)
    if svc.settings.results_redirect:
        url = storage.presigned_url(job_id, name, svc.settings.results_url_ttl_s, filename or name.rsplit("/", 1)[-1])
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    return RangedObject(storage, job_id, name, size, media_type=media_type, filename=filename,
                        retry_after_s=svc.settings.retry_after_s)


class RangedObject(Response):
    def __init__(self, storage: Storage, job_id: str, name: str, size: int, *, media_type: str | None = None,
                 filename: str | None = None, retry_after_s: int = 5) -> None:
        media_type = media_type or mimetypes.guess_type(filename or name)[0] or "application/octet-stream"
        super().__init__(None, media_type=media_type)
        self.storage, self.job_id, self.name, self.size = storage, job_id, name, size
        self.retry_after_s = retry_after_s
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.headers["accept-ranges"] = "bytes"
        if filename:
            self.headers["content-disposition"] = _disposition(filename)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        headers = Headers(scope=scope)
        start, stop, status = 0, self.size, 200
        value = headers.get("range")
        if value is not None and value.split("=", 1)[0].strip().lower() == "bytes" and "if-range" not in headers:
            try:
                spans = FileResponse._parse_range_header(value, self.size)
            except MalformedRangeHeader as e:
                detail = f"malformed Range header ({e.content.rstrip('.')}); send bytes=START-END"
                return await problem_response(request, 400, "Bad Request", detail)(scope, receive, send)
            except RangeNotSatisfiable:
                return await problem_response(request, 416, "Range Not Satisfiable",
                                              f"the range starts past the end of the {self.size}-byte file",
                                              {"Content-Range": f"bytes */{self.size}"})(scope, receive, send)
            if len(spans) == 1:
                (start, stop), status = spans[0], 206
        head_only = scope["method"] == "HEAD"
        body = (b for b in ()) if head_only else self.storage.iter_range(self.job_id, self.name, start, stop)
        try:
            first = await run_in_threadpool(next, body, b"")
        except FileNotFoundError:
            return await problem_response(request, 404, "Not Found", "the file is gone: its job was deleted or "
                                                                     "has expired")(scope, receive, send)
        except StoreUnavailable as e:
            return await problem_response(request, 503, "Service Unavailable", f"the job store is unavailable: {e}",
                                          {"Retry-After": str(self.retry_after_s)})(scope, receive, send)
        head = [*self.raw_headers, (b"content-length", str(stop - start).encode())]
        if status == 206:
            head.append((b"content-range", f"bytes {start}-{stop - 1}/{self.size}".encode()))
        await send({"type": "http.response.start", "status": status, "headers": head})
        if scope["method"] == "HEAD":
            return await send({"type": "http.response.body", "body": b""})
        sent = len(first)
        try:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            while chunk := await run_in_threadpool(next, body, b""):
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (StoreUnavailable, FileNotFoundError):
            return  # the head is out: returning unfinished makes the server cut the connection
        finally:
            await run_in_threadpool(body.close)  # the store's connection back to its pool, client gone or not
        if sent == stop - start:
            await send({"type": "http.response.body", "body": b""})

