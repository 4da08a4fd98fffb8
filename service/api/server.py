"""Running the app under uvicorn with bounds on how a request's head arrives.

uvicorn's httptools protocol buffers a request line and headers of any size and has no
deadline for receiving them (its only head-related option, `h11_max_incomplete_event_size`,
applies to the h11 protocol and answers 400, not 431). So the protocol here counts the bytes
of each request's head as they arrive and answers `431 Request Header Fields Too Large` once
they pass `max_header_bytes`, and gives a connection `header_timeout_s` from its first byte
(or from being opened) to finish the head, else `408 Request Timeout`; both as problem+json
and with the connection closed. Parsing then never holds the event loop for more than one
read of the socket beyond the limit.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from service.api.problems import PROBLEM
from service.config import Settings


def _problem_bytes(status: int, detail: str) -> bytes:
    body = json.dumps({"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                       "detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: {PROBLEM}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def bounded_protocol(max_header_bytes: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a size limit and a deadline on each request's head."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    too_large = _problem_bytes(431, f"the request line and headers are larger than {max_header_bytes} bytes "
                                    "(STEMSEG_MAX_HEADER_BYTES)")
    too_slow = _problem_bytes(408, f"the request headers did not arrive within {header_timeout_s:g} s "
                                   "(STEMSEG_HEADER_TIMEOUT_S)")

    class BoundedHead(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head, self._head_bytes, self._head_timer, self._boundaries = True, 0, None, 0

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._refuse, too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, response: bytes) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._arm()  # a keep-alive connection's next request starts its clock here
            boundaries_before = self._boundaries
            super().data_received(data)
            # Counted only while one head spans whole reads: a read that ended a head or a
            # message (then its bytes are partly body) is left out, so a body never counts and
            # the count is short by at most one read.
            if self._in_head and self._boundaries == boundaries_before and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    self._refuse(too_large)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            self._boundaries += 1
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0
            self._boundaries += 1  # a boundary too: the rest of this read is the next head

    return BoundedHead


def serve(app: Any, settings: Settings, host: str, port: int) -> None:
    import uvicorn

    try:
        http: Any = bounded_protocol(settings.max_header_bytes, settings.header_timeout_s)
        extra: dict[str, Any] = {}
    except ImportError:  # no httptools: h11 bounds the head itself (answering 400), without a deadline
        http, extra = "h11", {"h11_max_incomplete_event_size": settings.max_header_bytes}
    uvicorn.run(app, host=host, port=port, log_level="info", http=http, **extra)
