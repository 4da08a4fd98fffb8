"""A finished job's output folder, file by file: the same folder `stemseg segment` writes
(`service.outputs.write`), listed by its manifest, so a client can rebuild it exactly."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel

from service.api.deps import JobIdPath, OwnerDep, ServicesDep
from service.api.problems import Problem, responses
from service.api.routes.jobs import _finished
from service.api.stored import REDIRECT, stored_file
from service.jobs import files
from service.outputs.write import MANIFEST

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class OutputFile(BaseModel):
    path: str
    size: int
    url: str


class OutputFolder(BaseModel):
    formats: list[str]
    files: list[OutputFile]


def read_manifest(svc, owner_dir: str, folder: str, gone: str) -> tuple[list[str], list[str]]:
    """An output folder's formats and files (as its manifest lists them, the manifest last), from
    whichever store; 410 `gone` when the manifest is missing or unreadable (it was written, so its
    files were lost)."""
    try:
        manifest = json.loads(svc.storage.read(owner_dir, f"{folder}/{MANIFEST}"))
        return list(manifest["formats"]), [*manifest["files"], MANIFEST]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Problem(410, gone) from e


def listed_sizes(svc, owner_dir: str, folder: str, names: list[str], gone: str) -> dict[str, int]:
    """The sizes of an output folder's listed files, in one listing of the store; 410 `gone` when
    any of them is missing."""
    sizes = svc.storage.sizes(owner_dir, folder)
    if any(n not in sizes for n in names):
        raise Problem(410, gone)
    return sizes


_GONE = "this job's output files are gone from the server"


@router.get("/{job_id}/files", response_model=OutputFolder, responses=responses(401, 404, 409, 410, 422, 503))
def list_files(job_id: JobIdPath, svc: ServicesDep, owner: OwnerDep) -> OutputFolder:
    """Every file of the output folder, its manifest (`stemseg-output.json`) included."""
    _finished(svc, owner, job_id)
    formats, names = read_manifest(svc, job_id, files.OUT, _GONE)
    sizes = listed_sizes(svc, job_id, files.OUT, names, _GONE)
    return OutputFolder(formats=formats, files=[
        OutputFile(path=n, size=sizes[n], url=f"/v1/jobs/{job_id}/files/{n}") for n in names])


@router.get("/{job_id}/files/{name:path}", response_class=FileResponse, responses={
    200: {"description": "One file of the output folder", "content": {
        media: {"schema": {"type": "string", "format": "binary"}}
        for media in ("application/json", "image/png", "text/plain; charset=utf-8", "video/mp4")}},
    **REDIRECT, **responses(401, 404, 409, 410, 422, 503)})
def get_file(job_id: JobIdPath, name: Annotated[str, PathParam(max_length=300)], svc: ServicesDep,
             owner: OwnerDep) -> Response:
    _finished(svc, owner, job_id)
    _, names = read_manifest(svc, job_id, files.OUT, _GONE)
    if name not in names:  # only what the manifest lists: no path of the caller's choosing is opened
        raise Problem(404, f"the job's output has no file {name!r}")
    try:
        return stored_file(svc, job_id, f"{files.OUT}/{name}", filename=name.rsplit("/", 1)[-1], ranged=False)
    except FileNotFoundError:
        raise Problem(410, _GONE) from None
