"""Inference engines: the two halves of the network (frame backbone, clip heads) behind one face.

The pipeline and the workers only call `frame_features` and `clip_heads`, so the network can
run as eager PyTorch, as the exported ONNX graphs under ONNX Runtime (CPU, CUDA or its
TensorRT execution provider), or as native TensorRT engines built from those graphs. A
backend that is not installed is reported, not crashed on. `build_engine` is the one way from
an `EngineSpec` (service.model.engine_spec) to a running engine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from service.model.engine_spec import COMPILE_MODES, ENGINES, EngineError, EngineSpec, check_torch_options
from service.model.graph import HEAD_OUTPUTS, IMAGES, LEVELS, PRESET_KEY, WEIGHTS_KEY, graph_config, graph_paths
from service.model.presets import ModelConfig
from service.model.stemseg import ClipOutputs, STEmSeg


class Engine(Protocol):
    cfg: ModelConfig
    device: torch.device

    def frame_features(self, images: Tensor) -> list[Tensor]: ...

    def clip_heads(self, feats: list[Tensor]) -> ClipOutputs: ...


AUTOCAST = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngine:
    """Eager PyTorch, optionally under autocast and/or torch.compile.

    Autocast runs convolutions in bf16/fp16 but hands the heads' outputs back as float32, so
    clustering, its thresholds and the outputs are computed exactly as in fp32. The backbone's
    features stay in the reduced dtype (half the memory traffic between the two halves).
    `compile="reduce-overhead"` is torch.compile's CUDA-graph mode: each new input shape is
    captured once and replayed, which removes the per-kernel launch cost of the eager network.
    """

    def __init__(self, model: STEmSeg, compile: bool | str = False, autocast: str | None = None) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        mode = ("default" if compile is True else "off") if isinstance(compile, bool) else compile
        autocast = autocast or "off"
        check_torch_options(mode, autocast)
        if autocast == "fp16" and self.device.type != "cuda":
            raise EngineError("fp16 autocast needs a CUDA GPU; on the CPU use bf16")
        self.autocast, self.compile = autocast, mode
        self._dtype = AUTOCAST[autocast]
        self._backbone, self._heads = model.backbone, model.clip_heads
        if mode != "off":
            # Shapes vary little (first clip, steady state, tail), so static graphs per shape win
            # and CUDA graphs need them; reduce-overhead marks the outputs' memory as reused.
            self._backbone = torch.compile(model.backbone, mode=mode, dynamic=False)
            self._heads = torch.compile(model.clip_heads, mode=mode, dynamic=False)

    def _ctx(self):
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def frame_features(self, images: Tensor) -> list[Tensor]:
        with self._ctx():
            feats = self._backbone(images)
        if self.compile == "reduce-overhead":
            feats = [f.clone() for f in feats]  # CUDA-graph outputs are overwritten by the next replay
        return list(feats)

    def clip_heads(self, feats: list[Tensor]) -> ClipOutputs:
        with self._ctx():
            out = self._heads(feats)
        if self._dtype is None and self.compile != "reduce-overhead":
            return out
        f = (lambda t: None if t is None else t.float().clone()) if self.compile == "reduce-overhead" else \
            (lambda t: None if t is None else t.float())
        return ClipOutputs(f(out.embeddings), f(out.bandwidths), f(out.seediness), f(out.semseg_logits))


def _providers(kind: str, device: str, cache_dir: Path) -> list:
    if kind == "onnxruntime-trt":
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The engine cache is keyed by ORT on GPU model, TensorRT version and graph, so reuse is safe.
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
               "trt_timing_cache_enable": True}
        return [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeEngine:
    """The exported graphs under ONNX Runtime; tensors cross as numpy arrays on the host."""

    def __init__(self, onnx_dir: Path, device: str = "cpu", kind: str = "onnxruntime") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineError("the onnxruntime engines need the onnxruntime package: "
                              "pip install 'stemseg-serve[export]' (or onnxruntime-gpu)") from None
        onnx_dir = Path(onnx_dir)
        paths = graph_paths(onnx_dir)
        providers = _providers(kind, device, onnx_dir / "trt-cache")
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if wanted not in ort.get_available_providers():
            available = ", ".join(ort.get_available_providers())
            raise EngineError(f"ONNX Runtime here has no {wanted} (available: {available})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._backbone = ort.InferenceSession(str(paths[0]), opts, providers=providers)
        self._heads = ort.InferenceSession(str(paths[1]), opts, providers=providers)
        meta = self._heads.get_modelmeta().custom_metadata_map
        self.cfg = ModelConfig.from_json(meta[PRESET_KEY])
        self.weights_sha256 = meta.get(WEIGHTS_KEY)
        self.device = torch.device("cpu")  # inputs are staged on the host either way
        self._head_outputs = [o.name for o in self._heads.get_outputs()]

    def frame_features(self, images: Tensor) -> list[Tensor]:
        outs = self._backbone.run(None, {IMAGES: images.detach().cpu().numpy()})
        return [torch.from_numpy(o) for o in outs]

    def clip_heads(self, feats: list[Tensor]) -> ClipOutputs:
        outs = dict(zip(self._head_outputs, self._heads.run(
            None, {n: np.ascontiguousarray(f.detach().cpu().numpy()) for n, f in zip(LEVELS, feats)})))
        return _clip_outputs({k: torch.from_numpy(v) for k, v in outs.items()})


class TensorRTEngine:
    """Native TensorRT engines (fp16 by default) built from the exported graphs and cached.

    Tensors stay on the GPU: inputs and outputs are torch CUDA tensors whose memory TensorRT
    reads and writes directly, on torch's current stream, so no copy or sync is added."""

    def __init__(self, onnx_dir: Path, device: str = "cuda", fp16: bool = True, buckets: list | None = None,
                 cache_dir: Path | None = None) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("the tensorrt engine needs the tensorrt package "
                              "(pip install 'stemseg-serve[gpu]')") from None
        from service.model.tensorrt_build import build_or_load, cached_buckets, default_buckets, gpu_identity

        onnx_dir = Path(onnx_dir)
        self.cfg = graph_config(onnx_dir)
        self.device = torch.device(device)
        self.buckets = buckets or cached_buckets(onnx_dir, gpu=gpu_identity(), trt_version=trt.__version__, fp16=fp16,
                                                 cache_dir=cache_dir) or default_buckets(self.cfg)
        paths = build_or_load(onnx_dir, self.cfg, buckets=self.buckets, fp16=fp16, cache_dir=cache_dir)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._trt = trt
        self._graphs = {}
        for graph, path in paths.items():
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            # One context per profile: switching a context's profile would re-plan on every call.
            contexts = []
            for p in range(engine.num_optimization_profiles):
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(p, torch.cuda.current_stream(self.device).cuda_stream)
                contexts.append(ctx)
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            self._graphs[graph] = (engine, contexts, outputs)

    def _profile(self, height: int, width: int) -> int:
        """The bucket nearest the padded input size (sum of height and width differences)."""
        costs = [abs(b.height - height) + abs(b.width - width) for b in self.buckets]
        return costs.index(min(costs))

    def _run(self, graph: str, inputs: dict[str, Tensor], height: int, width: int) -> dict[str, Tensor]:
        engine, contexts, outputs = self._graphs[graph]
        ctx = contexts[self._profile(height, width)]
        keep = {}
        for name, t in inputs.items():
            t = t.to(self.device, torch.float32).contiguous()
            keep[name] = t
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in outputs:
            dtype = torch.from_numpy(np.empty(0, self._trt.nptype(engine.get_tensor_dtype(name)))).dtype
            out[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device=self.device)
            ctx.set_tensor_address(name, out[name].data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            shapes = [tuple(t.shape) for t in keep.values()]
            raise EngineError(f"TensorRT failed to run the {graph} engine for inputs {shapes}")
        return out

    def frame_features(self, images: Tensor) -> list[Tensor]:
        out = self._run("backbone", {IMAGES: images}, images.shape[-2], images.shape[-1])
        return [out[n].float() for n in LEVELS]

    def clip_heads(self, feats: list[Tensor]) -> ClipOutputs:
        h, w = feats[0].shape[-2] * 4, feats[0].shape[-1] * 4
        t = self._run("heads", dict(zip(LEVELS, feats)), h, w)
        return _clip_outputs({k: v.float() for k, v in t.items()})


def _clip_outputs(t: dict[str, Tensor]) -> ClipOutputs:
    """The heads graph's outputs by name (the semantic head's only where the preset has one)."""
    embeddings, bandwidths, seediness, semseg = HEAD_OUTPUTS
    return ClipOutputs(t[embeddings], t[bandwidths], t[seediness], t.get(semseg))


def build_engine(spec: EngineSpec) -> Engine:
    """The engine `spec` describes, on its device. What cannot run here (no GPU, no graphs, weights
    that name no file, a backend not installed) is a one-line UserError naming the option as the
    spec's source spells it: an engine that silently fell back to another or to the CPU would run
    at a fraction of the expected speed with nothing to show why. With batch_max_size > 1 the
    engine is shared through a dynamic batcher (service.model.batching)."""
    from service.config import get_settings, resolve_device, resolve_weights

    say = spec.spelling
    try:
        device = resolve_device(spec.device)
    except ValueError as e:
        raise EngineError(f"{say('device')}: {e}") from None
    if spec.needs_cuda and not device.startswith("cuda"):
        raise EngineError(f"{say('kind', spec.kind)} needs a CUDA GPU, and {say('device')} resolves to {device}")
    engine: Engine
    if spec.kind == "torch":
        from service.model.checkpoint import load_model

        weights = resolve_weights(spec.weights, spec.weights_dir or get_settings().weights_dir)
        if device.startswith("cuda"):
            # Explicit both ways: PyTorch's default lets cuDNN convolutions use TF32, not fp32.
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = spec.tf32
        model = load_model(weights, spec.preset, device=device)
        if spec.min_dim is not None:
            model.cfg = model.cfg.with_min_dim(spec.min_dim)
        engine = TorchEngine(model, compile=spec.compile, autocast=spec.autocast)
    else:
        if spec.kind == "tensorrt":
            engine = TensorRTEngine(spec.onnx_dir, device, cache_dir=spec.trt_cache)
        else:
            engine = OnnxRuntimeEngine(spec.onnx_dir, device, spec.kind)
        if spec.min_dim is not None:
            engine.cfg = engine.cfg.with_min_dim(spec.min_dim)
    if spec.batch_max_size > 1:
        from service.model.batching import DynamicBatcher

        engine = DynamicBatcher(engine, max_batch=spec.batch_max_size, max_delay_s=spec.batch_max_delay_ms / 1000)
    return engine


__all__ = ["AUTOCAST", "COMPILE_MODES", "ENGINES", "Engine", "EngineError", "EngineSpec", "OnnxRuntimeEngine",
           "TensorRTEngine", "TorchEngine", "build_engine"]
