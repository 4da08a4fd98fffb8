"""Every byte encoding of what workers hand over, in one place: a clustered clip (label maps as
packed int16, per-label statistics and RLEs), a stitched clip's frame tracks, and the stitcher's
state between clips. Compact and idempotent: a redelivered task rewrites the same bytes."""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from service.pipeline.handover import ClusteredClip, FrameStats, FrameTracks
from service.pipeline.stitcher import Stitcher
from service.pipeline.tracks import Track


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


def stitcher_to_bytes(st: Stitcher) -> bytes:
    next_id, previous = st.chainer.state()
    meta = {
        "next_clip": st.next_clip, "next_track_id": next_id, "min_iou": st.min_iou,
        "tracks": [{"id": t.id, "first": t.first_frame, "last": t.last_frame, "pixels": t.pixels,
                    "logits": None if t.class_logit_sum is None else t.class_logit_sum.tolist(),
                    "votes": None if t.class_votes is None else t.class_votes.tolist()}
                   for t in st.tracks.values()],
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)),
                        **{f"frame_{f}": m.numpy().astype(np.int32) for f, m in previous.items()})
    return buf.getvalue()


def stitcher_from_bytes(data: bytes, keep_masks: bool = False) -> Stitcher:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].item())
        previous = {int(k[6:]): torch.from_numpy(z[k].astype(np.int64)) for k in z.files if k.startswith("frame_")}
    st = Stitcher(meta["min_iou"], keep_masks=keep_masks)
    st.next_clip = meta["next_clip"]
    st.chainer.load_state(meta["next_track_id"], previous)
    for t in meta["tracks"]:
        st.tracks[t["id"]] = Track(
            t["id"], t["first"], t["last"], t["pixels"],
            None if t["logits"] is None else np.array(t["logits"]),
            None if t["votes"] is None else np.array(t["votes"], dtype=np.int64))
    return st
