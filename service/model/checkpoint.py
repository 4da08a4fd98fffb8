"""Loading the authors' checkpoints unchanged, and our own self-describing weights files.

Official files are `torch.save({"model": state_dict})` pickles; they are opened with
`weights_only=True` so a file that needs code to unpickle is refused rather than run. Our
own format is safetensors: no pickle at all, memory-mappable, and its string metadata
carries the preset (architecture, clip plan, classes) and a content hash, so a file alone
says what it is.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from service.errors import UserError
from service.model.presets import PRESETS, ModelConfig, get_preset
from service.model.stemseg import STEmSeg

FORMAT = "stemseg-serve/1"
# Present in the official checkpoints but only used by the training loss.
_TRAINING_ONLY_PREFIXES = ("embedding_loss_criterion.",)


class CheckpointError(UserError, ValueError):
    """A weights file that cannot be used, with a message meant for the user."""


def _read_state_dict(path: Path) -> tuple[dict[str, Tensor], ModelConfig | None]:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path} is not a checkpoint (file is {path.stat().st_size} bytes)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{path} holds Python objects that need code to load ({found.group(1)}); refusing it: "
                "only tensors are accepted"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - a malformed pickle can fail with almost any error type
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a STEm-Seg checkpoint: expected {{'model': state_dict}} of tensors")
    return dict(obj), None


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], ModelConfig | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e})") from None
    cfg = ModelConfig.from_json(meta["preset"]) if "preset" in meta else None
    if "sha256" in meta and meta["sha256"] != state_dict_hash(sd):
        raise CheckpointError(f"{path} is corrupt: its content hash does not match its metadata")
    return sd, cfg


def state_dict_hash(sd: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, independent of file layout."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _mismatches(model_sd: Mapping[str, Tensor], sd: Mapping[str, Tensor]) -> list[str]:
    problems = []
    for k, v in model_sd.items():
        if k not in sd:
            problems.append(f"missing key {k} {tuple(v.shape)}")
        elif tuple(sd[k].shape) != tuple(v.shape):
            problems.append(f"wrong shape for {k}: file {tuple(sd[k].shape)}, model {tuple(v.shape)}")
    problems += [
        f"unexpected key {k}"
        for k in sd
        if k not in model_sd and not k.startswith(_TRAINING_ONLY_PREFIXES)
    ]
    return problems


def _expected(cfg: ModelConfig) -> dict[str, Tensor]:
    with torch.device("meta"):
        return STEmSeg(cfg).state_dict()


def infer_preset(sd: Mapping[str, Tensor]) -> ModelConfig:
    """The preset (and ResNet depth) whose layout the state dict has exactly."""
    for cfg in PRESETS.values():
        for depth in (cfg.depth, 50 if cfg.depth == 101 else 101):
            candidate = replace(cfg, depth=depth)
            if not _mismatches(_expected(candidate), sd):
                return candidate
    raise CheckpointError(
        "the weights match none of the presets " + ", ".join(PRESETS) + "; pass --preset to see the mismatches"
    )


def load_model(
    path: str | Path, preset: str | ModelConfig | None = None, device: str | torch.device = "cpu"
) -> STEmSeg:
    """Build the network for a weights file, official `.pth` or our `.safetensors`, in eval mode.

    The preset is taken from (in order) the argument, the file's own metadata, or the layout
    of its tensors. Every key and shape is checked and all problems are reported at once.
    """
    path = Path(path)
    sd, file_cfg = _read_state_dict(path)
    if isinstance(preset, str):
        cfg = get_preset(preset)
    else:
        cfg = preset or file_cfg or infer_preset(sd)
    model_sd = _expected(cfg)
    problems = _mismatches(model_sd, sd)
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise CheckpointError(
            f"{path} does not fit preset {cfg.name!r} ({len(problems)} problems):\n  {shown}"
        )
    model = STEmSeg(cfg)
    model.load_state_dict({k: sd[k].to(torch.float32) for k in model_sd}, strict=True)
    return model.eval().to(device)


def save_weights(model: STEmSeg, path: str | Path) -> str:
    """Write our format; returns the content hash stored in it."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = state_dict_hash(sd)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": FORMAT, "preset": model.cfg.to_json(), "sha256": digest})
    tmp.replace(path)
    return digest
