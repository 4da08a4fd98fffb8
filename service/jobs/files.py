"""Every file a job's folder holds (a directory, or a prefix of objects: service.jobs.storage),
named in one place (as keys.py names its Redis keys).

| name | written by | when |
| --- | --- | --- |
| `video` | the API | on upload |
| `clips/{k}.npz` | the clip task holding clip k | clustered (service.jobs.encoding) |
| `frames/{k}.json` | the stitcher | clip k chained: the final track ids and RLEs of the frames it owns |
| `stitch.npz` | the stitcher | after every clip: what the next clip needs |
| `render/labels.json` | the stitcher | after the last clip: what the outputs show of each track |
| `render/...` | output tasks | one range of frames each (service.outputs.render) |
| `out/` | the finishing step | once, atomically, with the manifest (service.outputs.names) |
"""

from __future__ import annotations

VIDEO = "video"
OUT = "out"
STITCH_STATE = "stitch.npz"
RENDER = "render"
LABELS = f"{RENDER}/labels.json"


def clip_file(k: int) -> str:
    return f"clips/{k:05d}.npz"


def frames_file(k: int) -> str:
    return f"frames/{k:05d}.json"
