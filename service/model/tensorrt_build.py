"""Native TensorRT engines built from the two exported ONNX graphs, and a cache for them.

An engine is specific to the GPU model, the TensorRT version and the graph, and building one
takes minutes, so serialized engines are cached under a key made of exactly those (plus the
precision and the resolution buckets). Each resolution bucket is an optimisation profile: the
kernels are tuned for that bucket's size while any size up to the preset's maximum still runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from service.model.graph import GRAPHS, LEVELS, STRIDES, graph_path
from service.model.presets import ModelConfig


def _pad32(x: float) -> int:
    return int(math.ceil(x / 32) * 32)


@dataclass(frozen=True)
class Bucket:
    """An optimisation profile's preferred (padded) input size."""

    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> Bucket:
        h, _, w = text.lower().partition("x")
        if not (h.isdigit() and w.isdigit()) or int(h) % 32 or int(w) % 32:
            raise ValueError(f"resolution bucket {text!r}: want HxW with both multiples of 32, e.g. 480x864")
        return cls(int(h), int(w))


def default_buckets(cfg: ModelConfig) -> list[Bucket]:
    """16:9 landscape and portrait at the preset's inference size: what most videos become."""
    short = _pad32(cfg.min_dim)
    long = _pad32(min(cfg.max_dim, cfg.min_dim * 16 / 9))
    return [Bucket(short, long), Bucket(long, short)]


def max_side(cfg: ModelConfig) -> int:
    return _pad32(cfg.max_dim)


def cache_key(onnx_path: Path, *, gpu: str, trt_version: str, fp16: bool, buckets: list[Bucket]) -> str:
    h = hashlib.sha256()
    h.update(Path(onnx_path).read_bytes())
    h.update(json.dumps({"gpu": gpu, "trt": trt_version, "fp16": fp16,
                         "buckets": [(b.height, b.width) for b in buckets]}, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _shapes(graph: str, cfg: ModelConfig, bucket: Bucket) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min / opt / max shape of every input of a graph for one profile."""
    top = max_side(cfg)
    if graph == "backbone":
        new_frames = max(1, cfg.clip_len - cfg.overlap)  # frames a clip adds once features are shared
        return {"images": ((1, 3, 32, 32), (new_frames, 3, bucket.height, bucket.width), (cfg.clip_len, 3, top, top))}
    return {name: ((1, 256, cfg.clip_len, max(1, 32 // s), max(1, 32 // s)),
                   (1, 256, cfg.clip_len, bucket.height // s, bucket.width // s),
                   (1, 256, cfg.clip_len, top // s, top // s)) for name, s in zip(LEVELS, STRIDES)}


def serialize_engine(onnx_path: Path, graph: str, cfg: ModelConfig, buckets: list[Bucket], *, fp16: bool = True,
                 workspace_gib: float = 8.0) -> bytes:
    """Parse an exported graph and build a serialized engine with one profile per bucket."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for bucket in buckets:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in _shapes(graph, cfg, bucket).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see its log above)")
    return bytes(serialized)


def gpu_identity() -> str:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name} sm{props.major}{props.minor}"


def build_or_load(onnx_dir: Path, cfg: ModelConfig, *, buckets: list[Bucket] | None = None, fp16: bool = True,
                  cache_dir: Path | None = None) -> dict[str, Path]:
    """Serialized engines for both graphs, built once per GPU model / TensorRT version / graph."""
    import tensorrt as trt

    buckets = buckets or default_buckets(cfg)
    cache_dir = Path(cache_dir or Path(onnx_dir) / "trt-engines")
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for graph in GRAPHS:
        onnx_path = graph_path(onnx_dir, graph)
        key = cache_key(onnx_path, gpu=gpu_identity(), trt_version=trt.__version__, fp16=fp16, buckets=buckets)
        path = cache_dir / f"{graph}-{key}.engine"
        if not path.is_file():
            data = serialize_engine(onnx_path, graph, cfg, buckets, fp16=fp16)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")  # concurrent builders never see half a file
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(json.dumps({
                "graph": graph, "gpu": gpu_identity(), "tensorrt": trt.__version__, "fp16": fp16,
                "buckets": [f"{b.height}x{b.width}" for b in buckets], "onnx": str(onnx_path)}, indent=2))
        out[graph] = path
    return out


def cached_buckets(onnx_dir: Path, *, gpu: str, trt_version: str, fp16: bool = True,
                   cache_dir: Path | None = None) -> list[Bucket] | None:
    """The buckets of engines already built from these graphs for this GPU and TensorRT
    version (e.g. by `stemseg export tensorrt --buckets ...`), so loading them never rebuilds
    with other buckets; None when there are none. The key is recomputed, so a stale engine of
    an older graph is never taken."""
    cache_dir = Path(cache_dir or Path(onnx_dir) / "trt-engines")
    for side in sorted(cache_dir.glob("backbone-*.json")):
        try:
            info = json.loads(side.read_text())
            buckets = [Bucket.parse(b) for b in info["buckets"]]
        except (OSError, ValueError, KeyError):
            continue
        if info.get("fp16") != fp16:
            continue
        keys = {g: cache_key(graph_path(onnx_dir, g), gpu=gpu, trt_version=trt_version, fp16=fp16,
                             buckets=buckets) for g in GRAPHS}
        if all((cache_dir / f"{g}-{k}.engine").is_file() for g, k in keys.items()):
            return buckets
    return None


__all__ = ["Bucket", "build_or_load", "cache_key", "cached_buckets", "default_buckets", "serialize_engine"]
