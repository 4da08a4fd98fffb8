"""Inference engines: the two halves of the network (frame backbone, clip heads) behind one face.

The pipeline and the workers only call `frame_features` and `clip_heads`, so the network can
run as eager PyTorch, as the exported ONNX graphs under ONNX Runtime (CPU, CUDA or its
TensorRT execution provider), or as native TensorRT engines built from those graphs. A
backend that is not installed is reported, not crashed on.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from service.config import ENGINES, Settings
from service.model.presets import ModelConfig
from service.model.stemseg import ClipOutputs, STEmSeg


class EngineError(RuntimeError):
    """An engine that cannot run here, with a message meant for the user."""


class Engine(Protocol):
    cfg: ModelConfig
    device: torch.device

    def frame_features(self, images: Tensor) -> list[Tensor]: ...

    def clip_heads(self, feats: list[Tensor]) -> ClipOutputs: ...


AUTOCAST = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


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
        if mode not in COMPILE_MODES:
            raise EngineError(f"unknown torch.compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        autocast = autocast or "off"
        if autocast not in AUTOCAST:
            raise EngineError(f"unknown autocast dtype {autocast!r}; choose one of {', '.join(AUTOCAST)}")
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


def _graph_paths(onnx_dir: Path) -> list[Path]:
    """backbone.onnx and heads.onnx of an export directory, or a clear error."""
    paths = [onnx_dir / "backbone.onnx", onnx_dir / "heads.onnx"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EngineError(f"no exported graphs at {', '.join(missing)}: run `stemseg export onnx --out {onnx_dir}`")
    return paths


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
            raise EngineError("--engine onnxruntime needs the onnxruntime package: "
                              "pip install 'stemseg-serve[export]' (or onnxruntime-gpu)") from None
        onnx_dir = Path(onnx_dir)
        paths = _graph_paths(onnx_dir)
        providers = _providers(kind, device, onnx_dir / "trt-cache")
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if wanted not in ort.get_available_providers():
            raise EngineError(f"ONNX Runtime here has no {wanted} (available: {', '.join(ort.get_available_providers())})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._backbone = ort.InferenceSession(str(paths[0]), opts, providers=providers)
        self._heads = ort.InferenceSession(str(paths[1]), opts, providers=providers)
        meta = self._heads.get_modelmeta().custom_metadata_map
        self.cfg = ModelConfig.from_json(meta["stemseg.preset"])
        self.weights_sha256 = meta.get("stemseg.weights_sha256")
        self.device = torch.device("cpu")  # inputs are staged on the host either way
        self._head_outputs = [o.name for o in self._heads.get_outputs()]

    def frame_features(self, images: Tensor) -> list[Tensor]:
        outs = self._backbone.run(None, {"images": images.detach().cpu().numpy()})
        return [torch.from_numpy(o) for o in outs]

    def clip_heads(self, feats: list[Tensor]) -> ClipOutputs:
        names = ("p4", "p8", "p16", "p32")
        outs = dict(zip(self._head_outputs, self._heads.run(
            None, {n: np.ascontiguousarray(f.detach().cpu().numpy()) for n, f in zip(names, feats)})))
        t = {k: torch.from_numpy(v) for k, v in outs.items()}
        return ClipOutputs(t["embeddings"], t["bandwidths"], t["seediness"], t.get("semseg_logits"))


class TensorRTEngine:
    """Native TensorRT engines (fp16 by default) built from the exported graphs and cached.

    Tensors stay on the GPU: inputs and outputs are torch CUDA tensors whose memory TensorRT
    reads and writes directly, on torch's current stream, so no copy or sync is added."""

    def __init__(self, onnx_dir: Path, device: str = "cuda", fp16: bool = True, buckets: list | None = None,
                 cache_dir: Path | None = None) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("--engine tensorrt needs the tensorrt package (pip install 'stemseg-serve[gpu]')") from None
        from model_export.tensorrt_build import build_or_load, cached_buckets, default_buckets, gpu_identity

        onnx_dir = Path(onnx_dir)
        _graph_paths(onnx_dir)
        self.cfg = ModelConfig.from_json(graph_metadata(onnx_dir)["stemseg.preset"])
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
            raise EngineError(f"TensorRT failed to run the {graph} engine for inputs {[tuple(t.shape) for t in keep.values()]}")
        return out

    def frame_features(self, images: Tensor) -> list[Tensor]:
        out = self._run("backbone", {"images": images}, images.shape[-2], images.shape[-1])
        return [out[n].float() for n in ("p4", "p8", "p16", "p32")]

    def clip_heads(self, feats: list[Tensor]) -> ClipOutputs:
        h, w = feats[0].shape[-2] * 4, feats[0].shape[-1] * 4
        t = self._run("heads", dict(zip(("p4", "p8", "p16", "p32"), feats)), h, w)
        t = {k: v.float() for k, v in t.items()}
        return ClipOutputs(t["embeddings"], t["bandwidths"], t["seediness"], t.get("semseg_logits"))


def graph_metadata(onnx_dir: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(Path(onnx_dir) / "heads.onnx"), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def load_engine(kind: str, *, model: STEmSeg | None = None, onnx_dir: Path | None = None,
                device: str = "cpu", compile: bool | str = False, autocast: str | None = None,
                trt_cache: Path | None = None) -> Engine:
    if kind == "torch":
        if model is None:
            raise EngineError("--engine torch needs weights")
        return TorchEngine(model, compile=compile, autocast=autocast)
    if kind in ("onnxruntime", "onnxruntime-trt", "tensorrt"):
        if onnx_dir is None:
            raise EngineError(f"--engine {kind} needs --onnx DIR (make one with `stemseg export onnx --out DIR`)")
        if kind != "onnxruntime" and not device.startswith("cuda"):
            raise EngineError(f"--engine {kind} needs a CUDA GPU; none is in use here")
        if kind == "tensorrt":
            return TensorRTEngine(onnx_dir, device, cache_dir=trt_cache)
        return OnnxRuntimeEngine(onnx_dir, device, kind)
    raise EngineError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}")


def engine_from_settings(settings: Settings) -> Engine:
    """The engine a service worker runs, exactly as configured: STEMSEG_ENGINE with its graphs
    (STEMSEG_ONNX_DIR) and TensorRT cache (STEMSEG_TRT_CACHE) on STEMSEG_DEVICE. Anything that
    cannot run here (no GPU, no graphs, a backend not installed) is an EngineError naming the
    setting: a worker that silently fell back to another engine or the CPU would serve at a
    fraction of the expected speed with nothing to show why. With STEMSEG_BATCH_MAX_SIZE > 1 the
    engine is shared through a dynamic batcher (service.model.batching)."""
    from service.config import resolve_device
    from service.model.checkpoint import load_model

    kind = settings.engine
    if kind not in ENGINES:
        raise EngineError(f"STEMSEG_ENGINE={kind!r} is not an engine; choose one of {', '.join(ENGINES)}")
    if settings.batch_max_size > 1 and kind == "torch" and settings.torch_compile != "off":
        # Every merged batch size is a new shape: torch.compile (dynamic=False) would recompile per
        # size until its limit, then silently run eager (and capture a CUDA graph per size).
        raise EngineError("STEMSEG_BATCH_MAX_SIZE > 1 and STEMSEG_TORCH_COMPILE together would recompile per "
                          "batch size; choose one")
    try:
        device = resolve_device(settings.device)
    except ValueError as e:
        raise EngineError(f"STEMSEG_DEVICE: {e}") from None
    if kind == "torch":
        weights = settings.weights_path  # WeightsNotFound (one line) when the setting names no file
        if device.startswith("cuda"):
            # Explicit both ways: PyTorch's default lets cuDNN convolutions use TF32, not fp32.
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = settings.tf32
        engine = load_engine("torch", model=load_model(weights, settings.preset, device=device),
                             compile=settings.torch_compile, autocast=settings.autocast)
    else:
        if settings.onnx_dir is None:
            raise EngineError(f"STEMSEG_ENGINE={kind} needs STEMSEG_ONNX_DIR (graphs of `stemseg export onnx`)")
        if kind != "onnxruntime" and not device.startswith("cuda"):
            raise EngineError(f"STEMSEG_ENGINE={kind} needs a CUDA GPU, and STEMSEG_DEVICE resolves to {device}")
        engine = load_engine(kind, onnx_dir=settings.onnx_dir, device=device, trt_cache=settings.trt_cache)
    if settings.batch_max_size > 1:
        from service.model.batching import DynamicBatcher

        engine = DynamicBatcher(engine, max_batch=settings.batch_max_size,
                                max_delay_s=settings.batch_max_delay_ms / 1000)
    return engine


__all__ = ["AUTOCAST", "COMPILE_MODES", "ENGINES", "Engine", "EngineError", "OnnxRuntimeEngine", "TensorRTEngine",
           "TorchEngine", "engine_from_settings", "graph_metadata", "load_engine"]
