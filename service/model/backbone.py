"""Caffe2-style ResNet-FPN backbone, as in maskrcnn-benchmark, with the official key layout.

Differences from torchvision's ResNet that matter for the official weights: batch norms are
frozen affine maps with epsilon 0, the stride of a bottleneck sits on its first 1x1 conv, and
the FPN's top-down path upsamples bilinearly instead of nearest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """Batch norm reduced to its inference affine map; epsilon 0 as in the original."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * self.running_var.rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.downsample: nn.Module | None = None
        if in_ch != out_ch or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), FrozenBatchNorm2d(out_ch)
            )
        self.conv1 = nn.Conv2d(in_ch, width, 1, stride=stride, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        return F.relu_(self.bn3(self.conv3(out)) + identity)


class Stem(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu_(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    def __init__(self, stage_blocks: tuple[int, int, int, int], width: int = 64) -> None:
        super().__init__()
        self.stem = Stem(width)
        in_ch = width
        self.out_channels = tuple(width * 4 * m for m in (1, 2, 4, 8))
        for i, (blocks, mid) in enumerate(zip(stage_blocks, (width, width * 2, width * 4, width * 8)), start=1):
            out_ch = mid * 4
            stride = 1 if i == 1 else 2
            layer = nn.Sequential(
                *(Bottleneck(in_ch if b == 0 else out_ch, mid, out_ch, stride if b == 0 else 1) for b in range(blocks))
            )
            self.add_module(f"layer{i}", layer)
            in_ch = out_ch

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        feats = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...] = (256, 512, 1024, 2048), out_ch: int = 256) -> None:
        super().__init__()
        for i, c in enumerate(in_channels, start=1):
            self.add_module(f"fpn_inner{i}", nn.Conv2d(c, out_ch, 1))
            self.add_module(f"fpn_layer{i}", nn.Conv2d(out_ch, out_ch, 3, padding=1))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """C2..C5 -> P2..P5 (strides 4, 8, 16, 32)."""
        inner = self.fpn_inner4(feats[3])
        outs = [self.fpn_layer4(inner)]
        for i in (3, 2, 1):
            lateral = getattr(self, f"fpn_inner{i}")(feats[i - 1])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.insert(0, getattr(self, f"fpn_layer{i}")(inner))
        return outs


class ResNetFPN(nn.Module):
    """Per-frame backbone: [B, 3, H, W] (H, W multiples of 32) -> 4 maps of 256 channels."""

    def __init__(self, stage_blocks: tuple[int, int, int, int], width: int = 64, fpn_channels: int = 256) -> None:
        super().__init__()
        self.body = ResNet(stage_blocks, width)
        self.fpn = FPN(self.body.out_channels, fpn_channels)

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.fpn(self.body(images))
