"""/v1/streams: have the service segment a live source (RTSP, HTTP MPEG-TS or HLS, UDP, ...).
Thin: a stream's life is `service.jobs.streams.Streams`'s, which source a client may name is
`service.jobs.stream_sources`'; here are HTTP and the view of a stream."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.deps import OwnerDep, Services, ServicesDep, StreamIdPath
from service.api.events import event_stream
from service.api.problems import Problem, responses
from service.api.routes.files import OutputFile, listed_sizes, read_manifest
from service.api.stored import REDIRECT, stored_file
from service.api.uploads import is_json, receive_json
from service.config import OUTPUT_FORMATS, parse_formats
from service.jobs.sources import parse_nets
from service.jobs.stream_record import StreamRecord, StreamStatus
from service.jobs.stream_sources import check_stream_url
from service.jobs.streams import StreamLimit
from service.model.presets import model_warning
from service.video.live import redact

router = APIRouter(prefix="/v1/streams", tags=["streams"])

_JSON_LIMIT = 16 * 1024


class StreamRequest(BaseModel):
    """A live source for the service to segment until it ends, is deleted or max_duration_s passes."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048, examples=["rtsp://camera.example.com/stream1"],
                     description="rtsp(s)://, rtmp(s)://, http(s):// (MPEG-TS, HLS), udp://, rtp://, srt:// or tcp:// "
                                 "URL; its host and port listed in STEMSEG_STREAM_HOSTS")
    formats: list[str] | None = Field(None, max_length=len(OUTPUT_FORMATS),
                                      description=f"subset of {', '.join(OUTPUT_FORMATS)} (default: STEMSEG_FORMATS)")
    max_duration_s: float | None = Field(None, gt=0, description="stop after this many seconds (default: "
                                         "STEMSEG_STREAM_DURATION_S; at most STEMSEG_STREAM_MAX_DURATION_S)")


class StreamProgress(BaseModel):
    frames_seen: int = Field(description="frames whose tracks were published (frame events)")
    frames_read: int = Field(description="frames decoded from the source, dropped ones included")
    frames_dropped: int
    clips_dropped: int
    reconnects: int
    latency_s: float | None = Field(description="the latest frame's, from its arrival to its frame event")
    frames_per_second: float | None = Field(description="frames published per second, over the last seconds")


class LiveStream(BaseModel):
    id: str
    status: StreamStatus
    url: str = Field(description="the source, a password in it shown as ***")
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    formats: list[str]
    max_duration_s: float
    progress: StreamProgress
    tenure: int = Field(description="workers that have run it so far (more than one after a takeover)")
    gaps: list[dict[str, Any]] = Field(description="where frames stop being one run: after_frame, cause "
                                                   "(reconnect, dropped, worker lost, worker stopped), at, tenure")
    outputs: list[dict[str, Any]] = Field(description="one output folder per tenure: tenure, path, frames, "
                                                      "first_frame, tracks")
    ended_by: str | None = None
    error: str | None = None
    warning: str | None = None
    links: dict[str, str]


def _view(rec: StreamRecord) -> LiveStream:
    sid = rec.id
    return LiveStream(
        id=sid, status=rec.status, url=redact(rec.url), created_at=rec.created_at, updated_at=rec.updated_at,
        started_at=rec.started_at, finished_at=rec.finished_at, formats=rec.formats, max_duration_s=rec.max_duration_s,
        progress=StreamProgress(frames_seen=rec.frames_seen, frames_read=rec.frames_read,
                                frames_dropped=rec.frames_dropped, clips_dropped=rec.clips_dropped,
                                reconnects=rec.reconnects, latency_s=rec.latency_s,
                                frames_per_second=rec.frames_per_second),
        tenure=rec.tenure, gaps=rec.gaps, outputs=rec.outputs, ended_by=rec.ended_by, error=rec.error,
        warning=model_warning(rec.preset),
        links={"self": f"/v1/streams/{sid}", "events": f"/v1/streams/{sid}/events",
               "files": f"/v1/streams/{sid}/files"})


def _own_stream(svc: Services, owner: str, stream_id: str) -> StreamRecord:
    rec = svc.streams.get(stream_id)
    if rec is None or rec.owner != owner:  # another key's stream is indistinguishable from none
        raise Problem(404, f"no stream {stream_id}")
    return rec


def _request(raw: bytes) -> StreamRequest:
    try:
        return StreamRequest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise Problem(422, f"JSON body: {where}: {first.get('msg', 'invalid')}") from None


@router.post("", status_code=201, response_model=LiveStream,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": StreamRequest.model_json_schema()}}}},
             responses=responses(401, 408, 413, 415, 422, 429, 503))
async def create_stream(request: Request, response: Response, svc: ServicesDep, owner: OwnerDep) -> LiveStream:
    s = svc.settings
    if not is_json(request):
        raise Problem(415, "a live stream is asked for with a JSON body (Content-Type: application/json)")
    body = _request(await receive_json(request, _JSON_LIMIT, s.upload_idle_timeout_s))
    try:
        formats = list(parse_formats(body.formats) if body.formats is not None else s.format_list)
    except ValueError as e:
        raise Problem(422, str(e)) from None
    duration = body.max_duration_s if body.max_duration_s is not None else s.stream_duration_s
    if duration > s.stream_max_duration_s:
        raise Problem(422, f"max_duration_s may be at most {s.stream_max_duration_s:g} (STEMSEG_STREAM_MAX_DURATION_S)")
    # The policy resolves the host (every address is checked): a thread, not the event loop.
    why = await run_in_threadpool(check_stream_url, body.url, s.stream_host_list, parse_nets(s.source_private_nets))
    if why:
        raise Problem(422, why)
    try:
        rec = await run_in_threadpool(svc.streams.create, owner, body.url, formats, duration, svc.model.name,
                                      s.max_streams_per_key)
    except StreamLimit as e:
        raise Problem(429, str(e), headers={"Retry-After": str(s.retry_after_s)}) from None
    response.headers["Location"] = f"/v1/streams/{rec.id}"
    return _view(rec)


@router.get("/{stream_id}", response_model=LiveStream, responses=responses(401, 404, 422, 503))
def get_stream(stream_id: StreamIdPath, svc: ServicesDep, owner: OwnerDep) -> LiveStream:
    return _view(_own_stream(svc, owner, stream_id))


_SSE_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "id": {"type": "string", "description": "Redis stream entry id; send back as Last-Event-ID"},
    "event": {"type": "string", "enum": ["status", "frame", "gap", "track", "end", "error"]},
    "data": {"type": "string", "description": "JSON"}}}


@router.get("/{stream_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "Server-sent events: status, then frame (each frame's tracks as they are final) and gap "
                         "events, track events as each worker's tenure ends, then end",
          "content": {"text/event-stream": {"itemSchema": _SSE_EVENT}}},
    **responses(400, 401, 404, 422, 503)})
async def stream_events(stream_id: StreamIdPath, request: Request, svc: ServicesDep,
                        owner: OwnerDep) -> StreamingResponse:
    ar = svc.aredis

    async def ended() -> str | None:
        status = await svc.streams.status_async(ar, stream_id)
        return "deleted" if status is None else status.value if status.final else None

    return await event_stream(request, svc, owner, events_key=svc.streams.keys.stream_events(stream_id),
                              owner_of=lambda: svc.streams.owner_async(ar, stream_id), ended=ended,
                              not_found=f"no stream {stream_id}")


@router.delete("/{stream_id}", status_code=202, response_model=LiveStream, responses=responses(401, 404, 422, 503))
def delete_stream(stream_id: StreamIdPath, svc: ServicesDep, owner: OwnerDep) -> LiveStream:
    """Stop the stream: a queued one at once, a running one by its worker, which writes the outputs of
    what it saw (`stopping`, then `stopped`). The record and the files are kept until they expire."""
    _own_stream(svc, owner, stream_id)
    rec = svc.streams.stop(stream_id)
    if rec is None:
        raise Problem(404, f"no stream {stream_id}")
    return _view(rec)


class StreamOutput(BaseModel):
    tenure: int
    path: str
    formats: list[str]
    files: list[OutputFile]


class StreamOutputs(BaseModel):
    outputs: list[StreamOutput]


_GONE = "this stream's output files are gone from the server"


def _outputs(svc: Services, rec: StreamRecord) -> list[tuple[dict[str, Any], list[str], list[str], dict[str, int]]]:
    """Each written output folder of the stream: its record entry, formats, files (as its manifest
    lists them, the manifest last) and their sizes, as the CLI wrote it."""
    found = []
    for entry in rec.outputs:
        formats, names = read_manifest(svc, rec.directory, entry["path"], _GONE)
        found.append((entry, formats, names, listed_sizes(svc, rec.directory, entry["path"], names, _GONE)))
    return found


@router.get("/{stream_id}/files", response_model=StreamOutputs, responses=responses(401, 404, 410, 422, 503))
def list_stream_files(stream_id: StreamIdPath, svc: ServicesDep, owner: OwnerDep) -> StreamOutputs:
    """The output folders written so far (one per worker's run of the stream, once it ended), file by
    file: each the folder `stemseg segment` writes, its manifest (`stemseg-output.json`) included."""
    rec = _own_stream(svc, owner, stream_id)
    return StreamOutputs(outputs=[
        StreamOutput(tenure=entry["tenure"], path=entry["path"], formats=formats, files=[
            OutputFile(path=n, size=sizes[n], url=f"/v1/streams/{stream_id}/files/{entry['path']}/{n}")
            for n in names])
        for entry, formats, names, sizes in _outputs(svc, rec)])


@router.get("/{stream_id}/files/{name:path}", response_class=FileResponse, responses={
    200: {"description": "One file of an output folder", "content": {
        media: {"schema": {"type": "string", "format": "binary"}}
        for media in ("application/json", "image/png", "text/plain; charset=utf-8", "video/mp4")}},
    **REDIRECT, **responses(401, 404, 410, 422, 503)})
def get_stream_file(stream_id: StreamIdPath, name: Annotated[str, PathParam(max_length=300)], svc: ServicesDep,
                    owner: OwnerDep) -> Response:
    rec = _own_stream(svc, owner, stream_id)
    for entry, _, names, _ in _outputs(svc, rec):
        prefix = entry["path"] + "/"
        # Only what a manifest lists: no path of the caller's choosing is opened.
        if name.startswith(prefix) and name[len(prefix):] in names:
            try:
                return stored_file(svc, rec.directory, name, filename=name.rsplit("/", 1)[-1], ranged=False)
            except FileNotFoundError:
                raise Problem(410, _GONE) from None
    raise Problem(404, f"the stream's outputs have no file {name!r}")
