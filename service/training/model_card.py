"""The shipped model's card, written from the weights file and `stemseg eval --json` reports,
so no number in it is typed by hand:

    python -m service.training.model_card WEIGHTS HELDOUT.json TRAINING.md [VAL.json]

TRAINING.md is the story of how the weights were made (data, commands, times), in Markdown.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from service.model.checkpoint import load_model


def _f(x: float) -> str:
    return f"{x:.3f}"


def model_card(weights: Path, report: dict, training: str, val: dict | None = None) -> str:
    cfg = (m := load_model(weights)).cfg
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    params = sum(p.numel() for p in m.parameters())
    rows = "\n".join(f"| {k} | {_f(v)} |" for k, v in report["per_class_AP"].items())
    card = f"""# `lite.safetensors`: the default model

The model `stemseg segment` runs when no `--weights` are given. Same family as the
authors' networks (ResNet-style FPN backbone, 3-D squeeze-expand decoders, embedding /
seediness / semseg heads, spatio-temporal `xyff` offsets), made small, trained by us on our
procedural videos with the paper's losses. It knows six synthetic shapes, nothing else: for
real videos use an official checkpoint (`--weights youtube_vis.pth`).

| | |
| --- | --- |
| file | `weights/lite.safetensors`, {weights.stat().st_size / 2**20:.1f} MiB, {params:,} parameters |
| sha256 | `{sha}` |
| preset | `{cfg.name}`: blocks {list(cfg.blocks)}, width {cfg.width}, FPN {cfg.fpn_channels} channels, clip {cfg.clip_len} frames / overlap {cfg.overlap}, min/max dim {cfg.min_dim}/{cfg.max_dim}, clustering at stride {cfg.cluster_stride}, min seediness {cfg.min_seediness}, mask outlines `{cfg.mask_upsampling}`, at most {cfg.max_tracks} tracks |
| classes | {", ".join(f"{k} {v}" for k, v in cfg.classes.items())} |

## Training

{training}

Losses (`service/training/losses.py`): Lovász hinge on each instance's probability map
from embedding distances and bandwidths, seediness regression, bandwidth smoothness, semseg
cross-entropy, foreground BCE. AdamW with warm-up and cosine decay, batch 6 clips of 8
frames, random flips and time reversal; batch norms trained, then folded into the frozen
(epsilon 0) form of the inference network.

## Evaluation

Held-out videos from a seed never used for training or tuning:
`stemseg synth --out heldout --videos 16 --seed 2` then `stemseg eval --gt heldout --json eval.json`
({report["videos"]} videos, 24 frames each):

| metric | value |
| --- | --- |
| YouTube-VIS AP | {_f(report["AP"])} |
| AP50 | {_f(report["AP50"])} |
| AP75 | {_f(report["AP75"])} |
| AR1 | {_f(report["AR1"])} |
| AR10 | {_f(report["AR10"])} |
| DAVIS unsupervised J&F | {_f(report["J&F"])} (J {_f(report["J-Mean"])}, F {_f(report["F-Mean"])}) |
| MOTS HOTA | {_f(report["HOTA"])} |
| sMOTSA / MOTSA | {_f(report["sMOTSA"])} / {_f(report["MOTSA"])} |

Per-class AP:

| class | AP |
| --- | --- |
{rows}
"""
    if val:
        card += f"""
A separate validation set (`stemseg synth --out val --videos 12 --seed 3`) was used to choose
between checkpoints and inference settings; this model scores AP {_f(val["AP"])}, AP50
{_f(val["AP50"])} there.
"""
    card += """
sMOTSA and MOTSA are low because MOTS counts every output track, and the YouTube-VIS output
rules keep up to `max_tracks` tracks per video, low-scored fragments included; AP ranks those
last and is barely hurt by them.

The issue's targets were AP >= 0.6 and AP50 >= 0.85 on held-out videos; see the numbers
above for where this model stands.
"""
    return card


if __name__ == "__main__":
    args = sys.argv[1:]
    weights = Path(args[0])
    card = model_card(weights, json.loads(Path(args[1]).read_text()), Path(args[2]).read_text().strip(),
                      json.loads(Path(args[3]).read_text()) if len(args) > 3 else None)
    (weights.parent / "MODEL_CARD.md").write_text(card)
