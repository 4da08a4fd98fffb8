"""/v1/jobs: upload a video, follow the job, fetch its tracks. Thin: the job's life is
`service.jobs.lifecycle.Jobs`'s; here are HTTP, the views of a job and the result formats."""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.deps import JobIdPath, OwnerDep, Services, ServicesDep
from service.api.events import event_stream
from service.api.problems import Problem, responses
from service.api.ranges import RangedFile, ranged_responses
from service.api.stored import REDIRECT, stored_file
from service.api.uploads import clean_filename, is_json, receive, receive_json
from service.config import OUTPUT_FORMATS, parse_formats
from service.jobs import files
from service.jobs.lifecycle import Limits
from service.jobs.record import JobRecord, JobStatus
from service.jobs.sources import SourcePolicy, check_source, fetch
from service.jobs.webhooks import check_callback_url
from service.model.presets import model_warning
from service.outputs.names import NAMES

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_MAX_OFFSET = 1_000_000

_JSON_LIMIT = 16 * 1024


class SourceJob(BaseModel):
    """A job by reference: the API fetches `source` (service.jobs.sources) and admits it as an upload."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(max_length=2048, examples=["https://videos.example.com/walk.mp4"],
                        description="http(s) URL of the video (its host listed in STEMSEG_SOURCE_HOSTS) or "
                                    "s3://BUCKET/KEY (the bucket listed in STEMSEG_SOURCE_BUCKETS)")
    formats: list[str] | None = Field(None, max_length=len(OUTPUT_FORMATS),
                                      description=f"subset of {', '.join(OUTPUT_FORMATS)} (default: STEMSEG_FORMATS)")
    preset: str | None = Field(None, max_length=64, description="must match the served model when given")
    min_dim: int | None = Field(None, ge=32, le=4096)
    callback_url: str | None = Field(None, max_length=2048, description="POSTed to when the job ends")


_UPLOAD_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "video/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": SourceJob.model_json_schema()},
}}


def _source_job(raw: bytes) -> SourceJob:
    try:
        return SourceJob.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise Problem(422, f"JSON body: {where}: {first.get('msg', 'invalid')}") from None


class Progress(BaseModel):
    clips_done: int
    clips_total: int
    frames_done: int
    frames_total: int


class VideoInfoOut(BaseModel):
    filename: str | None
    width: int
    height: int
    num_frames: int
    fps: float | None


class Webhook(BaseModel):
    url: str
    delivered: bool | None = None
    attempts: list[dict[str, Any]] = Field(default_factory=list)


class Job(BaseModel):
    id: str
    status: JobStatus
    created_at: float
    updated_at: float
    progress: Progress
    video: VideoInfoOut
    options: dict[str, Any]
    plan: dict[str, Any]
    timings: dict[str, float]
    error: str | None = None
    tracks: int | None = None
    warning: str | None = Field(None, description="e.g. that the model served sees only synthetic shapes")
    webhook: Webhook | None = None
    links: dict[str, str]


class JobList(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[Job]


def _view(job: JobRecord) -> Job:
    jid = job.id
    timings = {}
    if job.started_at:
        timings["queued_s"] = job.started_at - job.created_at
        timings["running_s"] = (job.finished_at or time.time()) - job.started_at
    webhook = job.webhook or ({"url": job.callback_url} if job.callback_url else None)
    return Job(
        id=jid, status=job.status, created_at=job.created_at, updated_at=job.updated_at,
        progress=Progress(clips_done=min(job.clips_done, job.num_clips), clips_total=job.num_clips,
                          frames_done=job.frames_done, frames_total=job.num_frames),
        video=VideoInfoOut(filename=job.filename, width=job.width, height=job.height, num_frames=job.num_frames,
                           fps=job.fps),
        options={"formats": job.formats, "min_dim": job.min_dim, "preset": job.preset},
        plan=asdict(job.plan), timings=timings, error=job.error, tracks=job.tracks, webhook=webhook,
        warning=model_warning(job.preset),
        links={"self": f"/v1/jobs/{jid}", "result": f"/v1/jobs/{jid}/result", "events": f"/v1/jobs/{jid}/events",
               "overlay": f"/v1/jobs/{jid}/overlay.mp4"},
    )


def _own_job(svc: Services, owner: str, job_id: str) -> JobRecord:
    job = svc.jobs.get(job_id)
    if job is None or job.owner != owner:  # another key's job is indistinguishable from none
        raise Problem(404, f"no job {job_id}")
    return job


@router.post("", status_code=202, response_model=Job, openapi_extra={"requestBody": _UPLOAD_BODY},
             responses={**responses(400, 401, 408, 413, 415, 422, 429, 503, 507)})
async def create_job(
    request: Request,
    response: Response,
    svc: ServicesDep,
    owner: OwnerDep,
    formats: Annotated[str | None, Query(max_length=200, examples=["ytvis,overlay"],
                                         description=f"comma-separated subset of {', '.join(OUTPUT_FORMATS)} "
                                                     "(default: STEMSEG_FORMATS, as the CLI)")] = None,
    preset: Annotated[str | None, Query(max_length=64, description="must match the served model when given")] = None,
    min_dim: Annotated[int | None, Query(ge=32, le=4096)] = None,
    callback_url: Annotated[str | None, Query(max_length=2048, description="POSTed to when the job ends")] = None,
) -> Job:
    s = svc.settings
    by_reference: SourceJob | None = None
    if is_json(request):
        by_reference = _source_job(await receive_json(request, _JSON_LIMIT, s.upload_idle_timeout_s))
        given = [k for k, v in (("formats", formats), ("preset", preset), ("min_dim", min_dim),
                                ("callback_url", callback_url)) if v is not None]
        if given:
            raise Problem(422, f"with a JSON body give {', '.join(given)} in the body, not in the query")
        formats = ",".join(by_reference.formats) if by_reference.formats is not None else None
        preset, min_dim, callback_url = by_reference.preset, by_reference.min_dim, by_reference.callback_url
        why = check_source(by_reference.source, SourcePolicy.from_settings(s))
        if why:
            raise Problem(422, why)
    try:
        wanted = list(parse_formats(formats) if formats is not None else s.format_list)
    except ValueError as e:  # the CLI's sentence: what is allowed, not a regular expression
        raise Problem(422, str(e)) from None
    if preset and preset != svc.model.name:
        raise Problem(422, f"this service runs the {svc.model.name!r} model, not {preset!r}")
    if callback_url:
        why = check_callback_url(callback_url, s.webhook_host_list)
        if why:
            raise Problem(422, why)
    # Redis first: with Redis down, or the caller over its limits, no byte is read or stored.
    await run_in_threadpool(svc.jobs.check_rate, owner, s.rate_limit_jobs, s.rate_window_s)
    await run_in_threadpool(svc.jobs.check_quota, owner, s.max_active_jobs)
    svc.probes.check(owner)  # this key's probe slots busy: 503 before a byte is read
    staging = f"upload-{svc.jobs.new_id()}"
    try:
        if by_reference is None:
            filename = await receive(request, svc.storage, staging, s.max_upload_bytes, s.upload_idle_timeout_s)
        else:
            filename = await svc.probes.run(owner, _fetch_source, svc, staging, by_reference.source)
        job = await svc.probes.run(
            owner, svc.jobs.admit, staging, owner, model=svc.model, min_dim=min_dim, clips_per_task=s.clips_per_task,
            limits=Limits.from_settings(s), quota=s.max_active_jobs,
            fields={"filename": filename, "formats": wanted, "callback_url": callback_url or None})
    except BaseException:
        if svc.storage.shared_paths:
            svc.storage.delete_job(staging)
        else:  # requests to the store: off the event loop
            await run_in_threadpool(svc.storage.delete_job, staging)
        raise
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _view(job)


def _fetch_source(svc: Services, staging: str, url: str) -> str | None:
    with svc.storage.writer(staging, "video") as out:
        name = fetch(url, out, SourcePolicy.from_settings(svc.settings))
    return clean_filename(name)


@router.get("", response_model=JobList, responses=responses(401, 422, 503))
def list_jobs(svc: ServicesDep, owner: OwnerDep, offset: Annotated[int, Query(ge=0, le=_MAX_OFFSET)] = 0,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    total, jobs = svc.jobs.list(owner, offset, limit)
    return JobList(total=total, offset=offset, limit=limit, items=[_view(j) for j in jobs])


@router.get("/{job_id}", response_model=Job, responses=responses(401, 404, 422, 503))
def get_job(job_id: JobIdPath, svc: ServicesDep, owner: OwnerDep) -> Job:
    return _view(_own_job(svc, owner, job_id))


def _finished(svc: Services, owner: str, job_id: str) -> JobRecord:
    job = _own_job(svc, owner, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise Problem(409, f"job {job_id} is {job.status.value}; results exist once it has succeeded",
                      status_of_job=job.status.value)
    return job


_MOTS_RANGES = ranged_responses("text/plain", "")


@router.get("/{job_id}/result", responses={
    200: {"description": "Tracks (JSON), DAVIS PNGs (zip) or KITTI-MOTS text",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "application/zip": {"schema": {"type": "string", "format": "binary"}},
                      "text/plain": {"schema": {"type": "string"}}}},
    206: {**_MOTS_RANGES[206], "description": "format=mots with a Range header: that byte range"},
    400: _MOTS_RANGES[400], 416: _MOTS_RANGES[416], **REDIRECT,
    **responses(401, 404, 409, 422, 503)})
def get_result(job_id: JobIdPath, svc: ServicesDep, owner: OwnerDep,
               format: Annotated[str, Query(pattern="^(json|davis|mots)$")] = "json") -> Response:
    job = _finished(svc, owner, job_id)
    if format == "davis":
        # With an object store the PNGs are fetched first (a LIST and a GET each).
        with svc.storage.fetch(job_id, f"{files.OUT}/{NAMES['davis']}") as davis:
            if not davis.is_dir() or not any(davis.iterdir()):
                raise Problem(409, "this job was not asked for the davis format")
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
                for png in sorted(davis.glob("*.png")):
                    z.write(png, f"davis/{png.name}")
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-davis.zip"'})
    if format == "mots":
        try:
            return stored_file(svc, job_id, f"{files.OUT}/{NAMES['mots']}", media_type="text/plain")
        except FileNotFoundError:
            raise Problem(409, "this job was not asked for the mots format") from None
    try:
        entries = json.loads(svc.storage.read(job_id, f"{files.OUT}/{NAMES['ytvis']}"))
    except FileNotFoundError:
        raise Problem(409, "this job was not asked for the ytvis format, which the JSON result is made from"
                      ) from None
    tracks = []
    for e in entries:
        boxes = [None if rle is None else mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}
                                                              ).tolist() for rle in e["segmentations"]]
        tracks.append({"id": e.get("track_id"), "category_id": e["category_id"],
                       "category": e.get("category_name"), "score": e["score"],
                       "segmentations": e["segmentations"], "boxes": boxes})
    return Response(json.dumps({"job": job_id, "num_frames": job.num_frames, "width": job.width,
                                "height": job.height, "tracks": tracks}), media_type="application/json")


@router.get("/{job_id}/overlay.mp4", response_class=RangedFile, responses={
    **ranged_responses("video/mp4", "The video with masks drawn"), **REDIRECT, **responses(401, 404, 409, 422, 503)})
def get_overlay(job_id: JobIdPath, svc: ServicesDep, owner: OwnerDep):
    _finished(svc, owner, job_id)
    try:
        return stored_file(svc, job_id, f"{files.OUT}/{NAMES['overlay']}", media_type="video/mp4")
    except FileNotFoundError:
        raise Problem(409, "this job was not asked for the overlay format") from None


# One server-sent event (OpenAPI 3.2's itemSchema); `data` is JSON text; lines starting with
# ":" are keep-alive comments.
_SSE_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "id": {"type": "string", "description": "Redis stream entry id; send back as Last-Event-ID"},
    "event": {"type": "string", "enum": ["status", "frame", "track", "end", "error"]},
    "data": {"type": "string", "description": "JSON"}}}


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "Server-sent events: status, frame, track, then end",
          "content": {"text/event-stream": {"itemSchema": _SSE_EVENT}}},
    **responses(400, 401, 404, 422, 503)})
async def job_events(job_id: JobIdPath, request: Request, svc: ServicesDep, owner: OwnerDep) -> StreamingResponse:
    """The job's events (service.api.events): status, frame, track, then end."""
    ar = svc.aredis

    async def ended() -> str | None:
        status = await svc.jobs.status_async(ar, job_id)
        return "deleted" if status is None else status.value if status.final else None

    return await event_stream(request, svc, owner, events_key=svc.jobs.keys.events(job_id),
                              owner_of=lambda: svc.jobs.owner_async(ar, job_id), ended=ended,
                              not_found=f"no job {job_id}")


@router.delete("/{job_id}", status_code=204, responses=responses(401, 404, 422, 503))
def delete_job(job_id: JobIdPath, svc: ServicesDep, owner: OwnerDep) -> Response:
    _own_job(svc, owner, job_id)
    svc.jobs.cancel(job_id)
    return Response(status_code=204)
