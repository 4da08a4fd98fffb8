"""Files served with byte ranges (RFC 9110 section 14): Starlette's FileResponse does the
serving; this decides first what a Range header means, so that every refusal is problem+json.

An unknown range unit, or a Range that If-Range turns off, is ignored (the whole file, 200), as
RFC 9110 asks; a malformed `bytes` range is 400; a range that starts past the end is 416 with
`Content-Range: bytes */SIZE`.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from service.api.problems import PROBLEM, ProblemDetails, problem_response


def _gone(request: Request) -> Any:
    # No path: the client knows the file by its URL. A DELETE or the sweeper removed it.
    return problem_response(request, 404, "Not Found", "the file is gone: its job was deleted or has expired")


class RangedFile(FileResponse):
    """A file that may be deleted while it is asked for (DELETE, the sweeper): stat once here and
    answer 404 problem+json if it is gone, rather than Starlette's RuntimeError (a 500)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return await _gone(Request(scope))(scope, receive, send)
        if not stat.S_ISREG(st.st_mode):
            return await _gone(Request(scope))(scope, receive, send)
        self.stat_result = st
        self.set_stat_headers(st)
        headers = Headers(scope=scope)
        value = headers.get("range")
        if value is not None:
            unit = value.split("=", 1)[0].strip().lower()
            if_range = headers.get("if-range")
            if unit != "bytes" or (if_range is not None and not self._should_use_range(if_range)):
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
            else:
                size = st.st_size
                request = Request(scope)
                try:
                    self._parse_range_header(value, size)
                except MalformedRangeHeader as e:
                    detail = f"malformed Range header ({e.content.rstrip('.')}); send bytes=START-END"
                    return await problem_response(request, 400, "Bad Request", detail)(scope, receive, send)
                except RangeNotSatisfiable:
                    response = problem_response(request, 416, "Range Not Satisfiable",
                                                f"the range starts past the end of the {size}-byte file",
                                                {"Content-Range": f"bytes */{size}"})
                    return await response(scope, receive, send)
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await super().__call__(scope, receive, tracked)
        except FileNotFoundError:  # removed between the stat above and Starlette opening it
            if not started:
                return await _gone(Request(scope))(scope, receive, send)
            # The head is out: nothing to answer with. Returning unfinished makes the server
            # close the connection, so the client sees a cut body, not a shorter file.


def ranged_responses(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of a route that serves a file with ranges: 200, 206, 400 and 416."""
    binary = {media_type: {"schema": {"type": "string", "format": "binary"}}}
    problem = {PROBLEM: {"schema": ProblemDetails.model_json_schema()}}
    return {
        200: {"description": description, "content": binary,
              "headers": {"Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}}}},
        206: {"description": "The byte range asked for (Range: bytes=...); several ranges come as "
                             "multipart/byteranges",
              "content": {**binary, "multipart/byteranges": {"schema": {"type": "string", "format": "binary"}}},
              "headers": {"Content-Range": {"schema": {"type": "string"}}}},
        400: {"description": "Not a usable video, a malformed request, or a malformed Range header",
              "content": problem},
        416: {"description": "The range starts past the end of the file", "content": problem,
              "headers": {"Content-Range": {"description": "bytes */SIZE", "schema": {"type": "string"}}}},
    }
