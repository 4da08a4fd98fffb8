"""STEm-Seg: a per-frame ResNet-FPN backbone and per-clip 3-D heads.

The network is split where the data is: the backbone runs on frames (batched over any
frames, so overlapping clips reuse features), the heads run on a clip's stacked features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.model.backbone import ResNetFPN
from service.model.decoder import SqueezeExpandDecoder
from service.model.presets import ModelConfig


@dataclass
class ClipOutputs:
    """Head outputs for N clips at stride 4: [N, C, T, h, w] each."""

    embeddings: Tensor  # tanh(0.25 x) + spatio-temporal offsets
    bandwidths: Tensor  # exp(x) * 10, one per non-free embedding dim
    seediness: Tensor  # sigmoid, in 0..1
    semseg_logits: Tensor | None  # background, the classes, then the foreground logit


def spatiotemporal_offsets(mode: str, t: int, h: int, w: int, time_scale: Tensor) -> Tensor:
    """The original's "mixing functions": coordinates added to the embeddings, [E, t, h, w].

    The longer spatial side spans more than [-1, 1] so a unit keeps the same length in x and y.
    """
    dev, dt = time_scale.device, time_scale.dtype
    # Sizes enter as tensors (sums of ones) rather than Python numbers so an exported graph
    # keeps height and width dynamic instead of baking in one aspect ratio.
    h_t, w_t = torch.ones(h, device=dev, dtype=dt).sum(), torch.ones(w, device=dev, dtype=dt).sum()
    a = torch.clamp(w_t / h_t, min=1.0)
    b = torch.clamp(h_t / w_t, min=1.0)
    xs = (torch.linspace(-1.0, 1.0, w, device=dev, dtype=dt) * a).view(1, 1, w).expand(t, h, w)
    ys = (torch.linspace(-1.0, 1.0, h, device=dev, dtype=dt) * b).view(1, h, 1).expand(t, h, w)
    if mode == "xyt":
        ts = (torch.linspace(-1.0, 1.0, t, device=dev, dtype=dt) * time_scale).view(t, 1, 1).expand(t, h, w)
        return torch.stack((ts, ys, xs))
    if mode == "xyff":
        zeros = torch.zeros(t, h, w, device=dev, dtype=dt)
        return torch.stack((ys, xs, zeros, zeros))
    raise ValueError(f"unknown embedding mode {mode!r}")


class EmbeddingHead(SqueezeExpandDecoder):
    # Heads subclass the decoder (rather than own one) so their keys match the checkpoints.
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.clip_len, cfg.embedding_inter, cfg.fpn_channels)
        self.mode = cfg.embedding_mode
        c = self.out_channels
        self.conv_embedding = nn.Conv3d(c, cfg.embedding_dim, 1, bias=False)
        self.conv_variance = nn.Conv3d(c, cfg.variance_dim, 1, bias=True)
        self.conv_seediness = nn.Conv3d(c, 1, 1, bias=False) if cfg.seediness_inter is None else None
        # Checkpoints carry it; 1.0 in every released one.
        self.register_buffer("time_scale", torch.tensor(1.0))

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        x = super().forward(feats)
        _, _, t, h, w = x.shape
        emb = torch.tanh(0.25 * self.conv_embedding(x))
        emb = emb + spatiotemporal_offsets(self.mode, t, h, w, self.time_scale.to(emb.dtype)).unsqueeze(0)
        bandwidths = self.conv_variance(x).exp() * 10.0
        seed = torch.sigmoid(self.conv_seediness(x)) if self.conv_seediness is not None else None
        return emb, bandwidths, seed


class ConvOutHead(SqueezeExpandDecoder):
    """A squeeze-expand decoder and a 1x1x1 output conv (the seediness and semseg heads)."""

    def __init__(self, clip_len: int, inter: tuple[int, int, int, int], out_channels: int, in_ch: int = 256) -> None:
        super().__init__(clip_len, inter, in_ch)
        self.conv_out = nn.Conv3d(self.out_channels, out_channels, 1, bias=False)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.conv_out(super().forward(feats))


class STEmSeg(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetFPN(cfg.stage_blocks, cfg.width, cfg.fpn_channels)
        self.embedding_head = EmbeddingHead(cfg)
        self.seediness_head = (
            ConvOutHead(cfg.clip_len, cfg.seediness_inter, 1, cfg.fpn_channels)
            if cfg.seediness_inter is not None else None
        )
        self.semseg_head = (
            ConvOutHead(cfg.clip_len, cfg.semseg_inter, cfg.num_classes + 1, cfg.fpn_channels)
            if cfg.semseg_inter is not None else None
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def frame_features(self, images: Tensor) -> list[Tensor]:
        """[B, 3, H, W] preprocessed frames -> FPN maps at strides 4, 8, 16, 32, [B, 256, h, w]."""
        return self.backbone(images)

    def clip_heads(self, feats: list[Tensor]) -> ClipOutputs:
        """FPN maps stacked per clip, [N, 256, T, h, w] at the four strides -> head outputs."""
        emb, bandwidths, seed = self.embedding_head(feats)
        if self.seediness_head is not None:
            seed = torch.sigmoid(self.seediness_head(feats))
        semseg = self.semseg_head(feats) if self.semseg_head is not None else None
        return ClipOutputs(emb, bandwidths, seed, semseg)

    def forward(self, clip: Tensor) -> ClipOutputs:
        """One clip of preprocessed frames [T, 3, H, W] -> outputs with a batch of one."""
        feats = self.frame_features(clip)
        return self.clip_heads([stack_clip(f) for f in feats])


def stack_clip(frame_maps: Tensor) -> Tensor:
    """[T, C, h, w] per-frame maps -> [1, C, T, h, w], the heads' layout."""
    return frame_maps.permute(1, 0, 2, 3).unsqueeze(0)
