"""Compact, idempotent encodings of what workers hand over: a clustered clip (label maps as
packed int16, per-label statistics and RLEs) and a stitched clip's frame tracks."""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from service.pipeline.runner import ClusteredClip, FrameStats, FrameTracks


def _rle_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _rle_native(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode()}


def clip_to_bytes(clip: ClusteredClip) -> bytes:
    labels = clip.labels.numpy()
    if labels.size and (labels.max() > np.iinfo(np.int16).max):
        raise ValueError("more labels than int16 holds")
    owned = [{"index": s.index, "labels": s.labels, "pixels": s.pixels, "rles": [_rle_json(r) for r in s.rles],
              "logit_sums": None if s.logit_sums is None else s.logit_sums.tolist(),
              "votes": None if s.votes is None else s.votes.tolist()} for s in clip.owned]
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=labels.astype(np.int16),
                        meta=np.array(json.dumps({"index": clip.index, "frames": clip.frames, "owned": owned})))
    return buf.getvalue()


def clip_from_bytes(data: bytes) -> ClusteredClip:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].item())
        labels = torch.from_numpy(z["labels"].astype(np.int64))
    owned = [FrameStats(o["index"], o["labels"], o["pixels"], [_rle_native(r) for r in o["rles"]],
                        None if o["logit_sums"] is None else np.array(o["logit_sums"]),
                        None if o["votes"] is None else np.array(o["votes"], dtype=np.int64))
             for o in meta["owned"]]
    return ClusteredClip(meta["index"], meta["frames"], labels, owned)


def frames_to_bytes(frames: list[FrameTracks]) -> bytes:
    return json.dumps([{"index": f.index, "track_ids": f.track_ids, "rles": [_rle_json(r) for r in f.rles]}
                       for f in frames]).encode()


def frames_from_bytes(data: bytes) -> list[dict]:
    """[{index, track_ids, rles}] with RLEs in pycocotools' form."""
    frames = json.loads(data)
    for f in frames:
        f["rles"] = [_rle_native(r) for r in f["rles"]]
    return frames
