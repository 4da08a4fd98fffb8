"""Export the network as two ONNX graphs: the frame backbone and the clip heads.

Two graphs because frame features are shared by overlapping clips: the backbone runs once per
frame (dynamic batch, height, width), the heads once per clip (the preset's clip length,
dynamic height and width). The TorchScript-based exporter is used: it records the sizes of the
upsampling targets as shape ops, so one graph serves every resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from service.model.checkpoint import state_dict_hash
from service.model.graph import (
    CLASSES_KEY,
    GRAPH_KEY,
    HEAD_OUTPUTS,
    IMAGES,
    INPUT_SPEC_KEY,
    LEVELS,
    PRESET_KEY,
    STRIDES,
    WEIGHTS_KEY,
    graph_path,
)
from service.model.stemseg import STEmSeg


class _Backbone(nn.Module):
    def __init__(self, model: STEmSeg) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model.frame_features(images))


class _Heads(nn.Module):
    def __init__(self, model: STEmSeg) -> None:
        super().__init__()
        self.model = model

    def forward(self, p4: Tensor, p8: Tensor, p16: Tensor, p32: Tensor) -> tuple[Tensor, ...]:
        out = self.model.clip_heads([p4, p8, p16, p32])
        return tuple(t for t in (out.embeddings, out.bandwidths, out.seediness, out.semseg_logits) if t is not None)


@dataclass(frozen=True)
class ExportedGraphs:
    backbone: Path
    heads: Path


def _metadata(model: STEmSeg, graph: str) -> dict[str, str]:
    cfg = model.cfg
    spec = {
        "backbone": {IMAGES: "[B, 3, H, W] float32, BGR minus mean, H and W multiples of 32"},
        "heads": {name: f"[N, 256, {cfg.clip_len}, H/{s}, W/{s}]" for name, s in zip(LEVELS, STRIDES)},
    }[graph]
    return {
        GRAPH_KEY: graph,
        PRESET_KEY: cfg.to_json(),
        CLASSES_KEY: json.dumps({str(k): v for k, v in cfg.classes.items()}),
        INPUT_SPEC_KEY: json.dumps(spec),
        WEIGHTS_KEY: state_dict_hash(model.state_dict()),
    }


def _finish(path: Path, meta: dict[str, str], fp16: bool) -> None:
    graph = onnx.load(str(path))
    if fp16:
        from onnxconverter_common import float16

        graph = float16.convert_float_to_float16(graph, keep_io_types=True)
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))


def export_onnx(model: STEmSeg, out_dir: Path, opset: int = 17, fp16: bool = False,
                sample_hw: tuple[int, int] = (128, 192)) -> ExportedGraphs:
    """Write `backbone.onnx` and `heads.onnx` into out_dir and return their paths."""
    model = model.eval().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = sample_hw
    images = torch.zeros(2, 3, h, w)
    with torch.inference_mode():
        feats = [f.permute(1, 0, 2, 3).unsqueeze(0).repeat(1, 1, model.cfg.clip_len // 2, 1, 1)
                 for f in model.frame_features(images)]
    backbone, heads = graph_path(out_dir, "backbone"), graph_path(out_dir, "heads")
    outputs = [n for n in HEAD_OUTPUTS if n != "semseg_logits" or model.semseg_head is not None]
    with torch.no_grad():
        torch.onnx.export(
            _Backbone(model), (images,), str(backbone), dynamo=False, opset_version=opset,
            input_names=[IMAGES], output_names=list(LEVELS),
            dynamic_axes={IMAGES: {0: "B", 2: "H", 3: "W"},
                          **{n: {0: "B", 2: f"H{n[1:]}", 3: f"W{n[1:]}"} for n in LEVELS}},
        )
        torch.onnx.export(
            _Heads(model), tuple(feats), str(heads), dynamo=False, opset_version=opset,
            input_names=list(LEVELS), output_names=outputs,
            dynamic_axes={**{n: {0: "N", 3: f"h{n[1:]}", 4: f"w{n[1:]}"} for n in LEVELS},
                          **{n: {0: "N", 3: "h4", 4: "w4"} for n in outputs}},
        )
    _finish(backbone, _metadata(model, "backbone"), fp16)
    _finish(heads, _metadata(model, "heads"), fp16)
    return ExportedGraphs(backbone, heads)
