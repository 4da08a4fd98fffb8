"""The served model's preset, found without importing torch (the API process plans clips
with it and never runs the network).

Order as the workers' `load_model`: `STEMSEG_PRESET`, else the weights file's own metadata
(our safetensors: its JSON header, read directly), else, for an official `.pth`, the layout of
its tensors, which only torch can read: that one check runs in a short-lived child process.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from service.errors import UserError
from service.model.presets import ModelConfig, get_preset

_CHILD = """
import sys
from service.model.checkpoint import load_model
print(load_model(sys.argv[1]).cfg.to_json())
"""


class ModelInfoError(UserError):
    """The API cannot tell which model the workers serve (one line naming the setting)."""


def _safetensors_preset(path: Path) -> ModelConfig | None:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 1024**2:
            return None
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return None
    meta = header.get("__metadata__") or {}
    return ModelConfig.from_json(meta["preset"]) if "preset" in meta else None


def served_model(weights: Path | None, preset: str | None) -> ModelConfig:
    if preset:
        return get_preset(preset)
    if weights is None:
        raise ModelInfoError("set STEMSEG_WEIGHTS or STEMSEG_PRESET: the API needs the model's preset to plan clips")
    weights = Path(weights)
    if not weights.is_file():
        raise ModelInfoError(f"STEMSEG_WEIGHTS={weights}: no such file")
    if weights.suffix == ".safetensors":
        cfg = _safetensors_preset(weights)
        if cfg is not None:
            return cfg
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(weights)], capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ModelInfoError(f"cannot read the preset of {weights}: {last}")
    return ModelConfig.from_json(proc.stdout.strip().splitlines()[-1])
