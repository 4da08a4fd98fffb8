"""The GPU measurements (engines, precisions, serving) in one run, written to one JSON report (see bench/gpu.sh).

Steps, each recorded as {"status": "ok" | "skipped: why" | "failed: error", "seconds": ...} so a
step that cannot run here never hides the others, and the report is rewritten after every step
so a run cut short still returns what it measured:

1. environment: GPU, driver, library versions, which engines can run;
2. assets: youtube_vis weights (the reference vectors' synthetic recipe: the real R-101
   network, so timings are real, tracks are not), a synthetic 96-frame video, ONNX graphs;
3. tensorrt_build: native TensorRT fp16 engines for the benchmarked sizes (timed, cached);
4. reference: every engine against torch fp32 on the reference vectors' inputs
   (tests/fixtures/reference), and torch fp32 against the vectors themselves;
5. bench: `stemseg bench` at each min-dim for torch fp32, TF32, bf16 / fp16 autocast,
   ONNX Runtime (CUDA) and TensorRT fp16, after a short warm-up run of each;
6. service: API + one worker (Redis), one upload alone and then 4 concurrent ones, while NVML
   samples GPU utilisation;
7. agreement: matched-track IoU of the reduced-precision engines against fp32 on the bench
   video, for the youtube_vis network and for the shipped lite model (whose tracks mean
   something);
8. ap: YouTube-VIS AP of the lite model on a synthetic held-out set, fp32 against fp16/bf16.

The TensorRT figures and the service are the issue's targets, so they come first and the time
budget (--budget-s) cuts agreement and AP first.

`--dry-run` runs every step on the CPU at tiny sizes with the lite model, skipping what needs
a GPU with the reason, so the script is known to work before device time is spent on it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Skip(Exception):
    """A step (or one engine of it) that cannot run here; the message says why."""


DEADLINE = [float("inf")]  # monotonic time past which steps stop starting engines


def _time_left() -> float:
    return DEADLINE[0] - time.monotonic()


class Report:
    def __init__(self, path: Path, budget_s: float, meta: dict) -> None:
        self.path, self.budget_s = path, budget_s
        self.started = time.monotonic()
        DEADLINE[0] = self.started + budget_s
        self.data: dict = {"report": "stemseg-serve issue 14 GPU measurements", **meta, "steps": {}}
        self.write()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def step(self, name: str, fn, needs_s: float = 0.0):
        if self.left() < needs_s:
            self.data["steps"][name] = {
                "status": f"skipped: time budget ({self.left():.0f} s left, needs ~{needs_s:.0f})"}
            self.write()
            return None
        start = time.monotonic()
        print(f"[gpu_bench] {name} ...", file=sys.stderr, flush=True)
        try:
            result = fn()
            entry = {"status": "ok", **(result or {})}
        except Skip as e:
            result, entry = None, {"status": f"skipped: {e}"}
        except Exception as e:  # noqa: BLE001 - recorded: one failed step must not lose the others
            result = None
            entry = {"status": f"failed: {type(e).__name__}: {e}",
                     "traceback": traceback.format_exc().splitlines()[-8:]}
        entry["seconds"] = round(time.monotonic() - start, 2)
        self.data["steps"][name] = entry
        self.write()
        print(f"[gpu_bench] {name}: {entry['status']} ({entry['seconds']} s)", file=sys.stderr, flush=True)
        return result

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 2)
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


# -- configuration ------------------------------------------------------------------------------

ENGINES = {
    # name: (stemseg bench flags, what it needs); in priority order, as the time budget may cut the tail
    "torch-fp32": (["--engine", "torch"], None),
    "tensorrt-fp16": (["--engine", "tensorrt"], "tensorrt"),
    "torch-fp16": (["--engine", "torch", "--autocast", "fp16"], "cuda"),
    "torch-bf16": (["--engine", "torch", "--autocast", "bf16"], None),
    "torch-tf32": (["--engine", "torch", "--tf32"], "cuda"),
    "onnxruntime": (["--engine", "onnxruntime"], "ort"),
    # torch.compile's CUDA-graph mode: compiling the R-101 takes minutes, so it goes last and only
    # starts with COMPILE_NEEDS_S left.
    "torch-fp16-cudagraphs": (["--engine", "torch", "--autocast", "fp16", "--compile", "reduce-overhead"], "cuda"),
}
COMPILE_NEEDS_S = 150
REDUCED = ("torch-bf16", "torch-fp16", "tensorrt-fp16")


def _plan(dry_run: bool) -> dict:
    if dry_run:
        return {"device": "cpu", "frames": 16, "video_hw": (128, 160), "min_dims": [96, 64], "warmup_frames": 0,
                "ap_videos": 2, "ap_frames": 12, "service_jobs": 4, "preset_for_bench": "lite"}
    return {"device": "cuda", "frames": 96, "video_hw": (480, 854), "min_dims": [480, 240], "warmup_frames": 16,
            "ap_videos": 16, "ap_frames": 24, "service_jobs": 4, "preset_for_bench": "youtube_vis"}


# -- helpers ----------------------------------------------------------------------------------

def _availability(device: str) -> dict[str, str | None]:
    """None where the engine can run, else why not."""
    import torch

    why: dict[str, str | None] = {}
    cuda = device == "cuda" and torch.cuda.is_available()
    for name, (_, needs) in ENGINES.items():
        if needs == "cuda" and not cuda:
            why[name] = "needs a CUDA GPU"
        elif needs == "ort":
            try:
                import onnxruntime as ort
            except ImportError:
                why[name] = "onnxruntime is not installed"
                continue
            if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
                why[name] = (f"this onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                             f"(onnxruntime-gpu is not installed; providers: {ort.get_available_providers()})")
            else:
                why[name] = None
        elif needs == "tensorrt":
            if not cuda:
                why[name] = "needs a CUDA GPU"
                continue
            try:
                import tensorrt  # noqa: F401
            except ImportError:
                why[name] = "the tensorrt package is not installed"
                continue
            why[name] = None
        else:
            why[name] = None
    return why


def _cli(args: list[str]) -> tuple[int, str]:
    """`stemseg ARGS` in this process (no second torch import); returns exit code and stderr."""
    from service.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, err.getvalue().strip()


def _reset_torch_flags() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    for mod in ("onnxruntime", "tensorrt", "av", "pynvml", "redis"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
        except AttributeError:
            out[mod] = "installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    with contextlib.suppress(Exception):
        out["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()
    with contextlib.suppress(Exception):
        out["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    return out


class NvmlSampler:
    """GPU utilisation sampled every `period_s` on a thread (NVML through nvidia-ml-py)."""

    def __init__(self, period_s: float = 0.1) -> None:
        try:
            import pynvml
        except ImportError:
            raise Skip("nvidia-ml-py (pynvml) is not installed") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise Skip(f"NVML cannot start here ({e}): no NVIDIA driver") from None
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            u = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            self.samples.append((time.monotonic(), int(u.gpu), int(mem.used)))
            self._stop.wait(self.period_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        util = [s[1] for s in self.samples]
        if not util:
            return {"samples": 0}
        return {"samples": len(util), "period_s": self.period_s,
                "mean_utilization_pct": round(sum(util) / len(util), 1),
                "fraction_of_samples_busy_ge_90pct": round(sum(u >= 90 for u in util) / len(util), 3),
                "fraction_of_samples_busy_gt_0": round(sum(u > 0 for u in util) / len(util), 3),
                "max_memory_used_gib": round(max(s[2] for s in self.samples) / 2**30, 2)}


# -- the steps ----------------------------------------------------------------------------------

def step_assets(work: Path, plan: dict, why: dict) -> dict:
    from service.config import SHIPPED_WEIGHTS
    from service.model.presets import get_preset
    from service.model.synthetic import official_layout, save_official_checkpoint, synthetic_state_dict
    from service.training.synth import write_dataset

    assets: dict = {"lite": str(SHIPPED_WEIGHTS)}
    yv = work / "youtube_vis_synthetic.pth"
    save_official_checkpoint(synthetic_state_dict(official_layout(get_preset("youtube_vis"))), str(yv))
    assets["youtube_vis"] = str(yv)
    bench_weights = assets[plan["preset_for_bench"]]
    h, w = plan["video_hw"]
    write_dataset(work / "video", 1, seed=14, frames=plan["frames"], size=(h, w))
    assets["video"] = str(next((work / "video" / "videos").glob("*.mp4")))
    if plan["warmup_frames"]:
        write_dataset(work / "warmup", 1, seed=15, frames=plan["warmup_frames"], size=(h, w))
        assets["warmup_video"] = str(next((work / "warmup" / "videos").glob("*.mp4")))
    if why["onnxruntime"] is None or why["tensorrt-fp16"] is None:
        rc, err = _cli(["export", "onnx", "--weights", bench_weights, "--out", str(work / "onnx")])
        if rc:
            raise RuntimeError(f"export onnx failed: {err}")
        assets["onnx"] = str(work / "onnx")
    assets["bench_weights"] = bench_weights
    return {"assets": assets}


def _buckets(plan: dict, weights: str) -> list[str]:
    """The padded input size of each benchmarked min-dim: one TensorRT profile each."""
    from service.model.checkpoint import load_model
    from service.pipeline.preprocess import geometry

    cfg = load_model(weights).cfg
    out = []
    for d in plan["min_dims"]:
        c = cfg.with_min_dim(d)
        g = geometry(*plan["video_hw"], c.min_dim, c.max_dim)
        out.append(f"{g.padded_height}x{g.padded_width}")
    return out


def step_tensorrt_build(assets: dict, plan: dict, why: dict, work: Path) -> dict:
    if why["tensorrt-fp16"]:
        raise Skip(why["tensorrt-fp16"])
    buckets = _buckets(plan, assets["bench_weights"])
    start = time.perf_counter()
    rc, err = _cli(["export", "tensorrt", "--onnx", assets["onnx"], "--buckets", *buckets])
    if rc:
        raise RuntimeError(f"export tensorrt failed: {err}")
    return {"buckets": buckets, "build_seconds": round(time.perf_counter() - start, 1)}


def step_reference(plan: dict, why: dict, assets: dict) -> dict:
    """Each engine's head outputs on the reference inputs against torch fp32 (and torch fp32's
    against the original's vectors)."""
    import numpy as np
    import torch

    from service.model.checkpoint import load_model
    from service.model.engines import TorchEngine
    from service.model.stemseg import stack_clip
    from service.model.synthetic import save_official_checkpoint, synthetic_state_dict

    ref_dir = ROOT / "tests" / "fixtures" / "reference"
    device = plan["device"]
    out: dict = {}
    vectors = sorted(ref_dir.glob("model_*.npz"))
    if plan["device"] == "cpu":
        vectors = [v for v in vectors if "youtube_vis" in v.name]  # dry run: one preset is enough
    for path in vectors:
        z = np.load(path)
        meta = json.loads(z["meta_json"].item())
        manifest = json.loads((ref_dir / f"manifest_{meta['config']}.json").read_text())
        weights = Path(assets["youtube_vis"]).parent / f"ref_{meta['config']}.pth"
        save_official_checkpoint(synthetic_state_dict((k, s) for k, s, _ in manifest), str(weights))
        model = load_model(weights, device=device)
        images = torch.from_numpy(z["input_images"]).to(device)

        def run(engine, x=images):
            with torch.inference_mode():
                o = engine.clip_heads([stack_clip(f) for f in engine.frame_features(x)])
            return {k: getattr(o, k).float().cpu().numpy()[0] for k in ("embeddings", "bandwidths", "seediness",
                                                                       "semseg_logits") if getattr(o, k) is not None}

        _reset_torch_flags()
        fp32 = run(TorchEngine(model))
        entry: dict = {"vs_original": {k: float(np.abs(fp32[k] - z[k]).max()) for k in fp32 if k in z}}
        for name, (flags, _) in ENGINES.items():
            if why[name]:
                entry[name] = f"skipped: {why[name]}"
                continue
            if name == "torch-fp32":
                continue
            if name in ("onnxruntime", "tensorrt-fp16"):
                continue  # they run exported graphs: compared on the benchmarked network below
            if "--compile" in flags:
                entry[name] = "skipped: compiling takes minutes; timed in the bench step only"
                continue
            try:
                if name == "torch-tf32":
                    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
                    got = run(TorchEngine(model))
                    _reset_torch_flags()
                else:
                    got = run(TorchEngine(model, autocast=flags[-1]))
            except Exception as e:  # noqa: BLE001 - recorded per engine
                entry[name] = f"failed: {type(e).__name__}: {e}"
                continue
            diffs = {k: float(np.abs(got[k] - fp32[k]).max() / max(1.0, float(np.abs(fp32[k]).max())))
                     for k in fp32}
            tol = 2e-2 if name in REDUCED else 1e-3 if name != "torch-tf32" else 2e-2
            entry[name] = {"max_rel_diff": diffs, "tolerance": tol, "within": all(v <= tol for v in diffs.values())}
        out[meta["config"]] = entry
    out["bench_network"] = _exported_vs_torch(plan, why, assets, ref_dir)
    return {"vectors": out}


def _exported_vs_torch(plan: dict, why: dict, assets: dict, ref_dir: Path) -> dict:
    """ONNX Runtime and TensorRT run the benchmarked network's exported graphs: their outputs on
    the youtube_vis vector's input frames against the same network in torch fp32."""
    import numpy as np
    import torch

    from service.model.checkpoint import load_model
    from service.model.engine_spec import EngineSpec
    from service.model.engines import TorchEngine, build_engine
    from service.model.stemseg import stack_clip

    z = np.load(ref_dir / "model_youtube_vis_s0.npz")
    device = plan["device"]
    model = load_model(assets["bench_weights"], device=device)
    images = torch.from_numpy(z["input_images"][: model.cfg.clip_len])
    entry: dict = {"weights": Path(assets["bench_weights"]).name, "input": "model_youtube_vis_s0.npz input_images"}

    def run(engine, x):
        with torch.inference_mode():
            o = engine.clip_heads([stack_clip(f) for f in engine.frame_features(x)])
        return {k: getattr(o, k).float().cpu().numpy()[0] for k in ("embeddings", "bandwidths", "seediness",
                                                                   "semseg_logits") if getattr(o, k) is not None}

    _reset_torch_flags()
    fp32 = run(TorchEngine(model), images.to(device))
    for name, kind in (("onnxruntime", "onnxruntime"), ("tensorrt-fp16", "tensorrt")):
        if why[name]:
            entry[name] = f"skipped: {why[name]}"
            continue
        try:
            engine = build_engine(EngineSpec(kind, onnx_dir=Path(assets["onnx"]), device=device))
            got = run(engine, images.to(engine.device))
        except Exception as e:  # noqa: BLE001 - recorded per engine
            entry[name] = f"failed: {type(e).__name__}: {e}"
            continue
        diffs = {k: float(np.abs(got[k] - fp32[k]).max() / max(1.0, float(np.abs(fp32[k]).max()))) for k in fp32}
        tol = 2e-2 if name in REDUCED else 1e-3
        entry[name] = {"max_rel_diff": diffs, "tolerance": tol, "within": all(v <= tol for v in diffs.values())}
    return entry


def step_bench(plan: dict, why: dict, assets: dict, work: Path) -> dict:
    runs: dict = {}
    for min_dim in plan["min_dims"]:
        for name, (flags, _) in ENGINES.items():
            key = f"{name}@{min_dim}"
            if why[name]:
                runs[key] = f"skipped: {why[name]}"
                continue
            if _time_left() < (COMPILE_NEEDS_S if "--compile" in flags else 30):
                runs[key] = "skipped: time budget"
                continue
            common = ["--device", plan["device"], "--min-dim", str(min_dim), *flags]
            common += ["--onnx", assets["onnx"]] if name in ("onnxruntime", "tensorrt-fp16") else \
                ["--weights", assets["bench_weights"]]
            _reset_torch_flags()
            try:
                if "warmup_video" in assets:  # cuDNN autotuning, lazy init, TensorRT context setup
                    _cli(["bench", assets["warmup_video"], *common])
                out = work / f"bench_{name}_{min_dim}.json"
                rc, err = _cli(["bench", assets["video"], *common, "--json", str(out)])
                runs[key] = json.loads(out.read_text()) if rc == 0 else f"failed: {err}"
            except Exception as e:  # noqa: BLE001 - recorded per engine
                runs[key] = f"failed: {type(e).__name__}: {e}"
            finally:
                _reset_torch_flags()
    fps = {k: v["frames_per_second"] for k, v in runs.items() if isinstance(v, dict)}
    ratios = {}
    for min_dim in plan["min_dims"]:
        base = fps.get(f"torch-fp32@{min_dim}")
        for name in ENGINES:
            got = fps.get(f"{name}@{min_dim}")
            if base and got:
                ratios[f"{name}@{min_dim}"] = round(got / base, 2)
    return {"command": "stemseg bench VIDEO --device D --min-dim N <engine flags> --json OUT (after a warm-up run)",
            "frames_per_second": fps, "speedup_vs_torch_fp32": ratios, "runs": runs}


def _segment(engine, video: str):
    from service.pipeline.session import segment

    return segment(video, engine)


def step_agreement(plan: dict, why: dict, assets: dict) -> dict:
    from service.evaluation.agreement import track_agreement
    from service.model.checkpoint import load_model
    from service.model.engine_spec import EngineSpec
    from service.model.engines import TorchEngine, build_engine

    out: dict = {}
    for label, weights, min_dim in (("lite", assets["lite"], None),
                                    (plan["preset_for_bench"], assets["bench_weights"], plan["min_dims"][0])):
        model = load_model(weights, device=plan["device"])
        if min_dim:
            model.cfg = model.cfg.with_min_dim(min_dim)
        _reset_torch_flags()
        fp32 = _segment(TorchEngine(model), assets["video"])
        entry: dict = {"fp32_tracks": len(fp32.kept()), "min_dim": model.cfg.min_dim}
        for name in REDUCED:
            if why[name]:
                entry[name] = f"skipped: {why[name]}"
                continue
            if name == "tensorrt-fp16":
                if weights != assets["bench_weights"] or "onnx" not in assets:
                    entry[name] = "skipped: TensorRT engines are built for the benchmarked network only"
                    continue
                engine = build_engine(EngineSpec("tensorrt", onnx_dir=Path(assets["onnx"]), device=plan["device"],
                                                 min_dim=min_dim))
            else:
                engine = TorchEngine(model, autocast=ENGINES[name][0][-1])
            entry[name] = track_agreement(fp32, _segment(engine, assets["video"]))
        out[label] = entry
    return {"matched_track_iou": out}


def step_ap(plan: dict, why: dict, assets: dict, work: Path) -> dict:
    """The lite model's YouTube-VIS AP on a held-out synthetic set in fp32 and reduced precision."""
    from service.training.synth import write_dataset

    data = work / "ap_set"
    write_dataset(data, plan["ap_videos"], seed=2, frames=plan["ap_frames"])
    scores: dict = {}
    for name in ("torch-fp32", *REDUCED):
        if why[name]:
            scores[name] = f"skipped: {why[name]}"
            continue
        if name == "tensorrt-fp16":
            scores[name] = "skipped: the lite model's TensorRT engines are not built by this script"
            continue
        out = work / f"ap_{name}.json"
        _reset_torch_flags()
        rc, err = _cli(["eval", "--gt", str(data), "--metric", "ytvis", "--weights", assets["lite"], "--device",
                        plan["device"], *ENGINES[name][0], "--json", str(out), "--no-progress"])
        if rc == 0:
            got = json.loads(out.read_text())
            scores[name] = {k: round(got[k], 4) for k in ("AP", "AP50", "AP75", "AR1", "AR10")}
        else:
            scores[name] = f"failed: {err}"
    base = scores.get("torch-fp32")
    diff = {n: round(s["AP"] - base["AP"], 4) for n, s in scores.items()
            if isinstance(s, dict) and isinstance(base, dict) and n != "torch-fp32"}
    return {"dataset": f"stemseg synth --videos {plan['ap_videos']} --seed 2 --frames {plan['ap_frames']}",
            "ap_difference_vs_fp32": diff, "scores": scores}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis(work: Path, dry_run: bool) -> tuple[str, subprocess.Popen | None]:
    import redis

    server = shutil.which("redis-server")  # gpu.sh puts bench/.deps/redis on PATH on the device
    if server:
        port = _free_port()
        proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(work)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(url).ping():
                    return url, proc
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"{server} did not answer on port {port}")
    url = os.environ.get("STEMSEG_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError:
        raise Skip("no redis-server binary (PATH or bench/.deps/redis) and no Redis at " + url) from None
    return url, None


def step_service(plan: dict, why: dict, assets: dict, work: Path, dry_run: bool) -> dict:
    try:
        import httpx
        import redis
    except ImportError as e:
        raise Skip(f"the server extra is not installed ({e.name})") from None
    from service.config import Settings

    engine = "tensorrt" if why["tensorrt-fp16"] is None else "torch"
    env_engine = {"STEMSEG_ENGINE": engine}
    if engine == "tensorrt":
        env_engine["STEMSEG_ONNX_DIR"] = assets["onnx"]
    elif plan["device"] == "cuda":
        env_engine["STEMSEG_AUTOCAST"] = "fp16"
    # The batcher only pays when the worker runs several tasks at once (a worker_concurrency
    # setting); with one task thread it would only add its queue delay to every forward.
    concurrent = "worker_concurrency" in Settings.model_fields
    batch = 16 if concurrent else 0
    url, redis_proc = _redis(work, dry_run)
    prefix = f"stemseg-bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "STEMSEG_REDIS_URL": url, "STEMSEG_REDIS_PREFIX": prefix,
           "STEMSEG_DATA_DIR": str(work / "service-data"), "STEMSEG_WEIGHTS": assets["bench_weights"],
           "STEMSEG_DEVICE": plan["device"], "STEMSEG_BATCH_MAX_SIZE": str(batch), "STEMSEG_BATCH_MAX_DELAY_MS": "5",
           "STEMSEG_WORKER_CONCURRENCY": str(plan["service_jobs"]), "PYTHONPATH": str(ROOT), **env_engine}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    logs = work / "service-logs"
    logs.mkdir(exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                              stdout=(logs / "api.log").open("w"), stderr=subprocess.STDOUT),
             subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env,
                              stdout=(logs / "worker.log").open("w"), stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{base}/readyz", timeout=2)
                if ready.status_code == 200 and ready.json().get("workers", 0) >= 1:
                    break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("service did not come up: " + (logs / "worker.log").read_text()[-500:])
            time.sleep(0.2)
        min_dim = plan["min_dims"][0]

        def run_jobs(n: int) -> dict:
            start = time.monotonic()
            ids = []
            for _ in range(n):
                with open(assets["video"], "rb") as f:
                    r = httpx.post(f"{base}/v1/jobs", params={"formats": "ytvis", "min_dim": min_dim},
                                   files={"file": ("video.mp4", f, "video/mp4")}, timeout=120)
                r.raise_for_status()
                ids.append(r.json()["id"])
            done: dict = {}
            while len(done) < n:
                for i in ids:
                    if i not in done:
                        job = httpx.get(f"{base}/v1/jobs/{i}", timeout=30).json()
                        if job["status"] in ("succeeded", "failed", "cancelled"):
                            done[i] = job["status"]
                if time.monotonic() - start > 600:
                    raise RuntimeError(f"jobs still running after 600 s: {done}")
                time.sleep(0.05)
            seconds = time.monotonic() - start
            frames = n * plan["frames"]
            return {"jobs": n, "statuses": sorted(done.values()), "seconds": round(seconds, 2),
                    "aggregate_frames_per_second": round(frames / seconds, 2)}

        one = run_jobs(1)
        sampler = None
        try:
            sampler = NvmlSampler()
        except Skip as e:
            nvml = f"skipped: {e}"
        if sampler is not None:
            with sampler:
                many = run_jobs(plan["service_jobs"])
            nvml = sampler.summary()
        else:
            many = run_jobs(plan["service_jobs"])
        return {"engine": env_engine, "batch_max_size": batch, "min_dim": min_dim,
                "worker_concurrency_setting_exists": concurrent,
                "one_job": one, "concurrent_jobs": many,
                "aggregate_speedup": round(many["aggregate_frames_per_second"] / one["aggregate_frames_per_second"], 2),
                "gpu_utilization": nvml}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        import redis

        r = redis.Redis.from_url(url)
        from service.jobs.keys import Keys

        keys = [k for pattern in Keys(prefix).patterns for k in r.scan_iter(pattern, count=500)]
        if keys:
            r.delete(*keys)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the report (gpu_report.json)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, GPU-only engines skipped")
    p.add_argument("--budget-s", type=float, default=450, help="later steps are skipped past this")
    p.add_argument("--work", type=Path, help="scratch directory (default: a new one under $TMPDIR, removed after)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory (videos, graphs, engines)")
    args = p.parse_args(argv)
    import torch

    plan = _plan(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"stemseg-bench-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    why = _availability(plan["device"])
    report = Report(args.out / ("gpu_report_dry_run.json" if args.dry_run else "gpu_report.json"), args.budget_s,
                    {"dry_run": args.dry_run,
                     "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
                     "command": "bash bench/gpu.sh" + (" --dry-run" if args.dry_run else ""),
                     "engines_unavailable": {k: v for k, v in why.items() if v}})
    report.step("environment", lambda: {"versions": _versions()})
    assets = (report.step("assets", lambda: step_assets(work, plan, why)) or {}).get("assets")
    if assets is None:
        shutil.rmtree(work, ignore_errors=True)
        return 1
    report.step("tensorrt_build", lambda: step_tensorrt_build(assets, plan, why, work), needs_s=60)
    report.step("reference", lambda: step_reference(plan, why, assets), needs_s=20)
    report.step("bench", lambda: step_bench(plan, why, assets, work), needs_s=60)
    report.step("service", lambda: step_service(plan, why, assets, work, args.dry_run), needs_s=60)
    report.step("agreement", lambda: step_agreement(plan, why, assets), needs_s=30)
    report.step("ap", lambda: step_ap(plan, why, assets, work), needs_s=20)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    report.data["complete"] = all(not s["status"].startswith("failed") for s in report.data["steps"].values())
    report.write()
    print(report.path)
    return 0 if report.data["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
