"""The exported graphs' contract: file names, tensor names and metadata keys.

`model_export.onnx_export` writes two graphs by these names and the engines
(`service.model.engines`, `service.model.tensorrt_build`) read them by the same: the frame
backbone (`images` in, one feature map per FPN level out) and the clip heads (the levels in,
`HEAD_OUTPUTS` out, the last only when the preset has a semantic head). The heads' metadata
carries the preset, so an export directory alone says which model it is. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

from service.model.engine_spec import EngineError
from service.model.presets import ModelConfig

GRAPHS = ("backbone", "heads")
IMAGES = "images"  # the backbone's input: [B, 3, H, W] float32, BGR minus mean, H and W multiples of 32
LEVELS = ("p4", "p8", "p16", "p32")  # FPN levels: backbone outputs and heads inputs
STRIDES = (4, 8, 16, 32)  # of LEVELS, in input pixels
HEAD_OUTPUTS = ("embeddings", "bandwidths", "seediness", "semseg_logits")

# Metadata keys of both graphs.
GRAPH_KEY = "stemseg.graph"
PRESET_KEY = "stemseg.preset"  # ModelConfig.to_json()
CLASSES_KEY = "stemseg.classes"
INPUT_SPEC_KEY = "stemseg.input_spec"
WEIGHTS_KEY = "stemseg.weights_sha256"


def graph_path(onnx_dir: Path, graph: str) -> Path:
    return Path(onnx_dir) / f"{graph}.onnx"


def graph_paths(onnx_dir: Path) -> list[Path]:
    """Both graphs of an export directory, backbone first, or an EngineError naming what is missing."""
    paths = [graph_path(onnx_dir, g) for g in GRAPHS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EngineError(f"no exported graphs at {', '.join(missing)}: make them with "
                          f"`stemseg export onnx --out {onnx_dir}`")
    return paths


def graph_metadata(onnx_dir: Path) -> dict[str, str]:
    """The heads graph's metadata (without loading its weights)."""
    import onnx

    model = onnx.load(str(graph_path(onnx_dir, "heads")), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def graph_config(onnx_dir: Path) -> ModelConfig:
    """The preset the graphs were exported from."""
    graph_paths(onnx_dir)
    return ModelConfig.from_json(graph_metadata(onnx_dir)[PRESET_KEY])


__all__ = ["CLASSES_KEY", "GRAPHS", "GRAPH_KEY", "HEAD_OUTPUTS", "IMAGES", "INPUT_SPEC_KEY", "LEVELS", "PRESET_KEY",
           "STRIDES", "WEIGHTS_KEY", "graph_config", "graph_metadata", "graph_path", "graph_paths"]
