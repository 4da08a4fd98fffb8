"""Procedural training and evaluation videos: textured shapes of six classes moving over a
panning textured background, with occlusion, scale and rotation change, objects entering and
leaving the frame, sensor noise and blur. Written as MP4 files plus one YouTube-VIS-format
annotation JSON. Everything is a function of the seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

CLASSES = {1: "disc", 2: "square", 3: "triangle", 4: "star", 5: "cross", 6: "ring"}


def _shape_mask(cls: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Silhouette in the object's own frame, where the shape spans about [-1, 1]."""
    r = np.hypot(xx, yy)
    a = np.arctan2(yy, xx)
    if cls == 1:
        return r <= 1.0
    if cls == 2:
        return (np.abs(xx) <= 0.85) & (np.abs(yy) <= 0.85)
    if cls == 3:
        return (yy <= 0.8) & (yy >= 1.9 * np.abs(xx) - 1.0)
    if cls == 4:
        return r <= 0.55 + 0.45 * (0.5 + 0.5 * np.cos(5 * a))
    if cls == 5:
        return ((np.abs(xx) <= 0.3) & (np.abs(yy) <= 1.0)) | ((np.abs(yy) <= 0.3) & (np.abs(xx) <= 1.0))
    return (r <= 1.0) & (r >= 0.55)


@dataclass
class _Object:
    cls: int
    colour: np.ndarray
    stripes: float
    size: float
    path: np.ndarray  # [4]: x0, y0, vx, vy in pixels and pixels/frame
    wobble: np.ndarray  # [2] amplitude, phase
    rot0: float
    rot_speed: float
    scale_speed: float
    z: float


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random texture larger than the frame, for camera pan."""
    small = rng.uniform(40, 200, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    yy = np.linspace(0, small.shape[0] - 1.001, h)
    xx = np.linspace(0, small.shape[1] - 1.001, w)
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = (yy - y0)[:, None, None], (xx - x0)[None, :, None]
    big = (small[y0][:, x0] * (1 - fy) * (1 - fx) + small[y0 + 1][:, x0] * fy * (1 - fx)
           + small[y0][:, x0 + 1] * (1 - fy) * fx + small[y0 + 1][:, x0 + 1] * fy * fx)
    grain = rng.normal(0, 12, (h, w, 1)).astype(np.float32)
    return np.clip(big + grain, 0, 255)


def render_video(seed: int, frames: int = 24, size: tuple[int, int] = (128, 160)) -> tuple[np.ndarray, list[dict]]:
    """[T, H, W, 3] uint8 BGR frames and per-object {category_id, masks [T, H, W] bool}."""
    rng = np.random.default_rng(seed)
    h, w = size
    pan = rng.uniform(-1.5, 1.5, 2)
    bg = _background(rng, h + int(abs(pan[1]) * frames) + 8, w + int(abs(pan[0]) * frames) + 8)
    objects = []
    for _ in range(rng.integers(1, 5)):
        size_px = rng.uniform(0.12, 0.22) * min(h, w)
        start = rng.uniform([-0.1 * w, 0.1 * h], [1.1 * w, 0.9 * h])
        target = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h])
        velocity = (target - start) / frames * rng.uniform(0.8, 1.6)
        objects.append(_Object(
            cls=int(rng.integers(1, 7)), colour=rng.uniform(20, 235, 3), stripes=rng.uniform(0.15, 0.5),
            size=size_px, path=np.concatenate([start, velocity]),
            wobble=np.array([rng.uniform(0, 6), rng.uniform(0, 6.3)]),
            rot0=rng.uniform(0, 2 * np.pi), rot_speed=rng.uniform(-0.08, 0.08), scale_speed=rng.uniform(-0.01, 0.015),
            z=rng.uniform()))
    objects.sort(key=lambda o: o.z)  # painter's order: later objects occlude earlier ones
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    video = np.empty((frames, h, w, 3), np.uint8)
    masks = np.zeros((len(objects), frames, h, w), bool)
    for t in range(frames):
        ox, oy = int(4 + (pan[0] * t if pan[0] > 0 else abs(pan[0]) * (frames - t))), \
            int(4 + (pan[1] * t if pan[1] > 0 else abs(pan[1]) * (frames - t)))
        img = bg[oy:oy + h, ox:ox + w].copy()
        owner = np.full((h, w), -1)
        for i, o in enumerate(objects):
            cx = o.path[0] + o.path[2] * t + o.wobble[0] * math.sin(0.3 * t + o.wobble[1])
            cy = o.path[1] + o.path[3] * t
            scale = o.size * max(0.4, 1 + o.scale_speed * t)
            theta = o.rot0 + o.rot_speed * t
            c, s = math.cos(theta), math.sin(theta)
            lx = ((xx - cx) * c + (yy - cy) * s) / scale
            ly = (-(xx - cx) * s + (yy - cy) * c) / scale
            m = _shape_mask(o.cls, lx, ly)
            texture = 0.75 + 0.25 * np.sign(np.sin(lx / o.stripes * np.pi))[..., None]
            img[m] = (o.colour * texture)[m]
            owner[m] = i
        for i in range(len(objects)):
            masks[i, t] = owner == i
        img = img + rng.normal(0, 4, img.shape)
        if rng.uniform() < 0.3:  # motion blur on some frames
            img = (img + np.roll(img, 1, axis=1) + np.roll(img, -1, axis=1)) / 3
        video[t] = np.clip(img, 0, 255).astype(np.uint8)
    annotations = [{"category_id": o.cls, "masks": masks[i]} for i, o in enumerate(objects) if masks[i].any()]
    return video, annotations


def _write_mp4(path: Path, video: np.ndarray, fps: int = 10) -> None:
    import av  # only encoding needs PyAV; rendering runs anywhere

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # The same frames must give the same file, or held-out scores move from one `synth` run
        # to the next (0.03 AP on 12 videos). Measured with the x264 in PyAV's wheel, 15
        # encodes of one video: its assembly gave up to 9 different bitstreams, its C code
        # with frame threads up to 4; the C code on one thread always the same one.
        stream.options = {"crf": "17", "x264-params": "asm=0:threads=1"}
        for t, img in enumerate(video):
            frame = av.VideoFrame.from_ndarray(img, format="bgr24")
            frame.pts = t
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)


def write_dataset(out: Path, videos: int, seed: int, frames: int = 24, size: tuple[int, int] = (128, 160),
                  encode: bool = True) -> Path:
    """MP4s in out/videos and out/annotations.json (YouTube-VIS format). Video i uses seed
    `seed * 100003 + i`, so datasets made from different seeds share no video. `encode=False`
    writes the annotations alone (the frames can be re-rendered from the seed)."""
    (out / "videos").mkdir(parents=True, exist_ok=True)
    doc = {"info": {"generator": "stemseg synth", "seed": seed, "frames": frames, "size": list(size)},
           "categories": [{"id": k, "name": v} for k, v in CLASSES.items()], "videos": [], "annotations": []}
    ann_id = 1
    for i in range(videos):
        video, objects = render_video(seed * 100003 + i, frames, size)
        name = f"{i:05d}.mp4"
        if encode:
            _write_mp4(out / "videos" / name, video)
        doc["videos"].append({"id": i + 1, "file_name": f"videos/{name}", "length": frames,
                              "height": size[0], "width": size[1]})
        for o in objects:
            segs = []
            for t in range(frames):
                if o["masks"][t].any():
                    rle = mask_utils.encode(np.asfortranarray(o["masks"][t].astype(np.uint8)))
                    segs.append({"size": rle["size"], "counts": rle["counts"].decode()})
                else:
                    segs.append(None)
            doc["annotations"].append({"id": ann_id, "video_id": i + 1, "category_id": o["category_id"],
                                       "segmentations": segs, "iscrowd": 0,
                                       "areas": [int(m.sum()) or None for m in o["masks"]]})
            ann_id += 1
    (out / "annotations.json").write_text(json.dumps(doc))
    return out
