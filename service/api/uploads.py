"""Receiving an upload: the request body streamed to storage, counted as it arrives.

Both forms (multipart field `file`, or a raw `video/*` / `application/octet-stream` body) and
every transfer encoding (Content-Length or chunked) go through one counter on the raw body:
the upload is cut the moment it passes the limit (413), whatever the headers claimed, and
nothing is spooled anywhere else first (multipart is parsed as it streams, by
python-multipart's push parser). A client that sends nothing for `upload_idle_timeout_s` is
dropped (408). On any failure the partial file is removed (storage's writer).

With an object store the writer sends a multipart part whenever one fills: a network call, which
then runs on a worker thread (`_Offload`), so a slow or dead store stalls that upload only, never
the event loop every other request shares. A shared directory is written in place, as always.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import BinaryIO

from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from service.api.problems import Problem
from service.jobs.storage import Storage

# Multipart framing and small fields around the file: allowed on top of the size limit.
_MULTIPART_SLACK = 64 * 1024
_MAX_PARTS = 10
_RAW_TYPES = ("video/", "application/octet-stream")


# Refusing mid-body: close the connection rather than read and discard the rest of it.
_CLOSE = {"Connection": "close"}


def _too_large(limit: int) -> Problem:
    return Problem(413, f"the upload is larger than the limit of {limit} bytes (STEMSEG_MAX_UPLOAD_BYTES)",
                   headers=_CLOSE)


def clean_filename(name: str | None) -> str | None:
    """The client's file name as shown back in the job: last path part, printable, bounded."""
    if not name:
        return None
    name = re.split(r"[\\/]", name)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:255]
    return name or None


async def _body(request: Request, cut_at: int, limit: int, idle_s: float) -> AsyncIterator[bytes]:
    """The raw body, cut (413) once more than `cut_at` bytes arrived."""
    chunks = request.stream().__aiter__()
    size = 0
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), idle_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise Problem(408, f"the upload stalled: nothing arrived for {idle_s:g} s", headers=_CLOSE) from None
        except ClientDisconnect:
            raise Problem(400, "the client disconnected during the upload") from None
        size += len(chunk)
        if size > cut_at:
            raise _too_large(limit)
        yield chunk


class _FilePart:
    """python-multipart callbacks that write the part named `file` and ignore the others."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self.out, self.limit = out, limit
        self.size, self.parts, self.found, self.in_file, self.done = 0, 0, False, False, False
        self.filename: str | None = None
        self._field, self._value, self._headers = b"", b"", {}

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
                "on_header_end": self._hend, "on_headers_finished": self._hdone, "on_part_data": self._data,
                "on_part_end": self._end}

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > _MAX_PARTS:
            raise Problem(422, f"the multipart body has more than {_MAX_PARTS} parts")
        self._headers, self.in_file = {}, False

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _hend(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _hdone(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == b"file" and not self.found:
            self.found = self.in_file = True
            raw = options.get(b"filename")
            self.filename = clean_filename(raw.decode("utf-8", "replace")) if raw else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.size += end - start
            if self.size > self.limit:
                raise _too_large(self.limit)
            self.out.write(data[start:end])

    def _end(self) -> None:
        self.in_file = False


async def receive_json(request: Request, limit: int, idle_s: float) -> bytes:
    """A small JSON body (a job by reference), read whole: 413 past `limit` bytes."""
    body = bytearray()
    try:
        async for chunk in _body(request, limit, limit, idle_s):
            body += chunk
    except Problem as e:
        if e.status == 413:
            raise Problem(413, f"the JSON body is larger than {limit} bytes", headers=_CLOSE) from None
        raise
    return bytes(body)


def is_json(request: Request) -> bool:
    media, _ = parse_options_header(request.headers.get("content-type", ""))
    return media.decode("latin-1").lower() == "application/json"


class _Offload:
    """Calls into the store: on a worker thread when it is remote, in place when it is a directory."""

    def __init__(self, storage: Storage) -> None:
        self.remote = not storage.shared_paths

    async def __call__(self, fn, *args):
        return await run_in_threadpool(fn, *args) if self.remote else fn(*args)

    @asynccontextmanager
    async def writer(self, storage: Storage, staging: str) -> AsyncIterator[BinaryIO]:
        cm = storage.writer(staging, "video")
        out = await self(cm.__enter__)
        try:
            yield out
        except BaseException:
            # The writer aborts (a multipart upload: no object, no part) and re-raises what it is given.
            if not await self(cm.__exit__, *sys.exc_info()):
                raise
        else:
            await self(cm.__exit__, None, None, None)


async def receive(request: Request, storage: Storage, staging: str, limit: int, idle_s: float) -> str | None:
    """Stream the upload into `staging`/video; returns the client's file name (if any)."""
    call = _Offload(storage)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
        raise _too_large(limit)
    ctype = request.headers.get("content-type", "")
    media, options = parse_options_header(ctype)
    media = media.decode("latin-1").lower()
    if media == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise Problem(400, "multipart/form-data without a boundary")
        async with call.writer(storage, staging) as out:
            part = _FilePart(out, limit)
            try:
                parser = MultipartParser(boundary, part.callbacks())
                async for chunk in _body(request, limit + _MULTIPART_SLACK, limit, idle_s):
                    await call(parser.write, chunk)  # the file's bytes go to the writer from here
                parser.finalize()
            except (ParseError, ValueError) as e:
                raise Problem(400, f"malformed multipart body ({type(e).__name__})") from None
            if not part.found:
                raise Problem(422, "multipart upload without a file field named 'file'")
            size, name = part.size, part.filename
    elif media.startswith(_RAW_TYPES):
        name = clean_filename(request.headers.get("x-filename"))
        size = 0
        async with call.writer(storage, staging) as out:
            async for chunk in _body(request, limit, limit, idle_s):
                size += len(chunk)
                await call(out.write, chunk)
    else:
        raise Problem(415, "send the video as multipart/form-data (field 'file') or as a video/* or "
                           "application/octet-stream body, or a JSON body naming its source")
    if size == 0:
        await call(storage.delete_job, staging)
        raise Problem(422, "the upload is empty")
    return name
