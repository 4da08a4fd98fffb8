"""`stemseg segment` and `stemseg bench` on a live source (a URL or a camera).

The source is read at its own pace (service.video.live) and segmented as it arrives
(service.pipeline.live); `--jsonl` prints each frame's tracks as soon as they are final.
`--duration`, Ctrl-C and SIGTERM stop reading: the frames already read are segmented and every
output is written for them, under the same --out and manifest rules as a file's. A second
Ctrl-C interrupts at once (no output).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from service.errors import UserError
from service.video.live import LiveOptions, LiveReader, LiveSourceError, check_source, redact


def _options(args: argparse.Namespace, settings) -> LiveOptions:
    return LiveOptions.from_settings(settings, rtsp_transport=args.rtsp_transport, open_timeout_s=args.open_timeout,
                                     read_timeout_s=args.read_timeout, reconnect_attempts=args.reconnect,
                                     backlog=args.backlog)


def default_out(source: str) -> Path:
    """`<last part of the URL>_stemseg` in the current directory (a camera: video0_stemseg)."""
    rest = source.split("://", 1)[-1].split("?", 1)[0].split("@")[-1].rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", rest.rsplit("/", 1)[-1] if "/" in rest else rest).strip("._") or "live"
    return Path(os.path.abspath(f"{Path(name).stem or name}_stemseg"))


@contextmanager
def _stop_on_signals(reader: LiveReader) -> Iterator[None]:
    """SIGINT and SIGTERM stop reading (the outputs are still written); a second SIGINT interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        if reader.stopping.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        reader.stop(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextmanager
def _jsonl(path: str | None) -> Iterator[TextIO | None]:
    if path is None:
        yield None
    elif path == "-":
        yield sys.stdout
    else:
        with open(path, "w") as f:
            yield f


def _run(args: argparse.Namespace, record_dir: Path | None, on_frame=None):
    """Load the model, open the source, segment it until it ends or is stopped."""
    from service.cli import _load, _warn_synthetic
    from service.cli import _options as segmenter_options
    from service.pipeline.live import LiveSession

    check_source(args.video)  # an unknown scheme is one line before torch is imported
    # The model loads before the source is opened: a stream opened first would pile up while it
    # loads, and the drop policy would then throw away its first seconds.
    engine, settings = _load(args)
    _warn_synthetic(engine.cfg.name)
    reader = LiveReader(args.video, _options(args, settings), clip_len=engine.cfg.clip_len,
                        duration_s=args.duration, record_dir=record_dir)
    session = LiveSession(reader, engine, options=segmenter_options(args))
    start = time.perf_counter()
    with _stop_on_signals(reader):
        reader.start()
        try:
            for frame in session.propagate():
                if on_frame is not None:
                    on_frame(frame, engine.cfg)
        finally:
            reader.close()
    return engine, settings, reader, session, time.perf_counter() - start


def _summary_line(session, seconds: float) -> str:
    s = session.summary()
    lat = s["latency_s"]
    parts = [f"latency p50 {lat['p50']} s, p95 {lat['p95']} s" if lat["p50"] is not None else "no frames",
             f"{s['frames_dropped']} frames dropped ({s['clips_dropped']} clips)", f"{s['reconnects']} reconnects",
             f"ended by {s['ended_by']}"]
    return f"{s['frames']} frames in {seconds:.1f} s; " + "; ".join(parts)


def segment_live(args: argparse.Namespace, formats) -> int:
    from service.cli import UsageError, _track_count
    from service.outputs import check_output_dir, write_outputs
    from service.video.live import recorded_frames

    out_dir = Path(os.path.abspath(args.out)) if args.out else default_out(args.video)
    check_output_dir(out_dir, replace=args.force)
    record_dir = None
    if "overlay" in formats:  # the overlay is drawn at the end, from the source's packets copied meanwhile
        record_dir = out_dir.parent / f".{out_dir.name}.live-{uuid.uuid4().hex[:8]}"
        record_dir.mkdir()
    names = None
    try:
        with _jsonl(args.jsonl) as lines:
            def on_frame(frame, cfg) -> None:
                nonlocal names
                names = names or dict(cfg.classes)
                if lines is not None:
                    lines.write(json.dumps(frame.to_json(names)) + "\n")
                    lines.flush()

            try:
                _, settings, reader, session, seconds = _run(args, record_dir, on_frame)
            except BrokenPipeError:  # the reading end of the pipe has gone: stop as if interrupted
                raise UsageError("the --jsonl reader closed the pipe") from None
        result = session.result()
        if result.num_frames == 0:
            raise LiveSourceError(f"{redact(args.video)}: no frames arrived ({reader.stats.ended_by})")
        write_outputs(result, out_dir, formats,
                      frames_for_overlay=lambda: recorded_frames(reader.recordings, settings.max_frame_pixels),
                      replace=args.force, overlay_min_score=args.min_score, max_pixels=settings.max_frame_pixels)
    finally:
        if record_dir is not None:
            shutil.rmtree(record_dir, ignore_errors=True)
    # With the lines on stdout, the closing line goes to stderr, so a pipe gets JSON only.
    print(f"{_summary_line(session, seconds)}; {_track_count(result)} -> {out_dir}",
          file=sys.stderr if args.jsonl == "-" else sys.stdout)
    return 0


def bench_live(args: argparse.Namespace) -> int:
    """The JSON report of a live run: frames/s, drops, reconnects, latency, seconds per stage."""
    import torch

    from service.cli import _print_json

    if args.preload:
        raise UserError("--preload needs a file: a live source arrives at its own pace")
    with _jsonl(args.jsonl) as lines:
        def on_frame(frame, cfg) -> None:
            if lines is not None:
                lines.write(json.dumps(frame.to_json(dict(cfg.classes))) + "\n")
                lines.flush()

        engine, _, reader, session, seconds = _run(args, None, on_frame)
    report = session.summary()
    result = session.result()
    n = report["frames"]
    report.update({
        "preset": engine.cfg.name, "clip_len": engine.cfg.clip_len, "overlap": engine.cfg.overlap,
        "source_fps": reader.fps, "width": result.width, "height": result.height, "device": str(engine.device),
        "engine": args.engine, "torch_threads": torch.get_num_threads(), "total_seconds": round(seconds, 4),
        "frames_per_second": round(n / seconds, 4) if seconds else None,
        "seconds": {k: round(v, 4) for k, v in session.timer.seconds.items()},
        "tracks": len(result.kept()), "tracks_found": len(result.tracks),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    work = sum(v for k, v in session.timer.seconds.items() if k != "decode_wait")
    report["clip_processing_s"] = round(work / session.clips, 4) if session.clips else None
    if reader.fps:
        # Issue 21's target for p95: a clip's duration plus twice a clip's processing.
        report["clip_seconds"] = round(engine.cfg.clip_len / reader.fps, 4)
        if session.clips:
            report["latency_target_s"] = round(report["clip_seconds"] + 2 * report["clip_processing_s"], 4)
    _print_json(report, args.json)
    return 0


__all__ = ["bench_live", "default_out", "segment_live"]
