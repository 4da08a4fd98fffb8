"""`stemseg`: segment a video, benchmark the pipeline, make synthetic weights.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from service.config import ENGINES

EXIT_BAD_INPUT = 2
FORMATS = ("ytvis", "davis", "mots", "overlay")


class UsageError(Exception):
    """A mistake in what the user asked for, reported as one line."""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", type=Path, help="video file (any container/codec FFmpeg reads)")
    _add_model_options(p)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Which network runs, where and how: shared by every command that runs the model."""
    p.add_argument("--weights", type=Path,
                   help="official .pth or our .safetensors (env STEMSEG_WEIGHTS; default: the shipped lite model)")
    p.add_argument("--preset", help="davis, youtube_vis or kitti_mots (default: inferred from the weights)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda (default auto)")
    p.add_argument("--min-dim", type=int, help="inference short side; max side scales with it")
    p.add_argument("--engine", default="torch", choices=list(ENGINES),
                   help="torch (eager); onnxruntime (CPU, or CUDA with --device cuda); onnxruntime-trt "
                        "(ONNX Runtime's TensorRT provider, fp16); tensorrt (native fp16 engines, cached)")
    p.add_argument("--onnx", type=Path, help="directory with backbone.onnx and heads.onnx (stemseg export onnx)")
    p.add_argument("--secondary", default="reference", choices=["reference", "corrected"],
                   help="secondary clustering pass: as the original (default) or fixed")
    p.add_argument("--min-iou", type=float, default=None, help="link clips only at IoU >= this (default: always)")
    p.add_argument("--masks", choices=["reference", "soft"], default=None,
                   help="mask outlines: upsampled stride-4 labels as the original, or drawn by the upsampled "
                        "foreground score (default: the preset's; soft for lite)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a video into mask tracks")
    _add_run_options(seg)
    seg.add_argument("--out", type=Path, help="output directory (default: <video name>_stemseg)")
    seg.add_argument("--format", nargs="+", default=["ytvis"], choices=FORMATS, help="outputs to write")
    seg.add_argument("--no-progress", action="store_true")

    bench = sub.add_parser("bench", help="seconds per stage and frames/s as JSON")
    _add_run_options(bench)
    bench.add_argument("--preload", action="store_true",
                       help="decode every frame first and time network + clustering alone")
    bench.add_argument("--json", type=Path, help="also write the JSON here")

    exp = sub.add_parser("export", help="export the network for other engines")
    exp_sub = exp.add_subparsers(dest="target", required=True)
    onnx_p = exp_sub.add_parser("onnx", help="frame backbone and clip heads as two ONNX graphs")
    onnx_p.add_argument("--weights", type=Path, help="weights to export (env STEMSEG_WEIGHTS)")
    onnx_p.add_argument("--preset")
    onnx_p.add_argument("--out", type=Path, default=Path("onnx"), help="output directory (default ./onnx)")
    onnx_p.add_argument("--opset", type=int, default=17)
    onnx_p.add_argument("--fp16", action="store_true", help="fp16 weights and activations, fp32 inputs/outputs")

    ev = sub.add_parser("eval", help="YouTube-VIS AP, DAVIS J&F and MOTS HOTA/sMOTSA against ground truth")
    ev.add_argument("--gt", type=Path, required=True,
                    help="YouTube-VIS annotation JSON, or a `stemseg synth` folder (annotations.json + videos)")
    ev.add_argument("--pred", type=Path, help="YouTube-VIS results JSON (default: run the model over the videos)")
    ev.add_argument("--metric", nargs="+", default=["ytvis", "davis", "mots"], choices=["ytvis", "davis", "mots"])
    ev.add_argument("--json", type=Path, help="also write the numbers here")
    ev.add_argument("--save-pred", type=Path, help="write the predictions made here as YouTube-VIS results JSON")
    _add_model_options(ev)
    ev.add_argument("--no-progress", action="store_true")

    trt_p = exp_sub.add_parser("tensorrt", help="native TensorRT engines from the ONNX graphs (cached per GPU)")
    trt_p.add_argument("--onnx", type=Path, default=Path("onnx"), help="directory of `stemseg export onnx`")
    trt_p.add_argument("--buckets", nargs="+", metavar="HxW",
                       help="optimisation profiles' preferred padded sizes (default: 16:9 both ways at the preset's size)")
    trt_p.add_argument("--fp32", action="store_true", help="build fp32 engines (default fp16)")
    trt_p.add_argument("--cache", type=Path, help="engine cache directory (default ONNX_DIR/trt-engines)")

    srv = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--with-worker", action="store_true", help="also run one worker in this process")

    wrk = sub.add_parser("worker", help="take clip tasks from the Redis queue until SIGTERM")
    wrk.add_argument("--check", action="store_true", help="exit 0 if Redis answers (container healthcheck)")

    synth = sub.add_parser("synth", help="render a synthetic video dataset (MP4 + YouTube-VIS annotations)")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--videos", type=int, required=True)
    synth.add_argument("--seed", type=int, required=True)
    synth.add_argument("--frames", type=int, default=24)
    synth.add_argument("--size", default="128x160", help="HxW")

    tr = sub.add_parser("train", help="train a preset on a synthetic dataset")
    tr.add_argument("--data", type=Path, nargs="+", required=True, help="one or more `stemseg synth` folders")
    tr.add_argument("--preset", default="lite")
    tr.add_argument("--out", type=Path, required=True, help="weights file (.safetensors); resumes if its checkpoint exists")
    tr.add_argument("--steps", type=int, default=4000)
    tr.add_argument("--batch", type=int, default=4)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--init", type=Path, help="fine-tune these weights (.safetensors of the same preset) "
                                              "instead of starting from scratch")

    syn = sub.add_parser("synth-weights", help="official-format .pth of synthetic weights (reference recipe)")
    syn.add_argument("--preset", required=True)
    syn.add_argument("--out", type=Path, required=True)
    return parser


def _load(args: argparse.Namespace):
    """The engine the options ask for, its device and the settings."""
    from service.config import get_settings, resolve_device
    from service.model.checkpoint import load_model
    from service.model.engines import load_engine

    settings = get_settings()
    weights = args.weights or settings.weights_path
    try:
        device = resolve_device(args.device or settings.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.engine != "torch":
        engine = load_engine(args.engine, onnx_dir=args.onnx, device=device)
        if args.min_dim:
            engine.cfg = engine.cfg.with_min_dim(args.min_dim)
        return engine, engine.device, settings
    if weights is None:
        raise UsageError("no weights: pass --weights PATH (an official davis/youtube_vis/kitti_mots .pth "
                         "or a .safetensors file) or set STEMSEG_WEIGHTS (the shipped weights/lite.safetensors "
                         "is missing from this installation)")
    model = load_model(weights, args.preset or settings.preset, device=device)
    if args.min_dim:
        if args.min_dim < 32:
            raise UsageError(f"--min-dim must be at least 32, got {args.min_dim}")
        model.cfg = model.cfg.with_min_dim(args.min_dim)
    return load_engine("torch", model=model), device, settings


def _print_json(report: dict, path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")


def _options(args: argparse.Namespace):
    """The pipeline options `_add_model_options` parsed."""
    from service.pipeline.runner import SegmenterOptions

    return SegmenterOptions(secondary=args.secondary, min_iou=args.min_iou, mask_upsampling=args.masks)


def _segmenter(model, device, args, timer):
    from service.pipeline.runner import Segmenter

    return Segmenter(model, device=device, timer=timer, options=_options(args))


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.outputs import write_outputs
    from service.pipeline.clips import clip_plan
    from service.pipeline.timing import StageTimer
    from service.video import iter_clip_windows, iter_frames, probe

    model, device, settings = _load(args)
    info = probe(args.video, max_pixels=settings.max_frame_pixels)
    cfg = model.cfg
    plan = clip_plan(info.num_frames, cfg.clip_len, cfg.overlap)
    out_dir = args.out or args.video.with_name(f"{args.video.stem}_stemseg")
    start = time.perf_counter()
    seg = _segmenter(model, device, args, StageTimer(device))
    windows = iter_clip_windows(args.video, plan, max_pixels=settings.max_frame_pixels)
    with tqdm(total=info.num_frames, unit="frame", disable=args.no_progress, file=sys.stderr) as bar:
        for _ in seg.propagate(windows, plan, info.height, info.width):
            bar.update(1)
    result = seg.result(fps=info.fps)
    write_outputs(result, out_dir, args.format,
                  frames_for_overlay=lambda: (f.image for f in iter_frames(args.video)))
    seconds = time.perf_counter() - start
    print(f"{info.num_frames} frames, {len(result.kept())} tracks, {seconds:.1f} s, "
          f"{info.num_frames / seconds:.2f} frames/s -> {out_dir}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from service.pipeline.clips import clip_plan
    from service.pipeline.timing import StageTimer
    from service.video import iter_clip_windows, iter_frames, probe

    model, device, settings = _load(args)
    info = probe(args.video, max_pixels=settings.max_frame_pixels)
    cfg = model.cfg
    plan = clip_plan(info.num_frames, cfg.clip_len, cfg.overlap)
    timer = StageTimer(device, sync=True)
    seg = _segmenter(model, device, args, timer)
    if args.preload:
        with timer("decode"):
            frames = {f.index: f for f in iter_frames(args.video, max_pixels=settings.max_frame_pixels)}
        windows = ((k, [frames[i] for i in clip]) for k, clip in enumerate(plan))
    else:
        windows = timer.wrap("decode", iter_clip_windows(args.video, plan, max_pixels=settings.max_frame_pixels))
    start = time.perf_counter()
    n = sum(1 for _ in seg.propagate(windows, plan, info.height, info.width))
    total = time.perf_counter() - start
    stages = {k: round(v, 4) for k, v in timer.seconds.items()}
    network_clustering = sum(timer.seconds.get(s, 0.0) for s in ("preprocess", "backbone", "heads", "clustering",
                                                                  "stitching"))
    report = {
        "video": str(args.video), "frames": n, "width": info.width, "height": info.height,
        "preset": cfg.name, "min_dim": cfg.min_dim, "max_dim": cfg.max_dim, "device": str(device),
        "engine": args.engine, "torch_threads": torch.get_num_threads(), "preload": args.preload,
        "seconds": stages, "total_seconds": round(total + (stages.get("decode", 0.0) if args.preload else 0.0), 4),
        "frames_per_second": round(n / (total + (stages.get("decode", 0.0) if args.preload else 0.0)), 4),
        "network_clustering_frames_per_second": round(n / network_clustering, 4) if network_clustering else None,
        "tracks": len(seg.result().tracks),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    _print_json(report, args.json)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.model.checkpoint import load_model

    if args.target == "tensorrt":
        return _export_tensorrt(args)
    weights = args.weights or get_settings().weights_path
    if weights is None:
        raise UsageError("no weights: pass --weights PATH or set STEMSEG_WEIGHTS")
    try:
        from model_export.onnx_export import export_onnx
    except ImportError as e:
        raise UsageError(f"export needs the onnx package ({e.name} missing): pip install 'stemseg-serve[export]'") from None
    graphs = export_onnx(load_model(weights, args.preset), args.out, opset=args.opset, fp16=args.fp16)
    print(f"wrote {graphs.backbone} and {graphs.heads}")
    return 0


def _export_tensorrt(args: argparse.Namespace) -> int:
    import torch

    from service.model.engines import graph_metadata
    from service.model.presets import ModelConfig

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise UsageError("export tensorrt needs the tensorrt package: pip install 'stemseg-serve[gpu]'") from None
    if not torch.cuda.is_available():
        raise UsageError("export tensorrt needs a CUDA GPU: engines are built for the GPU they run on")
    from model_export.tensorrt_build import Bucket, build_or_load

    if not (args.onnx / "heads.onnx").is_file():
        raise UsageError(f"no exported graphs in {args.onnx}: run `stemseg export onnx --out {args.onnx}` first")
    try:
        buckets = [Bucket.parse(b) for b in args.buckets] if args.buckets else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = ModelConfig.from_json(graph_metadata(args.onnx)["stemseg.preset"])
    start = time.perf_counter()
    paths = build_or_load(args.onnx, cfg, buckets=buckets, fp16=not args.fp32, cache_dir=args.cache)
    print(f"engines {paths['backbone']} and {paths['heads']} ready in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.evaluation.run import evaluate, load_ground_truth, predict

    try:
        gt, root = load_ground_truth(args.gt)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.pred is not None:
        try:
            predictions = json.loads(args.pred.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{args.pred}: cannot read YouTube-VIS results ({e})") from None
        if not isinstance(predictions, list):
            raise UsageError(f"{args.pred}: YouTube-VIS results are a JSON list of entries")
    else:
        model, device, _ = _load(args)
        frames = sum(v["length"] for v in gt["videos"])
        with tqdm(total=frames, unit="frame", disable=args.no_progress, file=sys.stderr) as bar:
            predictions = predict(gt, root, model, device=device, progress=bar.update, options=_options(args))
        if args.save_pred:
            args.save_pred.write_text(json.dumps(predictions))
    try:
        report = evaluate(gt, predictions, args.metric)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    except (KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"malformed results entry or annotation ({type(e).__name__}: {e})") from None
    _print_json(report, args.json)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import threading

    import uvicorn

    from service.api.main import create_app
    from service.config import get_settings

    settings = get_settings()
    worker = None
    if args.with_worker:  # only then does this process load torch
        from service.jobs.worker import Worker

        worker = Worker(settings)
        threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True).start()
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.stopping.set()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    import redis

    from service.config import get_settings
    from service.jobs.worker import Worker

    settings = get_settings()
    if args.check:
        try:
            redis.Redis.from_url(settings.redis_url, socket_timeout=3).ping()
        except redis.RedisError as e:
            raise UsageError(f"Redis at {settings.redis_url} does not answer: {e}") from None
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Worker(settings).run()
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from service.training.synth import write_dataset

    try:
        h, w = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must be HxW, e.g. 128x160, not {args.size!r}") from None
    if args.frames < 1 or args.videos < 1 or h < 32 or w < 32:
        raise UsageError("--videos and --frames must be positive and the size at least 32x32")
    write_dataset(args.out, args.videos, args.seed, args.frames, (h, w))
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


def _bad_input_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input, from the modules the command loaded: evaluated when
    an error is caught, so `stemseg serve` never imports torch just to name them."""
    errors: list[type[Exception]] = [UsageError]
    for module, name in (("service.model.checkpoint", "CheckpointError"), ("service.model.engines", "EngineError"),
                         ("service.video.decode", "VideoError"), ("service.jobs.model_info", "ModelInfoError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"segment": cmd_segment, "bench": cmd_bench, "export": cmd_export,
                "eval": cmd_eval, "serve": cmd_serve, "worker": cmd_worker, "synth": cmd_synth, "train": cmd_train,
                "synth-weights": cmd_synth_weights}
    try:
        return handlers[args.command](args)
    except _bad_input_errors() as e:
        # One line: a long list of checkpoint mismatches is summarised by its first entry.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        print(f"stemseg: error: {' '.join(lines[:2])}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("stemseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
