"""/v1/jobs: upload a video, follow the job, fetch its tracks."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
import zipfile
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pycocotools import mask as mask_utils
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.api.deps import Services, caller, services
from service.api.problems import Problem
from service.jobs.records import FINAL
from service.pipeline.clips import clip_plan
from service.video import VideoError, probe

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
FORMATS = ("ytvis", "davis", "mots", "overlay")


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


class Job(BaseModel):
    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    created_at: float
    updated_at: float
    progress: Progress
    video: VideoInfoOut
    options: dict[str, Any]
    timings: dict[str, float]
    error: str | None = None
    tracks: int | None = None
    links: dict[str, str]


class JobList(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[Job]


def _view(job: dict[str, Any]) -> Job:
    jid = job["id"]
    timings = {}
    if job.get("started_at"):
        timings["queued_s"] = job["started_at"] - job["created_at"]
        timings["running_s"] = job.get("finished_at", time.time()) - job["started_at"]
    return Job(
        id=jid, status=job["status"], created_at=job["created_at"], updated_at=job["updated_at"],
        progress=Progress(clips_done=min(job["clips_done"], job["num_clips"]), clips_total=job["num_clips"],
                          frames_done=job["frames_done"], frames_total=job["num_frames"]),
        video=VideoInfoOut(filename=job.get("filename"), width=job["width"], height=job["height"],
                           num_frames=job["num_frames"], fps=job.get("fps")),
        options={"formats": job["formats"], "min_dim": job.get("min_dim"), "preset": job.get("preset")},
        timings=timings, error=job.get("error"), tracks=job.get("tracks"),
        links={"self": f"/v1/jobs/{jid}", "result": f"/v1/jobs/{jid}/result", "events": f"/v1/jobs/{jid}/events",
               "overlay": f"/v1/jobs/{jid}/overlay.mp4"},
    )


def _own_job(svc: Services, owner: str, job_id: str) -> dict[str, Any]:
    job = svc.jobs.get(job_id)
    if job is None or job["owner"] != owner:  # another key's job is indistinguishable from none
        raise Problem(404, f"no job {job_id}")
    return job


async def _receive_upload(request: Request, svc: Services, job_id: str) -> str | None:
    """Stream the body (multipart field `file`, or raw video/*) to storage; returns the file name."""
    limit = svc.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise Problem(413, f"the upload is larger than the limit of {limit} bytes")
    ctype = request.headers.get("content-type", "")
    target = svc.storage.path(job_id, "video")
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise Problem(422, "multipart upload without a file field named 'file'")
        name = upload.filename
        with target.open("wb") as out:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise Problem(413, f"the upload is larger than the limit of {limit} bytes")
                out.write(chunk)
    elif ctype.startswith(("video/", "application/octet-stream")):
        name = request.headers.get("x-filename")
        with target.open("wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Problem(413, f"the upload is larger than the limit of {limit} bytes")
                out.write(chunk)
    else:
        raise Problem(415, f"send the video as multipart/form-data (field 'file') or as a video/* body, not {ctype!r}")
    if size == 0:
        raise Problem(422, "the upload is empty")
    return name


@router.post("", status_code=202, response_model=Job, responses={
    400: {"description": "not a usable video"}, 413: {"description": "too large"}, 415: {}, 422: {}})
async def create_job(
    request: Request,
    response: Response,
    svc: Annotated[Services, Depends(services)],
    owner: Annotated[str, Depends(caller)],
    formats: Annotated[str, Query(description="comma-separated: ytvis, davis, mots, overlay")] = "ytvis,davis,mots",
    preset: Annotated[str | None, Query(description="must match the workers' model when given")] = None,
    min_dim: Annotated[int | None, Query(ge=32, le=4096)] = None,
) -> Job:
    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    if not wanted or any(f not in FORMATS for f in wanted):
        raise Problem(422, f"formats must be a comma-separated subset of {', '.join(FORMATS)}")
    cfg = request.app.state.model_cfg
    if preset is not None and preset != cfg.name:
        raise Problem(422, f"this service runs the {cfg.name!r} model, not {preset!r}")
    if min_dim is not None:
        cfg = cfg.with_min_dim(min_dim)
    staging = f"upload-{uuid.uuid4().hex}"
    try:
        filename = await _receive_upload(request, svc, staging)
        info = await run_in_threadpool(probe, svc.storage.path(staging, "video"), max_pixels=svc.settings.max_frame_pixels)
    except VideoError as e:
        svc.storage.delete_job(staging)
        raise Problem(400, str(e).splitlines()[0], title="Not a usable video") from None
    except BaseException:
        svc.storage.delete_job(staging)
        raise
    plan = clip_plan(info.num_frames, cfg.clip_len, cfg.overlap)
    job_id = svc.jobs.create(owner, {
        "filename": filename, "num_frames": info.num_frames, "width": info.width, "height": info.height,
        "fps": info.fps, "num_clips": len(plan), "formats": wanted, "min_dim": min_dim, "preset": cfg.name,
        "min_iou": None, "stitched": 0,
    })
    svc.storage.path(staging, "video").parent.rename(svc.storage.path(job_id, "video").parent)
    step = svc.settings.clips_per_task
    for start in range(0, len(plan), step):
        svc.queue.put(job_id, start, min(start + step, len(plan)))
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return _view(svc.jobs.get(job_id))


@router.get("", response_model=JobList)
def list_jobs(svc: Annotated[Services, Depends(services)], owner: Annotated[str, Depends(caller)],
              offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    total, jobs = svc.jobs.list(owner, offset, limit)
    return JobList(total=total, offset=offset, limit=limit, items=[_view(j) for j in jobs])


@router.get("/{job_id}", response_model=Job)
def get_job(job_id: str, svc: Annotated[Services, Depends(services)], owner: Annotated[str, Depends(caller)]) -> Job:
    return _view(_own_job(svc, owner, job_id))


def _finished(svc: Services, owner: str, job_id: str) -> dict[str, Any]:
    job = _own_job(svc, owner, job_id)
    if job["status"] != "succeeded":
        raise Problem(409, f"job {job_id} is {job['status']}; results exist once it has succeeded",
                      status_of_job=job["status"])
    return job


@router.get("/{job_id}/result", responses={200: {"content": {"application/json": {}, "application/zip": {},
                                                              "text/plain": {}}}})
def get_result(job_id: str, svc: Annotated[Services, Depends(services)], owner: Annotated[str, Depends(caller)],
               format: Annotated[str, Query(pattern="^(json|davis|mots)$")] = "json") -> Response:
    job = _finished(svc, owner, job_id)
    out = svc.storage.path(job_id, "out")
    if format == "davis":
        if not (out / "davis").is_dir():
            raise Problem(409, "this job was not asked for the davis format")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for png in sorted((out / "davis").glob("*.png")):
                z.write(png, f"davis/{png.name}")
        return Response(buf.getvalue(), media_type="application/zip",
                         headers={"Content-Disposition": f'attachment; filename="{job_id}-davis.zip"'})
    if format == "mots":
        if not (out / "mots.txt").is_file():
            raise Problem(409, "this job was not asked for the mots format")
        return FileResponse(out / "mots.txt", media_type="text/plain")
    if not (out / "results.json").is_file():
        raise Problem(409, "this job was not asked for the ytvis format, which the JSON result is made from")
    entries = json.loads((out / "results.json").read_text())
    tracks = []
    for e in entries:
        boxes = [None if rle is None else mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}
                                                              ).tolist() for rle in e["segmentations"]]
        tracks.append({"id": e.get("track_id"), "category_id": e["category_id"],
                       "category": e.get("category_name"), "score": e["score"],
                       "segmentations": e["segmentations"], "boxes": boxes})
    return Response(json.dumps({"job": job_id, "num_frames": job["num_frames"], "width": job["width"],
                                "height": job["height"], "tracks": tracks}), media_type="application/json")


@router.get("/{job_id}/overlay.mp4", response_class=FileResponse)
def get_overlay(job_id: str, svc: Annotated[Services, Depends(services)], owner: Annotated[str, Depends(caller)]):
    _finished(svc, owner, job_id)
    path = svc.storage.path(job_id, "out") / "overlay.mp4"
    if not path.is_file():
        raise Problem(409, "this job was not asked for the overlay format")
    return FileResponse(path, media_type="video/mp4")


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, request: Request, svc: Annotated[Services, Depends(services)],
                     owner: Annotated[str, Depends(caller)]) -> StreamingResponse:
    _own_job(svc, owner, job_id)
    after = request.headers.get("last-event-id") or "0-0"

    async def stream():
        nonlocal after
        while not await request.is_disconnected():
            events = await run_in_threadpool(svc.jobs.read_events, job_id, after, 1000)
            for entry_id, kind, data in events:
                after = entry_id
                yield f"id: {entry_id}\nevent: {kind}\ndata: {data}\n\n"
            job = svc.jobs.get(job_id)
            if job is None or (job["status"] in FINAL and not events):
                yield f"event: end\ndata: {json.dumps({'status': job['status'] if job else 'deleted'})}\n\n"
                return
            await asyncio.sleep(0)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: str, svc: Annotated[Services, Depends(services)], owner: Annotated[str, Depends(caller)]) -> Response:
    _own_job(svc, owner, job_id)
    svc.jobs.transition(job_id, "cancelled")
    svc.jobs.delete(job_id)
    svc.storage.delete_job(job_id)
    return Response(status_code=204)
