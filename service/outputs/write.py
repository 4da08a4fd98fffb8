"""Writing the requested outputs all or nothing: into a temporary sibling directory, renamed
into place when complete, so a failed run never leaves output that looks finished."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from service.outputs.davis import write_davis
from service.outputs.mots import write_mots
from service.outputs.overlay import write_overlay
from service.outputs.ytvis import write_ytvis
from service.pipeline.tracks import VideoResult

FORMATS = ("ytvis", "davis", "mots", "overlay")
NAMES = {"ytvis": "results.json", "davis": "davis", "mots": "mots.txt", "overlay": "overlay.mp4"}


def write_outputs(result: VideoResult, out_dir: Path, formats: Sequence[str],
                  frames_for_overlay: Callable[[], Iterable[np.ndarray]] | None = None) -> dict[str, Path]:
    """Write formats (from FORMATS) into out_dir, replacing whatever it held; returns format -> path.

    frames_for_overlay is called once, only for "overlay", and must yield the video's BGR frames.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown output format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    if "overlay" in formats and frames_for_overlay is None:
        raise ValueError("the overlay format needs the video's frames (frames_for_overlay)")
    formats = list(dict.fromkeys(formats))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final renames stay on one filesystem (atomic); hidden, so a leftover
    # from a killed process is never mistaken for a result.
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        for fmt in formats:
            target = tmp / NAMES[fmt]
            if fmt == "ytvis":
                write_ytvis(result, target)
            elif fmt == "davis":
                write_davis(result, target)
            elif fmt == "mots":
                write_mots(result, target)
            else:
                n = write_overlay(result, frames_for_overlay(), target, result.fps)
                if n != result.num_frames:
                    raise RuntimeError(f"overlay got {n} frames, the video has {result.num_frames}")
        # Directories cannot be renamed over each other: move the old one aside, then swap.
        old = None
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except BaseException:
            if old is not None:
                old.rename(out_dir)  # put the previous result back rather than leave none
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return {fmt: out_dir / NAMES[fmt] for fmt in formats}
