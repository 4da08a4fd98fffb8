"""Parity with the authors' code: one test per vector file in $STEMSEG_REFERENCE_DIR.

Model vectors: synthetic weights from the manifest by the recipe, saved as an official
`.pth`, loaded through the official loader, one clip through the network. Chain vectors:
clustering and chaining in reference mode. Nothing here depends on the particular seeds or
sizes of the shipped files.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_checks import assert_same_up_to_renaming, run_chain_vector, track_stats

from service.model.checkpoint import load_model
from service.model.stemseg import stack_clip
from service.model.synthetic import save_official_checkpoint, synthetic_state_dict

REFERENCE_DIR = Path(os.environ.get("STEMSEG_REFERENCE_DIR", Path(__file__).parent / "fixtures" / "reference"))
# Files that are inputs to the vectors rather than vectors themselves.
SUPPORT = ("README.md", "classes.json")
HEAD_ATOL, FPN_ATOL, RTOL = 1e-4, 1e-2, 1e-4


def _files() -> list[Path]:
    return sorted(p for p in REFERENCE_DIR.iterdir() if p.is_file()) if REFERENCE_DIR.is_dir() else []


def _is_support(p: Path) -> bool:
    return p.name in SUPPORT or (p.name.startswith("manifest_") and p.suffix == ".json")


VECTORS = [p for p in _files() if not _is_support(p)]


def test_reference_dir_has_vectors() -> None:
    assert any(p.name.startswith("model_") for p in VECTORS), f"no model vectors in {REFERENCE_DIR}"
    assert any(p.name.startswith("chain_") for p in VECTORS), f"no chain vectors in {REFERENCE_DIR}"


def _meta(z: np.lib.npyio.NpzFile) -> dict:
    return json.loads(z["meta_json"].item())


def _check(name: str, ours: np.ndarray, ref: np.ndarray, atol: float, record) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    err = np.abs(ours.astype(np.float64) - ref)
    record(f"max_abs_err_{name}", float(err.max()))
    bad = err > atol + RTOL * np.abs(ref)
    assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} values out of tolerance, max error {err.max():.3e}"


def _model_vector(path: Path, tmp_path: Path, record) -> None:
    z = np.load(path)
    meta = _meta(z)
    manifest = json.loads((REFERENCE_DIR / f"manifest_{meta['config']}.json").read_text())
    weights = tmp_path / "official.pth"
    save_official_checkpoint(synthetic_state_dict((k, s) for k, s, _ in manifest), str(weights))
    model = load_model(weights)  # preset inferred from the file, as for a user's checkpoint
    cfg = model.cfg
    assert cfg.embedding_mode == meta["embedding_dim_mode"] and cfg.embedding_dim == meta["embedding_size"]
    assert cfg.num_classes == meta["num_classes"] and list(cfg.free_dim_stds) == meta["free_dim_stds"]
    assert (cfg.seediness_inter is not None) == meta["use_seediness_head"]
    assert (cfg.semseg_inter is not None) == meta["use_semseg_head"]
    if cfg.clip_len != meta["num_frames"]:
        model = load_model(weights, replace(cfg, clip_len=meta["num_frames"]))

    with torch.inference_mode():
        feats = model.frame_features(torch.from_numpy(z["input_images"]))
        out = model.clip_heads([stack_clip(f) for f in feats])
    for fmap, stride in zip(feats, (4, 8, 16, 32)):
        if f"fpn_{stride}x" in z:
            _check(f"fpn_{stride}x", fmap.permute(1, 0, 2, 3).numpy(), z[f"fpn_{stride}x"], FPN_ATOL, record)
    _check("embeddings", out.embeddings[0].numpy(), z["embeddings"], HEAD_ATOL, record)
    _check("bandwidths", out.bandwidths[0].numpy(), z["bandwidths"], HEAD_ATOL, record)
    _check("seediness", out.seediness[0].numpy(), z["seediness"], HEAD_ATOL, record)
    for name in ("semseg_logits", "fg_probs"):
        assert (name in z) == (out.semseg_logits is not None), f"{name}: head presence differs from the reference"
    if out.semseg_logits is not None:
        _check("semseg_logits", out.semseg_logits[0].numpy(), z["semseg_logits"], HEAD_ATOL, record)
        _check("fg_probs", torch.sigmoid(out.semseg_logits[0, -1]).numpy(), z["fg_probs"], HEAD_ATOL, record)


def _chain_vector(path: Path) -> None:
    ours, ref = run_chain_vector(path)
    assert_same_up_to_renaming(ours, ref)
    meta = _meta(np.load(path))
    counts, lifetimes = track_stats(ours)
    ref_counts = {int(k): v for k, v in meta["track_point_counts"].items()}
    ref_lifetimes = {int(k): v for k, v in meta["track_lifetimes"].items()}
    # Ids may be renamed, so compare the multisets of per-track statistics (and -1 exactly).
    assert counts.get(-1) == ref_counts.get(-1) and lifetimes.get(-1) == ref_lifetimes.get(-1)
    assert sorted((counts[k], lifetimes[k]) for k in counts) == sorted(
        (ref_counts[k], ref_lifetimes[k]) for k in ref_counts
    )


@pytest.mark.parametrize("path", VECTORS, ids=[p.name for p in VECTORS])
def test_reference(path: Path, tmp_path: Path, record_property) -> None:
    if path.name.startswith("model_") and path.suffix == ".npz":
        _model_vector(path, tmp_path, record_property)
    elif path.name.startswith("chain_") and path.suffix == ".npz":
        _chain_vector(path)
    else:
        pytest.fail(f"unrecognised file in the reference directory: {path.name}")
