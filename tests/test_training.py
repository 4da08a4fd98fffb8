"""Training: the synthetic data, the losses and the training loop (tiny sizes, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from service.model.checkpoint import load_model
from service.model.presets import get_preset
from service.training.losses import clip_losses, lovasz_hinge
from service.training.synth import CLASSES, render_video, write_dataset
from service.training.train import frozen_copy, train, trainable, unfrozen_copy


def test_lovasz_hinge_is_the_jaccard_loss_at_binary_predictions() -> None:
    """At logits of +-1 every hinge error is 0 or 2 and the Lovász extension is exactly
    2 * (1 - IoU) (Berman et al., eq. 9): checked against IoUs counted directly."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = torch.from_numpy(rng.integers(0, 2, 30)).float()
        if labels.sum() == 0:
            continue
        pred = torch.from_numpy(rng.integers(0, 2, 30)).float()
        iou = float((pred * labels).sum() / ((pred + labels) > 0).sum())
        loss = lovasz_hinge(2 * pred - 1, labels)
        assert loss.item() == pytest.approx(2 * (1 - iou), abs=1e-6)


def _clip(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inst = torch.zeros(2, 8, 10, dtype=torch.long)
    inst[:, 1:4, 1:4], inst[:, 5:8, 5:9] = 1, 2
    classes = torch.where(inst == 1, 3, torch.where(inst == 2, 5, 0))
    return {"emb": torch.randn(4, 2, 8, 10, generator=g), "bw": torch.rand(2, 2, 8, 10, generator=g) * 10 + 1,
            "seed": torch.rand(1, 2, 8, 10, generator=g), "semseg": torch.randn(8, 2, 8, 10, generator=g),
            "inst": inst, "classes": classes}


def test_losses_reward_separated_embeddings_and_right_classes() -> None:
    c = _clip()
    random_losses = clip_losses(c["emb"], c["bw"], c["seed"], c["semseg"], c["inst"], c["classes"], (0.3, 0.3))
    # Embeddings that put each instance at its own point far from the others and background.
    emb = torch.zeros_like(c["emb"])
    emb[0] = 10.0 * c["inst"].float()
    semseg = torch.full_like(c["semseg"], -20.0)
    semseg[:-1].scatter_(0, c["classes"].unsqueeze(0), 20.0)
    semseg[-1] = torch.where(c["classes"] > 0, 20.0, -20.0)
    good = clip_losses(emb, c["bw"], c["seed"], semseg, c["inst"], c["classes"], (0.3, 0.3))
    for key in ("embedding", "semseg", "foreground"):
        assert good[key] < 0.05 * random_losses[key], key
    # Seediness towards the new probabilities and bandwidth smoothness are untouched by this.
    assert good["total"] < random_losses["total"]
    assert all(torch.isfinite(v) for v in random_losses.values())


def test_full_size_foreground_loss_sees_what_the_stride_4_grid_cannot() -> None:
    """Two full-size targets that agree at the stride-4 sample points but not between them: the
    stride-4 loss cannot tell them apart, the full-size one (the upsampled logit) must."""
    c = _clip()
    full = torch.zeros(2, 32, 40, dtype=torch.bool)
    full[:, 4:16, 4:16] = True
    wider = full.clone()
    wider[:, 3:17, 3:17] = True  # one pixel more all round: no stride-4 sample point (2 + 4k) moves
    args = (c["emb"], c["bw"], c["seed"], c["semseg"], c["inst"], c["classes"], (0.3, 0.3))
    assert torch.equal(full[:, 2::4, 2::4], wider[:, 2::4, 2::4])
    a, b = clip_losses(*args, foreground=full), clip_losses(*args, foreground=wider)
    assert a["foreground"] != b["foreground"]
    assert a["embedding"] == b["embedding"]


def test_synth_is_deterministic_and_seeds_differ(tmp_path: Path) -> None:
    v1, o1 = render_video(5, frames=6, size=(64, 96))
    v2, o2 = render_video(5, frames=6, size=(64, 96))
    v3, _ = render_video(6, frames=6, size=(64, 96))
    assert np.array_equal(v1, v2) and not np.array_equal(v1, v3)
    assert all(np.array_equal(a["masks"], b["masks"]) for a, b in zip(o1, o2, strict=True))
    doc = json.loads((write_dataset(tmp_path / "d", videos=2, seed=4, frames=6, size=(64, 96))
                      / "annotations.json").read_text())
    assert {c["id"]: c["name"] for c in doc["categories"]} == CLASSES and len(CLASSES) >= 6
    assert [v["file_name"] for v in doc["videos"]] == ["videos/00000.mp4", "videos/00001.mp4"]
    for a in doc["annotations"]:
        assert len(a["segmentations"]) == 6
        for seg, area in zip(a["segmentations"], a["areas"], strict=True):
            assert (seg is None) == (area is None)
            if seg is not None:
                m = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
                assert m.shape == (64, 96) and int(m.sum()) == area


def test_synth_videos_are_the_same_bytes_every_time(tmp_path: Path) -> None:
    """Held-out scores are only reproducible if a seed gives the same encoded video: with x264's
    assembly on, three writes of the same frames at the default size decoded differently."""
    a = write_dataset(tmp_path / "a", videos=3, seed=2)
    b = write_dataset(tmp_path / "b", videos=3, seed=2)
    for name in ("00000.mp4", "00001.mp4", "00002.mp4"):
        assert (a / "videos" / name).read_bytes() == (b / "videos" / name).read_bytes(), name


def test_unfrozen_copy_inverts_frozen_copy() -> None:
    """Folding batch norms for inference and unfolding them to fine-tune gives back the trained
    state exactly (up to float rounding: an epsilon left in or out would show as 1e-5)."""
    torch.manual_seed(0)
    model = trainable(get_preset("lite"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    back = unfrozen_copy(frozen_copy(model.eval())).state_dict()
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[k], v, rtol=1e-6, atol=0, msg=k)


def test_train_logs_saves_resumes_and_fine_tunes(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", videos=2, seed=9, frames=10, size=(64, 96))
    cfg = get_preset("lite")
    out = tmp_path / "a.safetensors"
    train(data, cfg, out, steps=2, batch=2, log_every=1, save_every=2)
    rows = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r[k]) for r in rows for k in ("embedding", "seediness", "semseg", "foreground", "total"))
    first = load_model(out)
    # Resuming continues from the checkpoint's step and changes the weights.
    train(data, cfg, out, steps=3, batch=2, log_every=1, save_every=3)
    rows = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    resumed = load_model(out)
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), resumed.state_dict().values()))
    # Fine-tuning starts from the given weights: at lr 0 the saved file holds them unchanged
    # (all but the batch-norm statistics, which the training-mode forward pass updates).
    tuned = tmp_path / "b.safetensors"
    train(data, cfg, tuned, steps=1, batch=2, lr=0.0, init=resumed, save_every=1)
    after = load_model(tuned).state_dict()
    for k, a in resumed.state_dict().items():
        if not k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(a, after[k], rtol=1e-6, atol=1e-6, msg=k)


def test_train_cli_refuses_init_that_is_not_weights(tmp_path: Path, capsys) -> None:
    from service.cli import main

    data = write_dataset(tmp_path / "data", videos=1, seed=9, frames=8, size=(64, 96), encode=False)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not weights")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "o.safetensors"), "--init", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "bad.safetensors" in err



def test_dataset_reads_several_folders_with_compact_labels(tmp_path: Path) -> None:
    from service.training.train import Dataset

    a = write_dataset(tmp_path / "a", videos=2, seed=11, frames=6, size=(64, 96))
    b = write_dataset(tmp_path / "b", videos=1, seed=12, frames=6, size=(64, 96))
    ds = Dataset([a, b])
    assert len(ds.videos) == 3
    frames, inst, cls = ds.videos[2]
    assert frames.shape == (6, 64, 96, 3) and inst.dtype == cls.dtype == np.uint8
    _, objects = render_video(12 * 100003, frames=6, size=(64, 96))
    assert set(np.unique(cls)) == {0} | {o["category_id"] for o in objects if o["masks"].any()}
