"""The original's input transform and its inverse for masks, as tensor ops on any device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_MEAN_BGR = (102.9801, 115.9465, 122.7717)


@dataclass(frozen=True)
class Geometry:
    """Sizes a frame goes through: original -> resized -> zero-padded to multiples of 32."""

    height: int
    width: int
    resized_height: int
    resized_width: int
    padded_height: int
    padded_width: int


def resized_size(height: int, width: int, min_dim: int, max_dim: int) -> tuple[int, int]:
    """Short side to min_dim unless that pushes the long side past max_dim."""
    scale = min_dim / min(height, width)
    if max(height, width) * scale > max_dim:
        scale = max_dim / max(height, width)
    return round(height * scale), round(width * scale)


def geometry(height: int, width: int, min_dim: int, max_dim: int) -> Geometry:
    rh, rw = resized_size(height, width, min_dim, max_dim)
    return Geometry(height, width, rh, rw, -(-rh // 32) * 32, -(-rw // 32) * 32)


def preprocess(frames_bgr: Tensor, geom: Geometry) -> Tensor:
    """[T, H, W, 3] uint8 BGR on the target device -> [T, 3, Hp, Wp] float32 network input."""
    x = frames_bgr.permute(0, 3, 1, 2).to(torch.float32)
    if (geom.resized_height, geom.resized_width) != (geom.height, geom.width):
        x = F.interpolate(x, size=(geom.resized_height, geom.resized_width), mode="bilinear", align_corners=False)
    x = x - torch.tensor(IMAGE_MEAN_BGR, device=x.device).view(1, 3, 1, 1)
    # Padding goes on after the mean so padded pixels are exactly zero, as in the original.
    return F.pad(x, (0, geom.padded_width - geom.resized_width, 0, geom.padded_height - geom.resized_height))


def _to_frame(x: Tensor, geom: Geometry, stride: int) -> Tensor:
    """[N, 1, Hp/stride, Wp/stride] float maps -> [N, 1, H, W] at the original frame size."""
    if stride != 1:
        x = F.interpolate(x, scale_factor=float(stride), mode="bilinear", align_corners=False)
    x = x[..., : geom.resized_height, : geom.resized_width]
    if (geom.resized_height, geom.resized_width) != (geom.height, geom.width):
        x = F.interpolate(x, size=(geom.height, geom.width), mode="bilinear", align_corners=False)
    return x


def masks_to_frame(masks: Tensor, geom: Geometry, stride: int) -> Tensor:
    """Soft or binary masks [..., Hp/stride, Wp/stride] -> boolean masks at the original frame size.

    Masks are brought to the padded input size (x stride, bilinear), cropped to the resized
    image, resized to the original frame, then thresholded at 0.5, as the original does.
    """
    lead = masks.shape[:-2]
    x = _to_frame(masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.float32), geom, stride)
    return (x > 0.5).reshape(*lead, geom.height, geom.width)


def soft_masks_to_frame(masks: Tensor, foreground: Tensor, thresh: float, geom: Geometry,
                        stride: int) -> Tensor:
    """Instance masks [N >= 1, h, w] -> [N, H, W] whose outline follows the foreground score [h, w].

    Upsampling hard labels, as the original does, puts every outline on the stride-4 grid: on
    objects some 30 px across that alone caps the mask IoU near 0.85. Here the continuous
    foreground score is upsampled and thresholded at full size, and each foreground pixel goes
    to the instance whose upsampled label weight is largest there (none where all are zero).
    """
    n = masks.shape[0]
    x = torch.cat((masks.to(torch.float32), foreground.to(torch.float32).unsqueeze(0)))
    x = _to_frame(x.unsqueeze(1), geom, stride)[:, 0]
    weights, score = x[:n], x[n]
    best, owner = weights.max(0)
    keep = (score > thresh) & (best > 0)
    return (owner.unsqueeze(0) == torch.arange(n, device=owner.device).view(-1, 1, 1)) & keep
