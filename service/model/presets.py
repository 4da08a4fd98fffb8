"""Model presets: one dataclass describes a network and how the original ran it at inference.

The three official presets mirror the authors' released checkpoints (`davis.pth`,
`youtube_vis.pth`, `kitti_mots.pth`); every number here is read off their configs and
checked against the reference vectors. `OFFICIAL` is the one list of those names: each with its
preset and where `stemseg weights fetch` downloads it (the URLs the original README,
github.com/sabarim/STEm-Seg, publishes). Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Literal

EmbeddingMode = Literal["xyt", "xyff"]
ForegroundRule = Literal["seediness", "semseg"]
MaskUpsampling = Literal["reference", "soft"]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    # Backbone: ResNet depth (50 or 101) and the blocks per stage it implies, or explicit
    # blocks; `width` is the stem's channels (bottleneck widths are 1, 2, 4, 8 times it).
    depth: int = 101
    blocks: tuple[int, int, int, int] | None = None
    width: int = 64
    fpn_channels: int = 256
    # Clip plan.
    clip_len: int = 8
    overlap: int = 4
    # Inference resize (short side / long-side cap) before padding to a multiple of 32.
    min_dim: int = 640
    max_dim: int = 1196
    # Category id -> name, without background. Semseg channel k (k >= 1) is category k.
    classes: dict[int, str] = field(default_factory=dict)
    embedding_mode: EmbeddingMode = "xyff"
    free_dim_stds: tuple[float, ...] = (0.3, 0.3)
    # Decoder widths (c32, c16, c8, c4) of each head; None means the head does not exist.
    embedding_inter: tuple[int, int, int, int] = (256, 256, 128, 128)
    seediness_inter: tuple[int, int, int, int] | None = None
    semseg_inter: tuple[int, int, int, int] | None = (256, 256, 256, 256)
    # How a pixel is declared foreground before clustering.
    foreground: ForegroundRule = "semseg"
    foreground_thresh: float = 0.5
    # Stride of the maps clustering runs on: 4 (decoder output) or 1 (upsampled to input size).
    cluster_stride: int = 4
    # How stride-4 instance labels become frame-size masks: "reference" upsamples the hard
    # labels (the original); "soft" lets the upsampled foreground score draw the outline.
    mask_upsampling: MaskUpsampling = "reference"
    min_seediness: float = 0.8
    max_instances: int = 20
    max_tracks: int | None = 10

    @property
    def embedding_dim(self) -> int:
        return 3 if self.embedding_mode == "xyt" else 4

    @property
    def num_free_dims(self) -> int:
        return self.embedding_mode.count("f")

    @property
    def variance_dim(self) -> int:
        return self.embedding_dim - self.num_free_dims

    @property
    def num_classes(self) -> int:
        """Semseg classes including background (the original's NUM_CLASSES)."""
        return len(self.classes) + 1

    @property
    def stage_blocks(self) -> tuple[int, int, int, int]:
        return self.blocks or {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[self.depth]

    def with_min_dim(self, min_dim: int) -> ModelConfig:
        """The original's `--min_dim`: max_dim scales by the same ratio."""
        return replace(self, min_dim=min_dim, max_dim=round(min_dim * self.max_dim / self.min_dim))

    def to_json(self) -> str:
        d = asdict(self)
        d["classes"] = {str(k): v for k, v in self.classes.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        d["classes"] = {int(k): v for k, v in d["classes"].items()}
        for key in ("free_dim_stds", "embedding_inter", "seediness_inter", "semseg_inter", "blocks"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def _classes(dataset: str) -> dict[int, str]:
    table = json.loads(resources.files("service.model").joinpath("classes.json").read_text())
    return {int(k): v for k, v in table[dataset].items()}


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One of the authors' released checkpoints: the preset it loads into, and where it is published."""

    config: ModelConfig
    url: str
    trained_on: str

    @property
    def name(self) -> str:
        return self.config.name


_BASE = "https://omnomnom.vision.rwth-aachen.de/data/STEm-Seg/models"
OFFICIAL: dict[str, OfficialCheckpoint] = {c.name: c for c in (
    OfficialCheckpoint(ModelConfig(
        name="davis", clip_len=16, overlap=6, min_dim=736, max_dim=1248, classes=_classes("davis"),
        embedding_mode="xyff", seediness_inter=(256, 256, 128, 128), semseg_inter=None,
        foreground="seediness", foreground_thresh=0.25, cluster_stride=4,
        min_seediness=0.8, max_instances=20, max_tracks=20,
    ), f"{_BASE}/davis.pth", "DAVIS'17, YouTube-VIS, COCO, PascalVOC"),
    OfficialCheckpoint(ModelConfig(
        name="youtube_vis", clip_len=8, overlap=4, min_dim=640, max_dim=1196, classes=_classes("youtube_vis"),
        embedding_mode="xyff", semseg_inter=(256, 256, 256, 256), foreground="semseg",
        foreground_thresh=0.5, cluster_stride=1, min_seediness=0.8, max_instances=20, max_tracks=10,
    ), f"{_BASE}/youtube_vis.pth", "YouTube-VIS, COCO, PascalVOC"),
    OfficialCheckpoint(ModelConfig(
        name="kitti_mots", clip_len=8, overlap=4, min_dim=800, max_dim=1948, classes=_classes("kitti_mots"),
        embedding_mode="xyt", free_dim_stds=(), semseg_inter=(256, 256, 128, 128), foreground="semseg",
        foreground_thresh=0.5, cluster_stride=4, min_seediness=0.95, max_instances=20, max_tracks=None,
    ), f"{_BASE}/kitti_mots.pth", "Mapillary, KITTI-MOTS, MOTSChallenge 0002"),
)}
OFFICIAL_WEIGHTS = tuple(OFFICIAL)  # names `stemseg weights fetch` downloads and `--weights NAME` finds
PRESETS: dict[str, ModelConfig] = {name: c.config for name, c in OFFICIAL.items()}


# Our small model, trained on `stemseg synth` videos: the same family at a fraction of the
# size (1-block stages, 16-channel stem, 64-channel FPN, narrow decoders).
PRESETS["lite"] = ModelConfig(
    name="lite", blocks=(1, 1, 1, 1), width=16, fpn_channels=64, clip_len=8, overlap=4, min_dim=128, max_dim=256,
    classes={1: "disc", 2: "square", 3: "triangle", 4: "star", 5: "cross", 6: "ring"},
    embedding_mode="xyff", embedding_inter=(64, 64, 32, 32), semseg_inter=(64, 64, 32, 32), foreground="semseg",
    foreground_thresh=0.5, cluster_stride=4, mask_upsampling="soft", min_seediness=0.6, max_instances=20,
    max_tracks=10,
)


# Presets whose networks were only ever trained on `stemseg synth` shapes: their tracks on real
# footage mean nothing, which a user must be told when they run (the CLI on stderr, the API in
# the job's JSON), not only in the model card.
SYNTHETIC_ONLY = ("lite",)


def model_warning(preset: str | None) -> str | None:
    """The one-line warning for a run of a model that sees only synthetic shapes, else None."""
    if preset not in SYNTHETIC_ONLY:
        return None
    return (f"the {preset} model sees only synthetic shapes (discs, squares, stars...), its tracks on real videos "
            "mean nothing: for real videos fetch an official checkpoint (`stemseg weights fetch youtube_vis`, "
            "then --weights youtube_vis or STEMSEG_WEIGHTS=youtube_vis)")


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
