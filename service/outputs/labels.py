"""What the outputs show about each kept track, decided once every clip is stitched.

Small (a few numbers per track) and the same for every frame, so it is decided in one place at
the end (`Labels.decide`) and handed to whoever renders a range of frames (service.outputs.render).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from fractions import Fraction

from service.outputs.davis import MAX_INDEX
from service.pipeline.tracks import VideoResult

DEFAULT_FPS = 25

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackLabel:
    """One kept track as every output shows it."""

    id: int
    rank: int  # position in VideoResult.kept(): longest-lived first
    category: int  # YouTube-VIS/DAVIS rule (mean class logits)
    category_name: str  # the class name, or the id where the classes do not name it
    overlay_name: str  # the class name, or "" where the classes do not name it
    score: float
    mots_class: int  # KITTI-MOTS rule (per-pixel votes)

    @property
    def mots_id(self) -> int:
        return self.mots_class * 1000 + self.rank + 1


@dataclass(frozen=True)
class Labels:
    """Everything the outputs need beyond each frame's masks: small (per track), decided once all
    clips are stitched, and shared by every range."""

    num_frames: int
    height: int
    width: int
    fps: float | None
    tracks: list[TrackLabel]  # in kept order
    drawn: list[int]  # overlay: ranks of the tracks drawn, most important (highest score) first

    @classmethod
    def decide(cls, result: VideoResult, overlay_min_score: float = 0.0) -> Labels:
        kept = result.kept()
        scores = result.scores(kept)
        tracks = [TrackLabel(t.id, k, t.category(), result.classes.get(t.category(), str(t.category())),
                             result.classes.get(t.category(), ""), s, t.voted_category())
                  for k, (t, s) in enumerate(zip(kept, scores))]
        drawn = sorted((k for k in range(len(kept)) if scores[k] >= overlay_min_score), key=lambda k: -scores[k])
        if len(kept) > MAX_INDEX:
            # Only reachable with max_tracks=None; failing the whole job over it would lose the
            # other formats, and kept() is longest-lived first, so the dropped tracks matter least.
            log.warning("DAVIS PNGs hold %d tracks; %d shortest-lived not painted", MAX_INDEX, len(kept) - MAX_INDEX)
        return cls(result.num_frames, result.height, result.width, result.fps, tracks, drawn)

    def overlay_text(self, rank: int) -> str:
        t = self.tracks[rank]
        return f"{t.id} {t.overlay_name} {t.score:.2f}".replace("  ", " ")

    @property
    def davis_tracks(self) -> list[TrackLabel]:
        """The tracks painted in the PNGs, in painting order (a later one wins)."""
        return self.tracks[:MAX_INDEX]

    @property
    def rate(self) -> Fraction:
        # Exact rates (30000/1001) survive as fractions; the time base follows the rate so pts = frame index.
        return Fraction(self.fps).limit_denominator(1001) if self.fps and self.fps > 0 else Fraction(DEFAULT_FPS)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Labels:
        d = json.loads(text)
        return cls(d["num_frames"], d["height"], d["width"], d["fps"], [TrackLabel(**t) for t in d["tracks"]],
                   d["drawn"])
