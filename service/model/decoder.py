"""The squeeze-expand 3-D decoder shared by STEm-Seg's embedding, seediness and semseg heads.

FPN maps of a clip's frames are stacked on a time axis; each scale is processed by 3-D convs
whose temporal pooling depends on the clip length, and the scales are merged coarse to fine.
Module indices inside the Sequentials follow the original so checkpoint keys line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# How many of the three pool slots halve the time axis, per clip length. The merges upsample
# time back by the matching factors: (2, 2, 2) for T=16, (1, 2, 2) for 8, (1, 1, 2) for 4.
_POOLS_ACTIVE = {16: 3, 8: 2, 4: 1, 2: 0}


class TimePool(nn.Module):
    """AvgPool3d(3, stride (2, 1, 1), padding 1, count_include_pad=True), padding made explicit.

    Identical numbers; the explicit zero pad lets torch.export reason about small symbolic sizes.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1)), kernel_size=3, stride=(2, 1, 1))


def _conv_block(in_ch: int, out_ch: int, pool: bool | None) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv3d(in_ch, out_ch, 3, padding=1), nn.GroupNorm(32, out_ch), nn.ReLU(inplace=True)]
    if pool is not None:
        layers.append(TimePool() if pool else nn.Identity())
    return layers


class SqueezeExpandDecoder(nn.Module):
    """[N, 256, T, h/s, w/s] for s = 4, 8, 16, 32 -> [N, c4, T, h/4, w/4]."""

    def __init__(self, clip_len: int, inter: tuple[int, int, int, int], in_ch: int = 256) -> None:
        super().__init__()
        if clip_len not in _POOLS_ACTIVE:
            raise ValueError(f"clip length must be one of {sorted(_POOLS_ACTIVE)}, got {clip_len}")
        c32, c16, c8, c4 = inter
        active = _POOLS_ACTIVE[clip_len]
        self.block_32x = nn.Sequential(
            *_conv_block(in_ch, c32, active > 0), *_conv_block(c32, c32, active > 1), *_conv_block(c32, c32, active > 2)
        )
        self.block_16x = nn.Sequential(*_conv_block(in_ch, c16, active > 0), *_conv_block(c16, c16, active > 1))
        self.block_8x = nn.Sequential(*_conv_block(in_ch, c8, active > 0))
        self.block_4x = nn.Sequential(*_conv_block(in_ch, c4, None))
        self.conv_16 = nn.Conv3d(c32 + c16, c16, 1, bias=False)
        self.conv_8 = nn.Conv3d(c16 + c8, c8, 1, bias=False)
        self.conv_4 = nn.Conv3d(c8 + c4, c4, 1, bias=False)
        self.out_channels = c4

    @staticmethod
    def _up_cat(x: Tensor, skip: Tensor) -> Tensor:
        # Upsampling to the skip's size (an exact (s, 2, 2) factor, so the same numbers as a scale
        # factor) keeps exported graphs free of shape arithmetic between the four inputs.
        x = F.interpolate(x, size=skip.shape[-3:], mode="trilinear", align_corners=False)
        return torch.cat((x, skip), 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        p4, p8, p16, p32 = feats
        x = self.conv_16(self._up_cat(self.block_32x(p32), self.block_16x(p16)))
        x = self.conv_8(self._up_cat(x, self.block_8x(p8)))
        return self.conv_4(self._up_cat(x, self.block_4x(p4)))
