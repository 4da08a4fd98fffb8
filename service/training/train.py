"""`stemseg train`: train a preset (normally `lite`) on a `stemseg synth` dataset.

Frozen batch norms are trained as ordinary batch norms and folded back into the frozen form
when weights are saved, so the trained file has exactly the inference architecture. Fixed
seeds, a JSON-lines loss log, and a resumable checkpoint (model, optimiser, step, RNG).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn

from service.model.backbone import FrozenBatchNorm2d
from service.model.checkpoint import save_weights
from service.model.presets import ModelConfig
from service.model.stemseg import STEmSeg
from service.pipeline.preprocess import IMAGE_MEAN_BGR
from service.training.losses import clip_losses
from service.training.synth import render_video


class Dataset:
    """Frames and per-frame instance/class maps of every video, held in memory (small videos)."""

    def __init__(self, roots: Path | Sequence[Path]) -> None:
        # Label maps as uint8 (a video has far fewer than 256 objects and classes): a thousand
        # videos then fit in a few GB, and more videos is what closes the gap to held-out data.
        self.videos: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for root in [roots] if isinstance(roots, Path) else roots:
            self._load(root)

    def _load(self, root: Path) -> None:
        doc = json.loads((root / "annotations.json").read_text())
        info = doc.get("info", {})
        by_video: dict[int, list[dict]] = {}
        for a in doc["annotations"]:
            by_video.setdefault(a["video_id"], []).append(a)
        for i, v in enumerate(doc["videos"]):
            frames = self._frames(root / v["file_name"], info, i, v)
            objects = by_video.get(v["id"], [])
            if len(objects) > 255:
                raise ValueError(f"{root}: video {v['id']} has {len(objects)} objects; at most 255 fit")
            inst = np.zeros((v["length"], v["height"], v["width"]), np.uint8)
            cls = np.zeros_like(inst)
            for k, a in enumerate(objects, start=1):
                for t, rle in enumerate(a["segmentations"]):
                    if rle is not None:
                        m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
                        inst[t][m], cls[t][m] = k, a["category_id"]
            self.videos.append((frames, inst, cls))

    @staticmethod
    def _frames(path: Path, info: dict, i: int, v: dict) -> np.ndarray:
        try:
            from service.video import iter_frames
        except ImportError:  # a machine without PyAV: the generator gives the same pictures, unencoded
            return render_video(info["seed"] * 100003 + i, v["length"], (v["height"], v["width"]))[0]
        return np.stack([f.image for f in iter_frames(path)])

    def sample(self, rng: random.Random, clip_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frames, inst, cls = self.videos[rng.randrange(len(self.videos))]
        t0 = rng.randrange(0, len(frames) - clip_len + 1)
        sl = slice(t0, t0 + clip_len)
        f, i, c = frames[sl], inst[sl], cls[sl]
        if rng.random() < 0.5:
            f, i, c = f[:, :, ::-1], i[:, :, ::-1], c[:, :, ::-1]
        if rng.random() < 0.3:
            f, i, c = f[::-1], i[::-1], c[::-1]
        return np.ascontiguousarray(f), np.ascontiguousarray(i), np.ascontiguousarray(c)


def _swap_norms(model: nn.Module, make: Callable[[FrozenBatchNorm2d], nn.Module]) -> None:
    for name, child in model.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            setattr(model, name, make(child))
        else:
            _swap_norms(child, make)


def trainable(cfg: ModelConfig) -> STEmSeg:
    model = STEmSeg(cfg)
    _swap_norms(model, lambda fb: nn.BatchNorm2d(fb.weight.numel()))
    return model


def unfrozen_copy(model: STEmSeg) -> STEmSeg:
    """The trainable form of inference weights (the inverse of `frozen_copy`), to fine-tune them."""
    out = trainable(model.cfg)
    sd = {k: v - 1e-5 if k.endswith("running_var") else v for k, v in model.state_dict().items()}
    missing, unexpected = out.load_state_dict(sd, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"weights do not fit preset {model.cfg.name!r}: missing {missing}, unexpected {unexpected}")
    return out


def frozen_copy(model: STEmSeg) -> STEmSeg:
    """Fold trained batch norms into the frozen, epsilon-0 form of the inference network."""
    out = STEmSeg(model.cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        sd[k] = v + 1e-5 if k.endswith("running_var") else v  # absorb BatchNorm's epsilon
    out.load_state_dict(sd)
    return out.eval()


def _batch(ds: Dataset, rng: random.Random, cfg: ModelConfig, n: int, device: torch.device):
    clips = [ds.sample(rng, cfg.clip_len) for _ in range(n)]
    frames = torch.from_numpy(np.stack([c[0] for c in clips])).to(device)  # [N, T, H, W, 3]
    x = frames.permute(0, 1, 4, 2, 3).float() - torch.tensor(IMAGE_MEAN_BGR, device=device).view(1, 1, 3, 1, 1)
    inst = torch.from_numpy(np.stack([c[1] for c in clips])).to(device).long()
    cls = torch.from_numpy(np.stack([c[2] for c in clips])).to(device).long()
    # Labels at the stride-4 output grid, and the full-size foreground the upsampled
    # foreground logit is trained against (inference draws mask outlines from it).
    return x, inst[..., 2::4, 2::4], cls[..., 2::4, 2::4], cls > 0


def train(data: Path | Sequence[Path], cfg: ModelConfig, out: Path, steps: int = 4000, batch: int = 4,
          lr: float = 2e-3, device: str = "cpu", seed: int = 0, log_every: int = 50, save_every: int = 500,
          init: STEmSeg | None = None, progress: Callable[[int, dict], None] | None = None) -> Path:
    """Train `cfg` on one or more `stemseg synth` folders; resumes from `out`'s checkpoint when there is one,
    else starts from `init` (inference weights to fine-tune) or from scratch."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    dev = torch.device(device)
    ds = Dataset(data)
    model = (unfrozen_copy(init) if init is not None else trainable(cfg)).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ckpt = out.with_suffix(".train.pt")
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, rng_state = state["step"], state["rng"]
        rng.setstate(rng_state)
        torch.set_rng_state(state["torch_rng"])
    log = out.with_suffix(".log.jsonl").open("a")
    start = time.time()
    while step < steps:
        x, inst, cls, fg = _batch(ds, rng, cfg, batch, dev)
        n, t = x.shape[:2]
        feats = model.frame_features(x.flatten(0, 1))
        stacked = [f.unflatten(0, (n, t)).permute(0, 2, 1, 3, 4) for f in feats]
        outs = model.clip_heads(stacked)
        losses = [clip_losses(outs.embeddings[i], outs.bandwidths[i], outs.seediness[i], outs.semseg_logits[i],
                              inst[i], cls[i], tuple(cfg.free_dim_stds), foreground=fg[i]) for i in range(n)]
        total = torch.stack([l_["total"] for l_ in losses]).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        step += 1
        if step % log_every == 0 or step == steps:
            row = {"step": step, "seconds": round(time.time() - start, 1), "lr": sched.get_last_lr()[0],
                   **{k: round(float(torch.stack([l_[k].detach() for l_ in losses]).mean()), 5) for k in losses[0]}}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if progress:
                progress(step, row)
        if step % save_every == 0 or step == steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, ckpt)
            save_weights(frozen_copy(model.cpu()), out)
            model.to(dev)
    log.close()
    return out


__all__ = ["Dataset", "frozen_copy", "train", "trainable", "unfrozen_copy"]
