"""ONNX export and ONNX Runtime parity with the PyTorch network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
ort = pytest.importorskip("onnxruntime")

from model_export.onnx_export import export_onnx
from service.model.checkpoint import load_model, state_dict_hash
from service.model.engine_spec import EngineSpec
from service.model.engines import EngineError, OnnxRuntimeEngine, build_engine
from service.model.graph import graph_metadata
from service.model.stemseg import stack_clip

REF = Path(__file__).parent / "fixtures" / "reference"


@pytest.fixture(scope="module")
def exported(official_weights, tmp_path_factory):
    """Each preset exported once for the module."""
    made = {}

    def get(preset: str):
        if preset not in made:
            model = load_model(official_weights(preset))
            made[preset] = (model, export_onnx(model, tmp_path_factory.mktemp(f"onnx_{preset}")))
        return made[preset]

    return get


@pytest.mark.parametrize("preset, vector", [
    ("kitti_mots", "model_kitti_mots_2_s0.npz"),
    pytest.param("youtube_vis", "model_youtube_vis_s0.npz", marks=pytest.mark.slow),
    pytest.param("davis", "model_davis_2_s0.npz", marks=pytest.mark.slow)])
def test_onnxruntime_cpu_matches_torch(exported, preset: str, vector: str) -> None:
    model, graphs = exported(preset)
    engine = OnnxRuntimeEngine(graphs.backbone.parent, "cpu")
    assert engine.cfg == model.cfg
    images = torch.from_numpy(np.load(REF / vector)["input_images"])
    with torch.inference_mode():
        feats = model.frame_features(images)
        ref = model.clip_heads([stack_clip(f) for f in feats])
    ours_feats = engine.frame_features(images)
    for a, b in zip(ours_feats, feats):
        assert (a - b).abs().max() <= 1e-2 + 1e-4 * b.abs().max()
    out = engine.clip_heads([stack_clip(f) for f in feats])
    assert (out.embeddings - ref.embeddings).abs().max() <= 1e-4
    assert (out.seediness - ref.seediness).abs().max() <= 1e-4
    torch.testing.assert_close(out.bandwidths, ref.bandwidths, rtol=1e-4, atol=1e-4)
    if ref.semseg_logits is not None:
        torch.testing.assert_close(out.semseg_logits, ref.semseg_logits, rtol=1e-4, atol=1e-4)


def test_graphs_carry_metadata_and_pass_the_checker(exported) -> None:
    model, graphs = exported("kitti_mots")
    for path in (graphs.backbone, graphs.heads):
        onnx.checker.check_model(str(path))
    meta = graph_metadata(graphs.heads.parent)
    assert json.loads(meta["stemseg.preset"])["name"] == "kitti_mots"
    assert meta["stemseg.weights_sha256"] == state_dict_hash(model.state_dict())
    assert json.loads(meta["stemseg.classes"]) == {"1": "car", "2": "pedestrian"}


def test_dynamic_resolution_and_aspect(exported) -> None:
    model, graphs = exported("kitti_mots")
    engine = OnnxRuntimeEngine(graphs.backbone.parent, "cpu")
    images = torch.randn(8, 3, 128, 64) * 50  # portrait, unlike the export sample
    with torch.inference_mode():
        feats = [stack_clip(f) for f in model.frame_features(images)]
        ref = model.clip_heads(feats)
    out = engine.clip_heads(feats)
    assert (out.embeddings - ref.embeddings).abs().max() <= 1e-4


def test_missing_graphs_and_backends_are_clear(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="stemseg export onnx"):
        build_engine(EngineSpec("onnxruntime", onnx_dir=tmp_path, device="cpu"))
    with pytest.raises(EngineError, match="kind=onnxruntime needs onnx_dir"):
        EngineSpec("onnxruntime")
    if not torch.cuda.is_available():
        for kind in ("onnxruntime-trt", "tensorrt"):
            with pytest.raises(EngineError, match="CUDA"):
                build_engine(EngineSpec(kind, onnx_dir=tmp_path, device="cpu"))


@pytest.mark.skipif("TensorrtExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU and ONNX Runtime with the TensorRT execution provider")
def test_onnxruntime_tensorrt_provider_fp16_close_to_torch(exported) -> None:
    model, graphs = exported("kitti_mots")
    engine = build_engine(EngineSpec("onnxruntime-trt", onnx_dir=graphs.backbone.parent, device="cuda"))
    images = torch.from_numpy(np.load(REF / "model_kitti_mots_2_s0.npz")["input_images"])
    with torch.inference_mode():
        ref = model.clip_heads([stack_clip(f) for f in model.frame_features(images)])
    out = engine.clip_heads([stack_clip(f) for f in engine.frame_features(images)])
    assert (out.embeddings - ref.embeddings).abs().max() <= 2e-2
    assert (out.seediness - ref.seediness).abs().max() <= 2e-2


def _tensorrt_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "needs the tensorrt package"
    return None


@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_native_tensorrt_fp16_close_to_torch_and_cached(exported) -> None:
    model, graphs = exported("kitti_mots")
    engine = build_engine(EngineSpec("tensorrt", onnx_dir=graphs.backbone.parent, device="cuda"))
    images = torch.from_numpy(np.load(REF / "model_kitti_mots_2_s0.npz")["input_images"])
    cuda_model = model.to("cuda")
    with torch.inference_mode():
        ref = cuda_model.clip_heads([stack_clip(f) for f in cuda_model.frame_features(images.cuda())])
        out = engine.clip_heads([stack_clip(f) for f in engine.frame_features(images.cuda())])
    assert out.embeddings.device.type == "cuda"
    assert (out.embeddings - ref.embeddings).abs().max() <= 2e-2
    assert (out.seediness - ref.seediness).abs().max() <= 2e-2
    engines = sorted((graphs.backbone.parent / "trt-engines").glob("*.engine"))
    assert len(engines) == 2
    build_engine(EngineSpec("tensorrt", onnx_dir=graphs.backbone.parent, device="cuda"))  # second load: cached
    assert sorted((graphs.backbone.parent / "trt-engines").glob("*.engine")) == engines


def test_tensorrt_profiles_cover_every_preset_and_key_the_cache(tmp_path: Path) -> None:
    """What can be checked without a GPU: each profile's min <= opt <= max on every input, the
    buckets parse strictly, and the cache key changes with GPU, TensorRT version and graph."""
    from service.model.presets import PRESETS
    from service.model.tensorrt_build import Bucket, _shapes, cache_key, default_buckets

    for cfg in PRESETS.values():
        for graph in ("backbone", "heads"):
            for bucket in default_buckets(cfg):
                for name, (lo, opt, hi) in _shapes(graph, cfg, bucket).items():
                    assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (cfg.name, graph, name)
    assert Bucket.parse("480x864") == Bucket(480, 864)
    for bad in ("480", "479x864", "axb"):
        with pytest.raises(ValueError, match="multiples of 32"):
            Bucket.parse(bad)
    graph = tmp_path / "heads.onnx"
    graph.write_bytes(b"graph one")
    key = {"gpu": "NVIDIA H100 sm90", "trt_version": "10.13.0", "fp16": True, "buckets": [Bucket(480, 864)]}
    base = cache_key(graph, **key)
    assert cache_key(graph, **key) == base
    for change in ({"gpu": "NVIDIA L4 sm89"}, {"trt_version": "10.14.1"}, {"fp16": False},
                   {"buckets": [Bucket(864, 480)]}):
        assert cache_key(graph, **{**key, **change}) != base, change
    graph.write_bytes(b"graph two")
    assert cache_key(graph, **key) != base


def test_onnxruntime_cpu_matches_torch_on_the_shipped_weights(lite_weights, tmp_path: Path) -> None:
    from service.pipeline.preprocess import IMAGE_MEAN_BGR
    from service.training.synth import render_video

    model = load_model(lite_weights)
    engine = OnnxRuntimeEngine(export_onnx(model, tmp_path).backbone.parent, "cpu")
    frames, _ = render_video(seed=4242, frames=model.cfg.clip_len, size=(128, 160))
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() - torch.tensor(IMAGE_MEAN_BGR).view(1, 3, 1, 1)
    with torch.inference_mode():
        ref = model.clip_heads([stack_clip(f) for f in model.frame_features(images)])
    out = engine.clip_heads([stack_clip(f) for f in engine.frame_features(images)])
    assert (out.embeddings - ref.embeddings).abs().max() <= 1e-4
    assert (out.seediness - ref.seediness).abs().max() <= 1e-4


def test_cached_engines_are_found_whatever_their_buckets(tmp_path: Path) -> None:
    """`stemseg export tensorrt --buckets ...` then `--engine tensorrt`: the engine loads what was
    built (no rebuild with the default buckets), and never an engine of an older graph."""
    from service.model.tensorrt_build import Bucket, cache_key, cached_buckets

    for g in ("backbone", "heads"):
        (tmp_path / f"{g}.onnx").write_bytes(f"{g} graph v1".encode())
    cache = tmp_path / "trt-engines"
    cache.mkdir()
    ident = {"gpu": "NVIDIA H100 80GB HBM3 sm90", "trt_version": "10.13.0"}
    assert cached_buckets(tmp_path, **ident) is None
    built = [Bucket(480, 864), Bucket(256, 448)]
    for g in ("backbone", "heads"):
        key = cache_key(tmp_path / f"{g}.onnx", fp16=True, buckets=built, **ident)
        (cache / f"{g}-{key}.engine").write_bytes(b"engine")
        (cache / f"{g}-{key}.json").write_text(json.dumps({"graph": g, "fp16": True,
                                                            "buckets": ["480x864", "256x448"]}))
    assert cached_buckets(tmp_path, **ident) == built
    assert cached_buckets(tmp_path, **ident, fp16=False) is None
    assert cached_buckets(tmp_path, **{**ident, "gpu": "NVIDIA L4 sm89"}) is None
    (tmp_path / "heads.onnx").write_bytes(b"heads graph v2")
    assert cached_buckets(tmp_path, **ident) is None
