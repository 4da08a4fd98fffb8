"""Writing the requested outputs all or nothing, and never over what stemseg did not write.

Everything goes into a temporary sibling directory that is renamed into place when complete, so
a failed run never leaves output that looks finished. The directory carries a manifest
(`stemseg-output.json`) listing every file the run wrote: only a directory whose contents are
exactly what its manifest lists is recognised as a previous output and may be replaced. An
existing file, a non-empty directory without a manifest, or a previous output someone has since
added files to is refused with OutputExists.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from service.config import OUTPUT_FORMATS as FORMATS
from service.errors import UserError
from service.outputs.labels import Labels
from service.outputs.names import MANIFEST, NAMES
from service.outputs.render import assemble, range_masks, ranges, render_range
from service.pipeline.tracks import VideoResult


class OutputExists(UserError, ValueError):
    """The output path holds something stemseg may not replace (one-line message)."""


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


def _previous_output(out_dir: Path) -> bool:
    """Whether out_dir is a stemseg output holding exactly the files its manifest lists."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        listed = set(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _files_under(out_dir) == listed | {MANIFEST}


def check_output_dir(out_dir: Path, *, replace: bool) -> None:
    """Raise OutputExists unless writing out_dir would destroy nothing stemseg did not write:
    out_dir is absent, an empty directory, or (with replace) a previous output."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputExists(f"{out_dir} exists and is not a directory: choose another --out")
    if not out_dir.exists():
        # Only the final directory is made, and at the end, after minutes of work: a mistyped
        # parent is refused rather than created (a whole chain of directories, say at the root).
        parent = out_dir.parent
        if not parent.is_dir():
            raise OutputExists(f"cannot create {out_dir}: its parent {parent} does not exist (create it first)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputExists(f"cannot create {out_dir}: {parent} is not a writable directory")
        return
    if not any(out_dir.iterdir()):
        return
    if not _previous_output(out_dir):
        raise OutputExists(f"{out_dir} is a non-empty directory that is not a stemseg output "
                           f"(no {MANIFEST}, or files were added): choose another --out")
    if not replace:
        raise OutputExists(f"{out_dir} holds a previous stemseg output: pass --force to replace it")


def render_in_ranges(result: VideoResult, parts: Path, formats: Sequence[str], labels: Labels,
                     frames_for_overlay: Callable[[], Iterable[np.ndarray]] | None = None, *,
                     video: Path | None = None, processes: int = 1, range_frames: int | None = None,
                     max_pixels: int | None = None) -> list[tuple[int, int]]:
    """Render every range of frames (service.outputs.render) under `parts`; returns the ranges.

    With `processes` > 1 the ranges are rendered by that many processes at once, each decoding its
    own frames from `video` (needed then for the overlay); otherwise here, in order, the overlay's
    frames coming from `video` or from one pass of `frames_for_overlay()`."""
    n = result.num_frames
    parallel = processes > 1 and ("overlay" not in formats or video is not None)
    # Two ranges per process: balanced enough, and few segment starts (each one a keyframe).
    size = range_frames or (max(64, math.ceil(n / (2 * processes))) if parallel else n)
    spans = ranges(n, size)
    if parallel and len(spans) > 1:  # one range: starting processes would only cost
        ctx = multiprocessing.get_context("spawn")  # the parent may hold torch's threads: never fork it
        with ProcessPoolExecutor(min(processes, len(spans)), mp_context=ctx) as pool:
            futures = [pool.submit(_render_one, labels, formats, range_masks(result, a, b), video, a, b, parts,
                                   max_pixels) for a, b in spans]
            for fut in futures:
                fut.result()
        return spans
    frames = None
    if "overlay" in formats:
        frames = iter(frames_for_overlay()) if video is None else None
    for a, b in spans:
        source = frames if video is None else _video_frames(video, a, b, max_pixels)
        render_range(labels, formats, range_masks(result, a, b), source if "overlay" in formats else None, a, b, parts)
    if frames is not None and next(frames, None) is not None:
        raise RuntimeError(f"overlay got more frames than the video's {n}")
    return spans


def _video_frames(video: Path, start: int, stop: int, max_pixels: int | None) -> Iterator[np.ndarray]:
    from service.video import DEFAULT_MAX_PIXELS, iter_frame_range

    return (f.image for f in iter_frame_range(video, start, stop, max_pixels=max_pixels or DEFAULT_MAX_PIXELS))


def _render_one(labels: Labels, formats: Sequence[str], masks: dict, video: Path | None, start: int, stop: int,
                parts: Path, max_pixels: int | None) -> None:
    frames = _video_frames(video, start, stop, max_pixels) if "overlay" in formats else None
    render_range(labels, formats, masks, frames, start, stop, parts)


def write_outputs(result: VideoResult, out_dir: Path, formats: Sequence[str],
                  frames_for_overlay: Callable[[], Iterable[np.ndarray]] | None = None, *,
                  replace: bool = True, overlay_min_score: float = 0.0, video: Path | None = None,
                  processes: int = 1, range_frames: int | None = None,
                  max_pixels: int | None = None) -> dict[str, Path]:
    """Write formats (from FORMATS) into out_dir; returns format -> path.

    out_dir may be absent (its parent must exist), an empty directory, or (when replace) a
    previous output, which the new one replaces whole; anything else raises OutputExists before
    any work. The overlay's frames come from `video` (decoded again, a range at a time) or from
    frames_for_overlay, called once, which must yield the video's BGR frames; the overlay draws
    only tracks scoring at least overlay_min_score (the other formats keep every track).
    `processes` > 1 renders ranges of frames in that many processes at once (see
    render_in_ranges); the files are the same.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown output format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    if "overlay" in formats and frames_for_overlay is None and video is None:
        raise ValueError("the overlay format needs the video's frames (frames_for_overlay or video)")

    def fill(tmp: Path, formats: list[str]) -> None:
        parts = tmp / ".parts"
        labels = Labels.decide(result, overlay_min_score)
        spans = render_in_ranges(result, parts, formats, labels, frames_for_overlay, video=video,
                                 processes=processes, range_frames=range_frames, max_pixels=max_pixels)
        assemble(labels, formats, parts, spans, tmp)
        shutil.rmtree(parts)

    return publish_output(out_dir, formats, fill, replace=replace)


def publish_output(out_dir: Path, formats: Sequence[str], fill: Callable[[Path, list[str]], None], *,
                   replace: bool = True) -> dict[str, Path]:
    """The one way an output folder comes to be (`stemseg segment`, the workers, `stemseg submit`'s
    download): fill(tmp, formats) writes the formats' files into a hidden sibling directory, which
    gets the manifest and is renamed over out_dir under check_output_dir's rules."""
    formats = list(dict.fromkeys(formats))
    # Absolute, so `--out .` names the directory rather than an empty basename.
    out_dir = Path(os.path.abspath(out_dir))
    check_output_dir(out_dir, replace=replace)
    # A sibling, so the final renames stay on one filesystem (atomic); hidden, so a leftover
    # from a killed process is never mistaken for a result.
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()
    old = None
    try:
        fill(tmp, formats)
        (tmp / MANIFEST).write_text(json.dumps({"stemseg_output": 1, "formats": formats,
                                                "files": sorted(_files_under(tmp))}, indent=1) + "\n")
        # Checked again: the directory may have changed while the model ran.
        check_output_dir(out_dir, replace=replace)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            # A previous output: directories cannot be renamed over non-empty ones, so move it aside.
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)  # rename(2) replaces an empty directory atomically
        except BaseException:
            if old is not None:
                old.rename(out_dir)  # put the previous result back rather than leave none
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return {fmt: out_dir / NAMES[fmt] for fmt in formats}
