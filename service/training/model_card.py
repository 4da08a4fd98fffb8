"""The shipped model's card, written from the weights file and `stemseg eval --json` reports,
so no number in it is typed by hand:

    python -m service.training.model_card WEIGHTS TRAINING.md VAL.json POOLED.json SET.json [SET.json ...]

TRAINING.md is the story of how the weights were made (data, commands, times, and which sets
were looked at while making them), in Markdown. POOLED.json is `stemseg eval` over every fresh
held-out set at once with `--bootstrap`; each SET.json scores one of those sets alone. Every
report names the `stemseg synth` seeds it scored (its `dataset` key).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from service.model.checkpoint import load_model


def _f(x: float) -> str:
    return f"{x:.3f}"


# The issue's bar for the shipped weights, on 12 or more held-out videos.
TARGETS = {"AP": 0.6, "AP50": 0.85}


def _set_name(report: dict) -> str:
    return f"seed {report['dataset']['seed']}, {report['videos']} videos"


def _seeds(pooled: dict) -> list[int]:
    return [d["seed"] for d in pooled["dataset"]]


def _interval(pooled: dict, key: str) -> str:
    b = pooled["bootstrap"][key]
    return f"{_f(b['p2.5'])} - {_f(b['p97.5'])} (std {_f(b['std'])})"


def model_card(weights: Path, training: str, val: dict, pooled: dict, sets: list[dict]) -> str:
    """`pooled`: the report over every fresh held-out set at once, with a bootstrap; `sets`: each
    of those sets scored alone; `val`: the set checkpoints and inference settings were chosen on."""
    cfg = (m := load_model(weights)).cfg
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    params = sum(p.numel() for p in m.parameters())
    seeds = _seeds(pooled)
    videos_each = sorted({r["videos"] for r in sets})
    if sorted(r["dataset"]["seed"] for r in sets) != sorted(seeds):
        raise ValueError("give one single-set report per pooled set")
    seed_span = f"{min(seeds)}-{max(seeds)}" if seeds == list(range(min(seeds), max(seeds) + 1)) else \
        ", ".join(map(str, seeds))
    rows = [f"| {name} | {_f(pooled[k])} | {_interval(pooled, k)} |"
            for name, k in (("YouTube-VIS AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("AR1", "AR1"),
                            ("AR10", "AR10"))]
    extra = []
    if "J&F" in pooled:
        extra.append(f"| DAVIS unsupervised J&F | {_f(pooled['J&F'])} (J {_f(pooled['J-Mean'])}, "
                     f"F {_f(pooled['F-Mean'])}) | - |")
    if "HOTA" in pooled:
        extra += [f"| MOTS HOTA | {_f(pooled['HOTA'])} | - |",
                  f"| sMOTSA / MOTSA | {_f(pooled['sMOTSA'])} / {_f(pooled['MOTSA'])} | - |"]
    metrics = "\n".join(["| metric | pooled | 95% bootstrap interval over videos |", "| --- | --- | --- |",
                          *rows, *extra])
    ordered = sorted(sets, key=lambda r: r["dataset"]["seed"])
    per_set = "\n".join(["| set | AP | AP50 |", "| --- | --- | --- |",
                          *(f"| {_set_name(r)} | {_f(r['AP'])} | {_f(r['AP50'])} |" for r in ordered)])
    ap = [r["AP"] for r in sets]
    ap50 = [r["AP50"] for r in sets]
    classes = "\n".join(["| class | AP |", "| --- | --- |",
                          *(f"| {c} | {_f(v)} |" for c, v in pooled["per_class_AP"].items())])
    verdict = ", ".join(f"{k} {_f(pooled[k])} {'>=' if pooled[k] >= bar else '<'} {bar}"
                        for k, bar in TARGETS.items())
    met = all(pooled[k] >= bar for k, bar in TARGETS.items())
    gts = " ".join(f"heldout{s}" for s in seeds)
    return f"""# `lite.safetensors`: the default model

The model `stemseg segment` runs when no `--weights` are given. Same family as the
authors' networks (ResNet-style FPN backbone, 3-D squeeze-expand decoders, embedding /
seediness / semseg heads, spatio-temporal `xyff` offsets), made small, trained by us on our
procedural videos with the paper's losses. It knows six synthetic shapes, nothing else: for
real videos use an official checkpoint (`stemseg weights fetch youtube_vis`, then
`--weights youtube_vis`).

| | |
| --- | --- |
| file | `weights/lite.safetensors` (in the wheel: `service/model/shipped/`), {weights.stat().st_size / 2**20:.1f} MiB, {params:,} parameters |
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

On {len(seeds)} fresh synthetic sets, seeds {seed_span} ({pooled['videos']} videos, {"/".join(map(str, videos_each))} per set,
24 frames of 128x160), made after these weights were fixed and never used to train or choose
anything: `stemseg synth --out heldoutS --videos {videos_each[0]} --seed S` for each seed S, then

```bash
stemseg eval --gt {gts} --bootstrap 1000 --json pooled.json
```

which pools the sets into one ({pooled['videos']} videos) and resamples its videos {pooled['bootstrap']['replicates']} times
for the interval (2.5th to 97.5th percentile of the replicates).

{metrics}

Each set alone (`stemseg eval --gt heldoutS --metric ytvis`): AP {_f(min(ap))} to {_f(max(ap))}, AP50 {_f(min(ap50))} to {_f(max(ap50))}
on {videos_each[0]} videos; single small sets scatter widely, so quote the pooled number.

{per_set}

Per-class AP, pooled:

{classes}

Against the earlier issue's targets (AP >= {TARGETS["AP"]}, AP50 >= {TARGETS["AP50"]}): {verdict}: {"**met**" if met else "not met"}.

The validation set ({_set_name(val)}) chose between checkpoints and inference settings; this
model scores AP {_f(val["AP"])}, AP50 {_f(val["AP50"])} there.

sMOTSA and MOTSA are low because MOTS counts every output track, and the YouTube-VIS output
rules keep up to `max_tracks` tracks per video, low-scored fragments included; AP ranks those
last and is barely hurt by them.
"""  # noqa: E501 - a Markdown table row or paragraph line cannot be broken


if __name__ == "__main__":
    weights, training, val, pooled, *sets = (Path(a) for a in sys.argv[1:])
    card = model_card(weights, training.read_text().strip(), json.loads(val.read_text()),
                      json.loads(pooled.read_text()), [json.loads(p.read_text()) for p in sets])
    (weights.parent / "MODEL_CARD.md").write_text(card)
