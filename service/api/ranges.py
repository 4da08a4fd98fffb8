"""Files served with byte ranges (RFC 9110 section 14): Starlette's FileResponse does the
serving; this decides first what a Range header means, so that every refusal is problem+json.

An unknown range unit, or a Range that If-Range turns off, is ignored (the whole file, 200), as
RFC 9110 asks; a malformed `bytes` range is 400; a range that starts past the end is 416 with
`Content-Range: bytes */SIZE`.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from service.api.problems import PROBLEM, ProblemDetails, problem_response


class RangedFile(FileResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        value = headers.get("range")
        if value is not None:
            unit = value.split("=", 1)[0].strip().lower()
            if_range = headers.get("if-range")
            if unit != "bytes" or (if_range is not None and not self._should_use_range(if_range)):
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
            else:
                size = os.stat(self.path).st_size
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
        await super().__call__(scope, receive, send)


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
