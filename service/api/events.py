"""Server-sent events from a Redis stream of events: the one machinery behind a job's and a live
stream's `/events` routes (service.api.routes.jobs, service.api.routes.streams).

Waits on Redis with redis.asyncio (no thread per client); at most `max_event_streams` per API
process; a keep-alive comment every `sse_keepalive_s`; ends with an `end` event once the thing it
follows has ended (or is gone), or after `sse_max_s` (resume with Last-Event-ID).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable

import redis
from fastapi import Request
from fastapi.responses import StreamingResponse

from service.api.deps import EVENTS_BLOCK_MS, Services
from service.api.problems import Problem
from service.jobs.redis_clients import REDIS_ERRORS


def sse(entry_id: str | None, kind: str, data: str) -> str:
    return (f"id: {entry_id}\n" if entry_id else "") + f"event: {kind}\ndata: {data}\n\n"


async def event_stream(request: Request, svc: Services, owner: str, *, events_key: str,
                       owner_of: Callable[[], Awaitable[str | None]],
                       ended: Callable[[], Awaitable[str | None]], not_found: str) -> StreamingResponse:
    """The events under `events_key` as SSE, for its `owner` only (another's is `not_found`, 404).
    `ended()` is None while the thing followed goes on, else the status its `end` event names."""
    s, ar = svc.settings, svc.aredis
    after = request.headers.get("last-event-id") or "0-0"
    if not valid_stream_id(after):
        raise Problem(400, "Last-Event-ID must be an id this stream sent (MS-SEQ, decimal digits, at most "
                           f"{_MAX_STREAM_ID} characters)")
    if svc.open_streams >= s.max_event_streams:
        raise Problem(503, f"{s.max_event_streams} event streams are open, the most allowed; poll instead",
                      headers={"Retry-After": str(s.retry_after_s)})
    # The slot is taken before the first await (checked and taken with nothing running between),
    # so a burst cannot pass the check together; it is given back exactly once on every path.
    svc.open_streams += 1
    held = True

    def release() -> None:
        nonlocal held
        if held:
            held = False
            svc.open_streams -= 1

    try:
        if await owner_of() != owner:
            raise Problem(404, not_found)
    except BaseException:
        release()
        raise

    async def stream():
        nonlocal after
        loop = asyncio.get_running_loop()
        end_at, idle_since = loop.time() + s.sse_max_s, loop.time()
        try:
            while loop.time() < end_at:
                res = await ar.xread({events_key: after}, block=EVENTS_BLOCK_MS, count=100)
                for _, entries in res or []:
                    for entry_id, fields in entries:
                        after = entry_id.decode()
                        yield sse(after, fields[b"type"].decode(), fields[b"data"].decode())
                if res:
                    idle_since = loop.time()
                    continue
                status = await ended()
                if status is not None:
                    yield sse(None, "end", json.dumps({"status": status}))
                    return
                if loop.time() - idle_since >= s.sse_keepalive_s:
                    idle_since = loop.time()
                    yield ": keep-alive\n\n"
        except redis.exceptions.MaxConnectionsError:
            yield sse(None, "error", json.dumps({"detail": "the API's Redis connections are all in use; reconnect"}))
        except REDIS_ERRORS:
            yield sse(None, "error", json.dumps({"detail": "the job store (Redis) is unreachable; reconnect"}))
        finally:
            release()

    return _EventStream(stream(), release, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _EventStream(StreamingResponse):
    """Gives the stream's slot back however the response ends: a body that never started (the
    client left first) runs no finally of its own."""

    def __init__(self, body, release: Callable[[], None], **kwargs) -> None:
        super().__init__(body, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
_MAX_STREAM_ID = 41


def valid_stream_id(entry_id: str) -> bool:
    # ASCII digits (\d would also take "²"), bounded before int() sees them (its 4,300-digit
    # limit raises), each part within Redis's 64 bits.
    if len(entry_id) > _MAX_STREAM_ID or not _STREAM_ID.fullmatch(entry_id):
        return False
    return all(int(p) < 2**64 for p in entry_id.split("-"))


__all__ = ["event_stream", "sse", "valid_stream_id"]
