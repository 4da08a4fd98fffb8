"""Deterministic synthetic weights by the reference vectors' recipe.

They stand in for the official checkpoints (which users bring themselves) in tests and
benchmarks: same layout, same file format, values any implementation can regenerate.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from service.model.presets import ModelConfig
from service.model.stemseg import STEmSeg


def recipe_tensor(key: str, shape: Sequence[int]) -> torch.Tensor:
    rs = np.random.RandomState(zlib.crc32(key.encode()) & 0xFFFFFFFF)
    n = rs.standard_normal(tuple(shape))
    if len(shape) == 0:
        value = np.array(1.0)
    elif key.endswith("running_var"):
        value = 1 + 0.1 * np.abs(n)
    elif key.endswith(("running_mean", "bias")):
        value = 0.1 * n
    elif len(shape) == 1:
        value = 1 + 0.1 * n
    else:
        value = n / np.sqrt(np.prod(shape[1:]))
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


def synthetic_state_dict(layout: Iterable[tuple[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    return {key: recipe_tensor(key, shape) for key, shape in layout}


def official_layout(cfg: ModelConfig) -> list[tuple[str, list[int]]]:
    """Keys and shapes of an official checkpoint for this preset (training-only buffers included)."""
    with torch.device("meta"):
        layout = [(k, list(v.shape)) for k, v in STEmSeg(cfg).state_dict().items()]
    if cfg.num_free_dims:
        layout.append(("embedding_loss_criterion.free_dim_bandwidths", [1, cfg.num_free_dims]))
    return layout


def save_official_checkpoint(state_dict: dict[str, torch.Tensor], path: str) -> None:
    """The authors' file format: a pickled {"model": state_dict}."""
    torch.save({"model": state_dict}, path)
