from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.pipeline.preprocess import (
    IMAGE_MEAN_BGR,
    geometry,
    masks_to_frame,
    preprocess,
    resized_size,
    soft_masks_to_frame,
)


@pytest.mark.parametrize(
    "hw, dims, expected",
    [
        ((480, 854), (640, 1196), (640, 1139)),  # short side to min_dim, 853.9 rounds up
        ((240, 320), (640, 1196), (640, 853)),
        ((1080, 1920), (640, 1196), (640, 1138)),
        ((375, 1242), (800, 1948), (588, 1948)),  # long side capped at max_dim
        ((100, 100), (736, 1248), (736, 736)),
        ((1248, 300), (736, 1248), (1248, 300)),  # portrait, capped, no-op
    ],
)
def test_resized_size(hw, dims, expected) -> None:
    assert resized_size(*hw, *dims) == expected


def test_padding_to_multiples_of_32() -> None:
    g = geometry(240, 320, 640, 1196)
    assert (g.padded_height, g.padded_width) == (640, 864)
    assert g.padded_height % 32 == 0 and g.padded_width % 32 == 0


def test_preprocess_values_mean_and_zero_padding() -> None:
    g = geometry(50, 70, 50, 1000)  # no resize: only mean and padding
    frames = torch.randint(0, 256, (2, 50, 70, 3), dtype=torch.uint8)
    x = preprocess(frames, g)
    assert x.shape == (2, 3, 64, 96) and x.dtype == torch.float32
    mean = torch.tensor(IMAGE_MEAN_BGR).view(1, 3, 1, 1)
    torch.testing.assert_close(x[:, :, :50, :70], frames.permute(0, 3, 1, 2).float() - mean)
    assert x[:, :, 50:].abs().sum() == 0 and x[:, :, :, 70:].abs().sum() == 0
    # Channel order is kept: the input is already BGR, channel 0 gets the blue mean.
    assert torch.allclose(x[0, 0, :50, :70] + IMAGE_MEAN_BGR[0], frames[0, :, :, 0].float())


def test_preprocess_resizes_bilinear() -> None:
    g = geometry(30, 40, 60, 1000)
    frames = torch.randint(0, 256, (1, 30, 40, 3), dtype=torch.uint8)
    x = preprocess(frames, g)
    ref = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(60, 80), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x[:, :, :60, :80], ref - torch.tensor(IMAGE_MEAN_BGR).view(1, 3, 1, 1))


def test_masks_back_to_frame_size() -> None:
    g = geometry(45, 70, 90, 1000)  # resized 90x140, padded 96x160
    masks = torch.zeros(3, 96 // 4, 160 // 4)
    masks[:, :12, :20] = 1.0  # top-left quarter of the padded map, about a quarter of the image
    out = masks_to_frame(masks, g, stride=4)
    assert out.shape == (3, 45, 70) and out.dtype == torch.bool
    assert out[:, :20, :30].all() and not out[:, 28:, :].any() and not out[:, :, 40:].any()


def test_soft_masks_follow_the_foreground_score_between_grid_points() -> None:
    """An edge the stride-4 grid cannot place: the foreground score ramps across columns and
    crosses the threshold inside a cell. Hard labels put the outline on the grid; soft masks
    put it where the upsampled score crosses."""
    g = geometry(32, 64, 32, 1000)  # no resize, no padding: stride-4 maps are 8x16
    score = torch.linspace(1.0, -0.5, 16).clamp_min(0).expand(8, 16).contiguous()
    labels = (score > 0.5).unsqueeze(0)
    soft = soft_masks_to_frame(labels, score, 0.5, g, stride=4)
    full = F.interpolate(score[None, None], scale_factor=4.0, mode="bilinear", align_corners=False)[0, 0]
    hard = masks_to_frame(labels.float(), g, stride=4)
    assert torch.equal(soft[0, 0], (full > 0.5)[0])
    assert int(soft[0, 0].sum()) != int(hard[0, 0].sum())  # the two rules really differ here


def test_soft_masks_split_foreground_between_instances_and_skip_unowned() -> None:
    g = geometry(32, 64, 32, 1000)
    labels = torch.zeros(8, 16, dtype=torch.long)
    labels[:, 0:6], labels[:, 6:10] = 1, 2  # columns 10-15: foreground nobody claimed
    onehot = torch.stack([labels == 1, labels == 2])
    soft = soft_masks_to_frame(onehot, torch.ones(8, 16), 0.5, g, stride=4)
    assert soft.shape == (2, 32, 64) and soft.dtype == torch.bool
    assert not (soft[0] & soft[1]).any()  # one owner per pixel
    assert soft[0][:, :22].all() and soft[1][:, 26:38].all()
    assert not soft[:, :, 44:].any()  # foreground with no instance within reach stays empty
