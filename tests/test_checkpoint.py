from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from service.model.checkpoint import CheckpointError, load_model, save_weights, state_dict_hash
from service.model.presets import PRESETS


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_inferred_from_official_layout(official_weights, preset: str) -> None:
    assert load_model(official_weights(preset)).cfg.name == preset


def _official_sd(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_every_problem_reported_at_once(official_weights, tmp_path: Path) -> None:
    sd = _official_sd(official_weights("kitti_mots"))
    del sd["backbone.fpn.fpn_inner1.bias"]
    sd["embedding_head.conv_variance.bias"] = torch.zeros(7)
    sd["some.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save({"model": sd}, bad)
    with pytest.raises(CheckpointError) as e:
        load_model(bad, "kitti_mots")
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing key backbone.fpn.fpn_inner1.bias" in msg
    assert "wrong shape for embedding_head.conv_variance.bias: file (7,), model (3,)" in msg
    assert "unexpected key some.extra.weight" in msg
    with pytest.raises(CheckpointError, match="match none of the presets"):
        load_model(bad)


def test_wrong_explicit_preset_is_refused(official_weights) -> None:
    with pytest.raises(CheckpointError, match="does not fit preset 'davis'"):
        load_model(official_weights("youtube_vis"), "davis")


@pytest.mark.parametrize(
    "content, match",
    [(b"", "not a checkpoint"), (b"hello world, not a model", "not a PyTorch checkpoint"),
     (b"\x89PNG\r\n\x1a\n" + bytes(100), "not a PyTorch checkpoint")],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "x.pth"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_model(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_needing_code_is_refused(tmp_path: Path, capsys) -> None:
    p = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload()}, p, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="need code to load"):
        load_model(p)
    assert "this must never run" not in capsys.readouterr().out


def test_dict_without_tensors_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.pth"
    torch.save({"epoch": 3}, p)
    with pytest.raises(CheckpointError, match="expected"):
        load_model(p)


def test_own_format_roundtrip_carries_preset_and_hash(official_weights, tmp_path: Path) -> None:
    model = load_model(official_weights("kitti_mots"))
    out = tmp_path / "m.safetensors"
    digest = save_weights(model, out)
    again = load_model(out)
    assert again.cfg == model.cfg
    assert digest == state_dict_hash(again.state_dict()) == state_dict_hash(model.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_own_format_corruption_detected(official_weights, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    save_weights(load_model(official_weights("kitti_mots")), out)
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(out)
