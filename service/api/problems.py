"""RFC 9457 problem details for every error the API returns, and their OpenAPI description.

Faults map to statuses here, in one place: a client's unusable input (`ClientError`) -> 400,
Redis or the job store (S3) unreachable or refusing -> 503 with Retry-After, a full disk -> 507,
the server's own setup (any other `UserError`) and anything unexpected -> 500 without details.
No detail names a server path.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.errors import ClientError, UserError
from service.jobs.lifecycle import QuotaExceeded, RateLimited, Refused
from service.jobs.sources import SourceRefused, SourceTooLarge, SourceUnavailable
from service.jobs.storage import NoSpace, StoreUnavailable
from service.video import VideoError

PROBLEM = "application/problem+json"
log = logging.getLogger("stemseg.api")


# RFC 9110's names where Python's HTTPStatus still has the older ones (3.11: "Unprocessable
# Entity", "Request Entity Too Large"), so one status always carries one title.
_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


def title_of(status: int) -> str:
    return _TITLES.get(status) or HTTPStatus(status).phrase


class Problem(Exception):
    def __init__(self, status: int, detail: str, title: str | None = None, headers: dict[str, str] | None = None,
                 **extra: object) -> None:
        self.status, self.detail, self.extra, self.headers = status, detail, extra, headers or {}
        self.title = title or title_of(status)


class ProblemDetails(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None


_DESCRIPTIONS = {
    400: "Not a usable video, or a malformed request", 401: "A valid API key is required",
    404: "No such job (or it belongs to another API key)", 405: "Method not allowed",
    408: "The upload stalled", 409: "The job has not succeeded, or was not asked for that output",
    410: "The job's output files are gone from the server",
    413: "The upload, its frame count or its duration is over a limit", 415: "Unsupported media type",
    422: "Invalid parameters", 429: "Rate limit or job quota reached; see Retry-After",
    416: "The range starts past the end of the file",
    503: "Redis or the job store (S3) is unreachable or refusing, Redis's connections are all in use, or too "
         "many event streams are open; see Retry-After",
    507: "No space left on the server's disk",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}


def responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the problem statuses a route can return; a route whose
    status means something narrower says so (`responses(503, s503="...")`)."""
    schema = ProblemDetails.model_json_schema()
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {"description": descriptions.get(f"s{s}", _DESCRIPTIONS[s]), "content": {PROBLEM: {"schema": schema}}}
        if s in (429, 503):
            out[s]["headers"] = _RETRY_AFTER
    return out


def _scrub(text: str, request: Request) -> str:
    """Belt and braces: no detail may name the data directory or the job store's bucket."""
    settings = getattr(request.app.state, "settings", None)
    if settings is not None:
        for root in {str(settings.data_dir.resolve()), str(settings.data_dir)}:
            if root and root != ".":
                text = text.replace(root, "<data>")
        if settings.storage_url:
            bucket_and_prefix = settings.storage_url.removeprefix("s3://").rstrip("/")
            text = text.replace(settings.storage_url, "<store>").replace(bucket_and_prefix, "<store>")
    return text


def problem_response(request: Request, status: int, title: str, detail: str, headers: dict[str, str] | None = None,
                     **extra: object) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": _scrub(detail, request),
            "instance": str(request.url.path), **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _allowed(request: Request) -> list[str]:
    """The methods some route serves at this path: asked of the router itself, one method at a time."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def _validation_detail(errors: list[dict[str, Any]]) -> str:
    """The first problem in words, e.g. "query parameter limit: Input should be less than or
    equal to 100" (the errors list keeps them all)."""
    if not errors:
        return "the request is not valid"
    first = errors[0]
    where = [str(p) for p in first.get("loc", ())]
    place = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "body"}
    name = f"{place.get(where[0], where[0])} {'.'.join(where[1:])}".strip() if where else "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{name}: {first.get('msg', 'invalid')}{more}"


def install(app: FastAPI) -> None:
    retry_after = str(app.state.settings.retry_after_s)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc.status, exc.title, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        title = "Not a usable video" if exc.status == 400 else title_of(exc.status)
        return problem_response(request, exc.status, title, exc.detail)

    @app.exception_handler(SourceRefused)
    async def _source_refused(request: Request, exc: SourceRefused) -> JSONResponse:
        return problem_response(request, 422, title_of(422), str(exc))

    @app.exception_handler(SourceUnavailable)
    async def _source_unavailable(request: Request, exc: SourceUnavailable) -> JSONResponse:
        log.warning("source fetch: %s", exc)
        return problem_response(request, 503, title_of(503), f"{exc}; retry later",
                                {"Retry-After": retry_after})

    @app.exception_handler(SourceTooLarge)
    async def _source_too_large(request: Request, exc: SourceTooLarge) -> JSONResponse:
        return problem_response(request, 413, title_of(413), str(exc))

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        # The user knows a video by what they sent, never by the server's path to it.
        detail = exc.about("the upload") if isinstance(exc, VideoError) else str(exc).splitlines()[0]
        return problem_response(request, 400, "Bad Request", detail)

    @app.exception_handler(UserError)
    async def _setup_error(request: Request, exc: UserError) -> JSONResponse:
        # The operator's setup (weights, graphs, engine), not the client's doing: its message names
        # server paths and settings, so it goes to the log and the client learns only that it failed.
        log.error("server setup error on %s %r: %r", request.method, request.url.path, str(exc))
        return problem_response(request, 500, "Internal Server Error",
                                "the server is not set up to do this; the error has been logged")

    @app.exception_handler(QuotaExceeded)
    async def _quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        return problem_response(request, 429, "Too Many Requests", str(exc), {"Retry-After": retry_after})

    @app.exception_handler(RateLimited)
    async def _rate(request: Request, exc: RateLimited) -> JSONResponse:
        return problem_response(request, 429, "Too Many Requests", str(exc),
                                {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(NoSpace)
    async def _no_space(request: Request, exc: NoSpace) -> JSONResponse:
        return problem_response(request, 507, "Insufficient Storage", "no space left on the server's disk")

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # The message names the failure (unreachable, refused, full), never a bucket or key.
        log.warning("job store: %s", exc)
        return problem_response(request, 503, "Service Unavailable", f"the job store is unavailable: {exc}",
                                {"Retry-After": retry_after})

    @app.exception_handler(redis.exceptions.MaxConnectionsError)
    async def _pool_full(request: Request, exc: Exception) -> JSONResponse:
        sync_size, async_size = app.state.settings.redis_pool_sizes
        return problem_response(request, 503, "Service Unavailable",
                                f"this API process's Redis connections are all in use ({sync_size} for requests, "
                                f"{async_size} for event streams: STEMSEG_API_THREADS, STEMSEG_MAX_CONCURRENT_PROBES, "
                                "STEMSEG_MAX_EVENT_STREAMS and STEMSEG_REDIS_POOL_MARGIN size them); "
                                "Redis itself is up",
                                {"Retry-After": retry_after})

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    # Redis Cluster: slots without a master (one restarting, a failover under way)
    @app.exception_handler(redis.exceptions.ClusterError)
    @app.exception_handler(redis.exceptions.RedisClusterException)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unreachable: %s", exc)
        return problem_response(request, 503, "Service Unavailable", "the job store (Redis) is unreachable",
                                {"Retry-After": retry_after})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first route of the path; list them all
            headers["Allow"] = ", ".join(_allowed(request))
        return problem_response(request, exc.status_code, title_of(exc.status_code), str(exc.detail),
                                headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in exc.errors()]
        return problem_response(request, 422, title_of(422), _validation_detail(exc.errors()), errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %r", request.method, request.url.path, exc_info=exc)  # %r: no raw CR LF
        return problem_response(request, 500, "Internal Server Error", "an unexpected error; it has been logged")
