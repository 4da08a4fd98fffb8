"""`stemseg`: segment a video, benchmark the pipeline, evaluate, serve, fetch and make weights.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from service.config import DEFAULT_FORMATS, OUTPUT_FORMATS
from service.errors import UserError
from service.model.engine_spec import (  # no torch
    AUTOCAST_MODES,
    COMPILE_MODES,
    ENGINES,
    SETTINGS_SPELLING,
    EngineSpec,
    Spelling,
)
from service.model.presets import OFFICIAL_WEIGHTS, PRESETS  # plain dataclasses: no torch

EXIT_BAD_INPUT = 2
PRESET_NAMES = tuple(PRESETS)


class UsageError(UserError):
    """A mistake in what the user asked for, reported as one line."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stemseg-serve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line like every other mistake (argparse would print the whole usage first).
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value
    return parse


def _float_in(low: float, high: float, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, not {text}")
        return value
    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, not {text!r}")
    return text


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.lower())
    if not m or int(m[1]) < 32 or int(m[2]) < 32:
        raise argparse.ArgumentTypeError(f"expected HxW of at least 32x32, e.g. 128x160, not {text!r}")
    return int(m[1]), int(m[2])


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), not {value}")
    return value


def _check_video(path: Path | str) -> None:
    """A mistyped name is one line at once, before torch is imported (the decoder's own words)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    # A string, not a Path: Path would fold the "//" of a URL.
    p.add_argument("video", metavar="SOURCE",
                   help="video file (any container/codec FFmpeg reads), or a live source: rtsp://, rtsps://, "
                        "rtmp://, http(s):// (HLS .m3u8, MPEG-TS), udp://, srt:// URL or a /dev/videoN camera")
    _add_model_options(p)
    live = p.add_argument_group("live sources (a URL or a camera; defaults: the STEMSEG_LIVE_* settings)")
    live.add_argument("--duration", type=_float_in(0, 1e9, low_open=True), metavar="S",
                      help="stop after S seconds of frames (default: until the stream ends, Ctrl-C or SIGTERM)")
    live.add_argument("--jsonl", metavar="PATH",
                      help="one JSON line per frame as soon as its tracks are final ('-': stdout)")
    live.add_argument("--backlog", choices=["drop", "buffer"], default=None,
                      help="when the model falls behind: drop whole clips (counted) or stop reading until the "
                           "queue has room (env STEMSEG_LIVE_BACKLOG, default drop)")
    live.add_argument("--reconnect", type=_int_at_least(0), default=None, metavar="N",
                      help="reconnect attempts after the source drops or ends (env STEMSEG_LIVE_RECONNECT_ATTEMPTS, "
                           "default 3; 0: stop at the first end of stream)")
    live.add_argument("--open-timeout", type=_float_in(0, 3600, low_open=True), default=None, metavar="S",
                      help="seconds to open the source (env STEMSEG_LIVE_OPEN_TIMEOUT_S, default 10)")
    live.add_argument("--read-timeout", type=_float_in(0, 3600, low_open=True), default=None, metavar="S",
                      help="seconds without data before the source counts as dropped "
                           "(env STEMSEG_LIVE_READ_TIMEOUT_S, default 10)")
    live.add_argument("--rtsp-transport", choices=["tcp", "udp"], default=None,
                      help="RTSP over TCP or UDP (env STEMSEG_LIVE_RTSP_TRANSPORT, default tcp)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Which network runs, where and how: shared by every command that runs the model."""
    p.add_argument("--weights",
                   help="official .pth, our .safetensors, or a fetched name (" + ", ".join(OFFICIAL_WEIGHTS)
                        + "; `stemseg weights fetch`); env STEMSEG_WEIGHTS; default: the shipped lite model")
    p.add_argument("--preset", choices=PRESET_NAMES, help="default: the weights' own, or inferred from their tensors")
    p.add_argument("--device", type=_device, default=None, help="auto, cpu, cuda or cuda:N (env STEMSEG_DEVICE; "
                                                                "default auto: CUDA when usable)")
    p.add_argument("--min-dim", type=_int_at_least(32), help="inference short side; max side scales with it")
    p.add_argument("--engine", default="torch", choices=list(ENGINES),
                   help="torch (eager); onnxruntime (CPU, or CUDA with --device cuda); onnxruntime-trt "
                        "(ONNX Runtime's TensorRT provider, fp16); tensorrt (native fp16 engines, cached)")
    p.add_argument("--onnx", type=Path, help="directory with backbone.onnx and heads.onnx (stemseg export onnx)")
    # Torch engine speed options; off by default, so outputs stay the fp32 reference.
    p.add_argument("--autocast", choices=AUTOCAST_MODES, default="off",
                   help="torch engine: run the network under bf16/fp16 autocast (fp16 needs a GPU)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="torch engine: torch.compile mode (reduce-overhead replays CUDA graphs)")
    p.add_argument("--tf32", action="store_true",
                   help="torch engine on CUDA: TF32 matmuls and convolutions (default: strict fp32)")
    p.add_argument("--secondary", default="reference", choices=["reference", "corrected"],
                   help="secondary clustering pass: as the original (default) or fixed")
    p.add_argument("--min-iou", type=_float_in(0, 1), default=None,
                   help="link clips only at IoU >= this, in [0, 1] (default: always)")
    p.add_argument("--masks", choices=["reference", "soft"], default=None,
                   help="mask outlines: upsampled stride-4 labels as the original, or drawn by the upsampled "
                        "foreground score (default: the preset's; soft for lite)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stemseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a video into mask tracks")
    _add_run_options(seg)
    seg.add_argument("--out", type=Path,
                     help="output directory (default: <video name>_stemseg); must be absent, empty, or a previous "
                          "stemseg output (with --force)")
    seg.add_argument("--force", action="store_true", help="replace a previous stemseg output at --out")
    seg.add_argument("--format", nargs="+", default=None, choices=OUTPUT_FORMATS,
                     help=f"outputs to write (default: {' '.join(DEFAULT_FORMATS)}, or env STEMSEG_FORMATS)")
    seg.add_argument("--min-score", type=_float_in(0, 1), default=0.0,
                     help="overlay: draw only tracks scoring at least this (results.json keeps every track)")
    seg.add_argument("--no-progress", action="store_true")

    sbm = sub.add_parser("submit", help="segment a video on a running service (stemseg serve) into segment's folder")
    sbm.add_argument("video", help="video file to upload, or an http(s):// URL the service fetches itself "
                                   "(its host must be in the service's STEMSEG_SOURCE_HOSTS)")
    sbm.add_argument("--server", default=os.environ.get("STEMSEG_SERVER"),
                     help="the service's URL, e.g. http://127.0.0.1:8000 (env STEMSEG_SERVER)")
    sbm.add_argument("--api-key", default=os.environ.get("STEMSEG_API_KEY"),
                     help="one of the service's STEMSEG_API_KEYS (env STEMSEG_API_KEY)")
    sbm.add_argument("--out", type=Path, help="output directory, as segment's (default: <video name>_stemseg)")
    sbm.add_argument("--force", action="store_true", help="replace a previous stemseg output at --out")
    sbm.add_argument("--format", nargs="+", default=None, choices=OUTPUT_FORMATS,
                     help="outputs to make (default: the service's STEMSEG_FORMATS)")
    sbm.add_argument("--no-wait", action="store_true", help="print the job id once uploaded and exit")
    sbm.add_argument("--no-progress", action="store_true")

    bench = sub.add_parser("bench", help="seconds per stage and frames/s as JSON")
    _add_run_options(bench)
    bench.add_argument("--preload", action="store_true",
                       help="decode every frame first and time network + clustering alone")
    bench.add_argument("--json", type=Path, help="also write the JSON here")
    bench.add_argument("--serial", action="store_true",
                       help="no decode or post-processing threads, one clip per forward (the old pipeline)")
    bench.add_argument("--clips-per-forward", type=_int_at_least(1), default=1,
                       help="consecutive clips per heads forward")
    bench.add_argument("--format", nargs="+", default=None, choices=[*OUTPUT_FORMATS, "none"],
                       help="outputs whose writing is timed separately, as segment writes them (default: segment's "
                            "defaults; none: the network alone)")

    exp = sub.add_parser("export", help="export the network for other engines")
    exp_sub = exp.add_subparsers(dest="target", required=True)
    onnx_p = exp_sub.add_parser("onnx", help="frame backbone and clip heads as two ONNX graphs")
    onnx_p.add_argument("--weights", help="weights to export (as segment's --weights)")
    onnx_p.add_argument("--preset", choices=PRESET_NAMES)
    onnx_p.add_argument("--out", type=Path, default=Path("onnx"), help="output directory (default ./onnx)")
    onnx_p.add_argument("--opset", type=_int_at_least(17), default=17, help="ONNX opset, 17 or later (default 17)")
    onnx_p.add_argument("--fp16", action="store_true", help="fp16 weights and activations, fp32 inputs/outputs")

    trt_p = exp_sub.add_parser("tensorrt", help="native TensorRT engines from the ONNX graphs (cached per GPU)")
    trt_p.add_argument("--onnx", type=Path, default=Path("onnx"), help="directory of `stemseg export onnx`")
    trt_p.add_argument("--buckets", nargs="+", metavar="HxW",
                       help="optimisation profiles' preferred padded sizes "
                            "(default: 16:9 both ways at the preset's size)")
    trt_p.add_argument("--fp32", action="store_true", help="build fp32 engines (default fp16)")
    trt_p.add_argument("--cache", type=Path, help="engine cache directory (default ONNX_DIR/trt-engines)")

    ev = sub.add_parser("eval", help="YouTube-VIS AP, DAVIS J&F and MOTS HOTA/sMOTSA against ground truth")
    ev.add_argument("--gt", type=Path, nargs="+", required=True,
                    help="YouTube-VIS annotation JSON, or a `stemseg synth` folder (annotations.json + videos); "
                         "several are pooled into one set")
    ev.add_argument("--pred", type=Path, help="YouTube-VIS results JSON (default: run the model over the videos)")
    ev.add_argument("--metric", nargs="+", default=["ytvis", "davis", "mots"], choices=["ytvis", "davis", "mots"])
    ev.add_argument("--json", type=Path, help="also write the numbers here")
    ev.add_argument("--bootstrap", type=_int_at_least(0), default=0, metavar="N",
                    help="also report the YouTube-VIS metrics' spread over N resamplings of the videos")
    ev.add_argument("--save-pred", type=Path, help="write the predictions made here as YouTube-VIS results JSON")
    _add_model_options(ev)
    ev.add_argument("--no-progress", action="store_true")

    srv = sub.add_parser("serve", help="run the HTTP API (uvicorn); settings from STEMSEG_* (service/config.py)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=_port, default=8000)
    srv.add_argument("--with-worker", action="store_true", help="also run one worker in this process")

    wrk = sub.add_parser("worker", help="take clip tasks from the Redis queue until SIGTERM")
    wrk.add_argument("--check", action="store_true", help="exit 0 if Redis answers (container healthcheck)")

    wts = sub.add_parser("weights", help="the authors' released checkpoints: list them, fetch one")
    wts_sub = wts.add_subparsers(dest="action", required=True)
    wts_sub.add_parser("list", help="official checkpoints, their URLs and whether they are fetched")
    fetch_p = wts_sub.add_parser("fetch", help="download an official checkpoint (resumes; verified before kept)")
    fetch_p.add_argument("name", choices=OFFICIAL_WEIGHTS)
    fetch_p.add_argument("--to", type=Path,
                         help="directory (default: STEMSEG_WEIGHTS_DIR, ~/.cache/stemseg/weights, where "
                              "`--weights NAME` looks)")
    fetch_p.add_argument("--url", help="download from this mirror instead of the authors' server")
    fetch_p.add_argument("--no-progress", action="store_true")

    synth = sub.add_parser("synth", help="render a synthetic video dataset (MP4 + YouTube-VIS annotations)")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--videos", type=_int_at_least(1), required=True)
    synth.add_argument("--seed", type=_int_at_least(0), required=True)
    synth.add_argument("--frames", type=_int_at_least(1), default=24)
    synth.add_argument("--size", type=_size, default=(128, 160), help="HxW (default 128x160)")

    tr = sub.add_parser("train", help="train a preset on a synthetic dataset")
    tr.add_argument("--data", type=Path, nargs="+", required=True, help="one or more `stemseg synth` folders")
    tr.add_argument("--preset", default="lite", choices=PRESET_NAMES)
    tr.add_argument("--out", type=Path, required=True,
                    help="weights file (.safetensors); resumes if its checkpoint exists")
    tr.add_argument("--steps", type=_int_at_least(1), default=4000)
    tr.add_argument("--batch", type=_int_at_least(1), default=4)
    tr.add_argument("--lr", type=_float_in(0, 1, low_open=True), default=2e-3)
    tr.add_argument("--seed", type=_int_at_least(0), default=0)
    tr.add_argument("--device", type=_device, default="auto")
    tr.add_argument("--init", type=Path, help="fine-tune these weights (.safetensors of the same preset) "
                                              "instead of starting from scratch")

    syn = sub.add_parser("synth-weights", help="official-format .pth of synthetic weights (reference recipe)")
    syn.add_argument("--preset", required=True, choices=PRESET_NAMES)
    syn.add_argument("--out", type=Path, required=True)
    return parser


# How the engine's options are called on this command line, for EngineSpec's messages.
FLAGS = {"kind": "--engine", "weights": "--weights", "preset": "--preset", "device": "--device", "onnx_dir": "--onnx",
         "autocast": "--autocast", "compile": "--compile", "tf32": "--tf32", "min_dim": "--min-dim"}


def _engine_spec(args: argparse.Namespace, settings) -> EngineSpec:
    """The engine `_add_model_options` asked for; weights, preset and device default to the settings',
    and a message about one of those names the setting where the value came from there."""
    unset = {f for f in ("weights", "preset", "device") if getattr(args, f) is None}
    spelling = Spelling({**FLAGS, **{f: SETTINGS_SPELLING(f) for f in unset}}, joiner=" ")
    return EngineSpec(kind=args.engine, weights=settings.weights if "weights" in unset else args.weights,
                      weights_dir=settings.weights_dir, preset=args.preset or settings.preset,
                      device=args.device or settings.device, onnx_dir=args.onnx, autocast=args.autocast,
                      compile=args.compile, tf32=args.tf32, min_dim=args.min_dim, spelling=spelling)


def _load(args: argparse.Namespace):
    """The engine the options ask for and the settings."""
    from service.config import get_settings
    from service.model.engines import build_engine

    settings = get_settings()
    spec = _engine_spec(args, settings)  # an EngineError (one line) before torch is even imported
    return build_engine(spec), settings


def _print_json(report: dict, path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")


def _options(args: argparse.Namespace):
    """The pipeline options `_add_model_options` parsed."""
    from service.pipeline.runner import SegmenterOptions

    return SegmenterOptions(secondary=args.secondary, min_iou=args.min_iou, mask_upsampling=args.masks)


def _pipeline(args: argparse.Namespace):
    """How `bench` schedules the work (none of it changes the outputs)."""
    from service.pipeline.runner import PipelineOptions

    if getattr(args, "serial", False):
        return PipelineOptions.serial()
    return PipelineOptions(clips_per_forward=getattr(args, "clips_per_forward", 1))


def _is_live(args: argparse.Namespace) -> bool:
    from service.video.live import is_live_source

    live = is_live_source(args.video)
    if not live:
        given = [flag for flag, value in (("--duration", args.duration), ("--jsonl", args.jsonl),
                                          ("--backlog", args.backlog), ("--reconnect", args.reconnect),
                                          ("--open-timeout", args.open_timeout), ("--read-timeout", args.read_timeout),
                                          ("--rtsp-transport", args.rtsp_transport)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} is for live sources (a URL or /dev/videoN), not the file {args.video}")
        args.video = Path(args.video)
    return live


def cmd_segment(args: argparse.Namespace) -> int:
    from service.config import get_settings

    formats = args.format or get_settings().format_list
    if _is_live(args):
        from service.cli_live import segment_live

        return segment_live(args, formats)
    _check_video(args.video)
    _check_weights(args)
    from service.outputs import check_output_dir, write_outputs

    out_dir = Path(os.path.abspath(args.out or args.video.with_name(f"{args.video.stem}_stemseg")))
    check_output_dir(out_dir, replace=args.force)  # before minutes of work, not after
    # Only now torch: every mistake above is reported in a fraction of a second.
    from tqdm import tqdm

    from service.pipeline.session import open_video

    engine, settings = _load(args)
    _warn_synthetic(engine.cfg.name)
    start = time.perf_counter()
    video = open_video(args.video, engine, options=_options(args), max_pixels=settings.max_frame_pixels)
    with tqdm(total=video.info.num_frames, unit="frame", disable=args.no_progress, file=sys.stderr) as bar:
        for _ in video.propagate():
            bar.update(1)
    result = video.result()
    # The outputs' per-frame work (decoding again, drawing, encoding) in ranges, on every core:
    # what they show of each track is known only now (service.outputs.render).
    write_outputs(result, out_dir, formats, video=args.video, replace=args.force, overlay_min_score=args.min_score,
                  processes=_output_processes(settings), max_pixels=settings.max_frame_pixels)
    seconds = time.perf_counter() - start
    n = video.info.num_frames
    print(f"{n} frames, {_track_count(result)}, {seconds:.1f} s, {n / seconds:.2f} frames/s -> {out_dir}")
    return 0


def _check_weights(args: argparse.Namespace) -> None:
    """Weights that name no file are one line at once, not after seconds of importing torch."""
    from service.config import get_settings, resolve_weights

    if args.engine == "torch":
        settings = get_settings()
        resolve_weights(args.weights if args.weights is not None else settings.weights, settings.weights_dir)


def _track_count(result) -> str:
    """"N tracks", saying so when the preset's cap cut some."""
    kept, found = len(result.kept()), len(result.tracks)
    if kept == found:
        return f"{kept} tracks"
    return (f"{kept} tracks (the {found - kept} shortest-lived of {found} cut by the preset's "
            f"max_tracks={result.max_tracks})")


def _warn_synthetic(preset: str) -> None:
    from service.model.presets import model_warning

    if warning := model_warning(preset):
        print(f"stemseg: warning: {warning}", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    if not args.server:
        raise UsageError("submit needs the service's URL: --server URL (or env STEMSEG_SERVER)")
    if not re.match(r"https?://", args.server):
        raise UsageError(f"--server must be an http:// or https:// URL, not {args.server!r}")
    by_reference = re.match(r"https?://", args.video) is not None
    if by_reference:
        stem = Path(urlsplit(args.video).path).stem or "video"
        default_out = Path(f"{stem}_stemseg")
    else:
        args.video = Path(args.video)
        _check_video(args.video)
        default_out = args.video.with_name(f"{args.video.stem}_stemseg")
    try:
        import httpx

        from service.client import Client, JobFailed, ServiceError
    except ImportError as e:
        raise UsageError(f"submit needs the server extra ({e.name} is missing): "
                         "pip install 'stemseg-serve[server]'") from None
    from service.outputs.write import OutputExists, check_output_dir

    out_dir = Path(os.path.abspath(args.out or default_out))
    start = time.perf_counter()
    try:
        if not args.no_wait:
            check_output_dir(out_dir, replace=args.force)  # before the upload, not after the job
        with Client(args.server, api_key=args.api_key) as client:
            if by_reference:
                job = client.submit_url(args.video, formats=args.format)
            else:
                job = client.submit(args.video, formats=args.format, progress=not args.no_progress)
            if warning := job.data.get("warning"):
                print(f"stemseg: warning: {warning}", file=sys.stderr)
            if args.no_wait:
                print(job.id)
                return 0
            job.wait(progress=not args.no_progress)
            job.download(out_dir, replace=args.force)
    except OutputExists as e:
        raise UsageError(str(e)) from None
    except JobFailed as e:
        print(f"stemseg: error: {e}", file=sys.stderr)
        return 1
    except ServiceError as e:  # the service's problem+json, in its words
        if e.status < 500:
            raise UsageError(f"{args.server}: {e}") from None
        print(f"stemseg: error: {args.server}: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        raise UsageError(f"cannot reach the service at {args.server} ({type(e).__name__}: {e})") from None
    n, tracks = job.data["progress"]["frames_total"], job.data.get("tracks")
    print(f"{n} frames, {tracks} tracks, {time.perf_counter() - start:.1f} s (job {job.id}) -> {out_dir}")
    return 0


def _output_processes(settings) -> int:
    import os

    return settings.output_processes or len(os.sched_getaffinity(0))


def cmd_bench(args: argparse.Namespace) -> int:
    if _is_live(args):
        from service.cli_live import bench_live

        return bench_live(args)
    _check_video(args.video)
    _check_weights(args)
    import torch

    from service.pipeline.session import open_video
    from service.pipeline.timing import StageTimer

    engine, settings = _load(args)
    timer = StageTimer(engine.device, sync=True)
    video = open_video(args.video, engine, options=_options(args), timer=timer, max_pixels=settings.max_frame_pixels,
                       pipeline=_pipeline(args))
    info, cfg = video.info, engine.cfg
    start = time.perf_counter()
    n = sum(1 for _ in video.propagate(preload=args.preload))
    total = time.perf_counter() - start
    outputs = _bench_outputs(args, video, settings)
    stages = {k: round(v, 4) for k, v in timer.seconds.items()}
    result = video.result()
    network_clustering = sum(timer.seconds.get(s, 0.0) for s in ("preprocess", "backbone", "heads", "clustering",
                                                                  "stitching"))
    report = {
        "video": str(args.video), "frames": n, "width": info.width, "height": info.height,
        "preset": cfg.name, "min_dim": cfg.min_dim, "max_dim": cfg.max_dim, "device": str(engine.device),
        "engine": args.engine, "torch_threads": torch.get_num_threads(), "preload": args.preload,
        "autocast": args.autocast, "compile": args.compile, "tf32": args.tf32,
        "pipeline": "serial" if args.serial else f"threaded, {args.clips_per_forward} clip(s) per forward",
        "seconds": stages, "total_seconds": round(total, 4),
        "frames_per_second": round(n / total, 4),
        "network_clustering_frames_per_second": round(n / network_clustering, 4) if network_clustering else None,
        # As segment reports them: the tracks kept under the preset's cap, and how many were found.
        "tracks": len(result.kept()), "tracks_found": len(result.tracks), "max_tracks": result.max_tracks,
        "outputs": outputs,
        "end_to_end_seconds": round(total + (outputs["seconds"] if outputs else 0.0), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    _print_json(report, args.json)
    return 0


def _bench_outputs(args: argparse.Namespace, video, settings) -> dict | None:
    """The output stage alone, as `segment` runs it after the last clip (into a directory deleted after)."""
    import shutil
    import tempfile

    from service.outputs import write_outputs

    formats = args.format or settings.format_list
    if "none" in formats:
        return None
    processes = _output_processes(settings)
    with tempfile.TemporaryDirectory(prefix="stemseg-bench-") as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        write_outputs(video.result(), out, formats, video=args.video, processes=processes,
                      max_pixels=settings.max_frame_pixels)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        shutil.rmtree(out)
    return {"formats": list(formats), "processes": processes, "seconds": round(seconds, 4),
            "frames_per_second": round(video.info.num_frames / seconds, 4) if seconds else None,
            "bytes": size}


def cmd_export(args: argparse.Namespace) -> int:
    from service.config import get_settings, resolve_weights
    from service.model.checkpoint import load_model

    if args.target == "tensorrt":
        return _export_tensorrt(args)
    settings = get_settings()
    weights = resolve_weights(args.weights if args.weights is not None else settings.weights, settings.weights_dir)
    try:
        from model_export.onnx_export import export_onnx
    except ImportError as e:
        raise UsageError(f"export needs the onnx package ({e.name} missing): "
                         "pip install 'stemseg-serve[export]'") from None
    graphs = export_onnx(load_model(weights, args.preset), args.out, opset=args.opset, fp16=args.fp16)
    print(f"wrote {graphs.backbone} and {graphs.heads}")
    return 0


def _export_tensorrt(args: argparse.Namespace) -> int:
    import torch

    from service.model.graph import graph_config

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise UsageError("export tensorrt needs the tensorrt package: pip install 'stemseg-serve[gpu]'") from None
    if not torch.cuda.is_available():
        raise UsageError("export tensorrt needs a CUDA GPU: engines are built for the GPU they run on")
    from service.model.tensorrt_build import Bucket, build_or_load

    cfg = graph_config(args.onnx)  # an EngineError naming the missing graphs
    try:
        buckets = [Bucket.parse(b) for b in args.buckets] if args.buckets else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    start = time.perf_counter()
    paths = build_or_load(args.onnx, cfg, buckets=buckets, fp16=not args.fp32, cache_dir=args.cache)
    print(f"engines {paths['backbone']} and {paths['heads']} ready in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.evaluation.run import evaluate, load_ground_truths, predict

    try:
        gt, root = load_ground_truths(args.gt)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    except (KeyError, TypeError, AttributeError) as e:  # a video, category or annotation missing a field
        raise UsageError(f"malformed ground truth ({type(e).__name__}: {e})") from None
    if args.pred is not None:
        try:
            predictions = json.loads(args.pred.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{args.pred}: cannot read YouTube-VIS results ({e})") from None
        if not isinstance(predictions, list):
            raise UsageError(f"{args.pred}: YouTube-VIS results are a JSON list of entries")
    else:
        engine, _ = _load(args)
        frames = sum(v["length"] for v in gt["videos"])
        with tqdm(total=frames, unit="frame", disable=args.no_progress, file=sys.stderr) as bar:
            predictions = predict(gt, root, engine, progress=bar.update, options=_options(args))
        if args.save_pred:
            args.save_pred.write_text(json.dumps(predictions))
    try:
        report = evaluate(gt, predictions, args.metric, bootstrap=args.bootstrap)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # e.g. a ground truth with no categories
        raise UsageError(f"malformed results entry or annotation ({type(e).__name__}: {e})") from None
    _print_json(report, args.json)
    return 0


def _server_modules():
    try:
        import redis
        import uvicorn

        from service.api.main import create_app
    except ImportError as e:
        raise UsageError(f"this command needs the server extra ({e.name} is missing): "
                         "pip install 'stemseg-serve[server]'") from None
    return redis, uvicorn, create_app


def _ping_redis(redis, url: str) -> None:
    try:
        from service.jobs.redis_clients import sync_client

        sync_client(url, socket_timeout=3, socket_connect_timeout=3).ping()
    except (redis.RedisError, redis.exceptions.RedisClusterException, ValueError) as e:
        from service.jobs.redis_url import redacted_url

        raise UsageError(f"Redis at {redacted_url(url)} does not answer ({e}): start Redis or set "
                         "STEMSEG_REDIS_URL") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from service.config import get_settings

    redis, _, create_app = _server_modules()
    settings = get_settings()
    _ping_redis(redis, settings.redis_url)
    # Every configuration mistake surfaces here, as one line, before the server starts listening;
    # the model's preset is read without torch (service.jobs.model_info).
    app = create_app(settings)
    worker = None
    if args.with_worker:  # only then does this process load torch
        from service.jobs.worker import Worker, load_service_engine

        worker = Worker(settings, engine=load_service_engine(settings))
        threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True).start()
    try:
        from service.api.server import serve

        serve(app, settings, args.host, args.port)
    finally:
        if worker is not None:
            worker.stopping.set()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from service.config import get_settings

    redis, _, _ = _server_modules()
    settings = get_settings()
    _ping_redis(redis, settings.redis_url)
    if args.check:  # the containers' health probe: settings and Redis, without loading torch
        return 0
    from service.jobs.worker import Worker, load_service_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Worker(settings, engine=load_service_engine(settings)).run()
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from service.config import SHIPPED_WEIGHTS, get_settings
    from service.model.hub import fetch, target_path
    from service.model.presets import OFFICIAL

    settings = get_settings()
    if args.action == "list":
        shipped = "present" if SHIPPED_WEIGHTS.is_file() else "missing"
        print(f"lite         shipped with stemseg ({shipped}): {SHIPPED_WEIGHTS}")
        for name, ck in OFFICIAL.items():
            path = target_path(name, settings.weights_dir)
            where = f"fetched: {path}" if path.is_file() else f"not fetched: stemseg weights fetch {name}"
            print(f"{name:<12} {ck.url} ({where}; trained on {ck.trained_on})")
        return 0
    path = fetch(args.name, args.to or settings.weights_dir, url=args.url, progress=not args.no_progress)
    hint = f"--weights {args.name}" if args.to is None else f"--weights {path}"
    print(f"{path} verified ({path.stat().st_size / 2**20:.1f} MiB); use it with {hint}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from service.training.synth import write_dataset

    write_dataset(args.out, args.videos, args.seed, args.frames, args.size)
    print(f"wrote {args.videos} videos and annotations.json to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.config import resolve_device
    from service.model.checkpoint import load_model
    from service.model.presets import get_preset
    from service.training.train import train

    for folder in args.data:
        if not (folder / "annotations.json").is_file():
            raise UsageError(f"{folder} has no annotations.json: make a dataset with `stemseg synth`")
    try:
        cfg, device = get_preset(args.preset), resolve_device(args.device)
        init = load_model(args.init, preset=cfg) if args.init else None
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    with tqdm(total=args.steps, unit="step", file=sys.stderr) as bar:
        def progress(step: int, row: dict) -> None:
            bar.n = step
            bar.set_postfix(loss=row["total"])
            bar.refresh()

        train(args.data, cfg, args.out, steps=args.steps, batch=args.batch, lr=args.lr, device=device,
              seed=args.seed, init=init, progress=progress)
    print(f"wrote {args.out}")
    return 0


def cmd_synth_weights(args: argparse.Namespace) -> int:
    from service.model.presets import get_preset
    from service.model.synthetic import official_layout, save_official_checkpoint, synthetic_state_dict

    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    save_official_checkpoint(synthetic_state_dict(official_layout(cfg)), str(args.out))
    print(f"wrote {args.out} (synthetic {cfg.name} weights in the official format)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    handlers = {"segment": cmd_segment, "bench": cmd_bench, "export": cmd_export, "eval": cmd_eval,
                "serve": cmd_serve, "worker": cmd_worker, "weights": cmd_weights, "synth": cmd_synth,
                "train": cmd_train, "synth-weights": cmd_synth_weights, "submit": cmd_submit}
    try:
        return handlers[args.command](args)
    except UserError as e:
        # One line: a long list of checkpoint mismatches is summarised by its first entry.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        print(f"stemseg: error: {' '.join(lines[:2])}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValidationError as e:  # a bad STEMSEG_* setting
        first = e.errors()[0]
        name = "STEMSEG_" + str(first["loc"][0]).upper() if first["loc"] else "a STEMSEG_ setting"
        print(f"stemseg: error: {name}: {first['msg']}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # e.g. --json into a directory that does not exist
        print(f"stemseg: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("stemseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
