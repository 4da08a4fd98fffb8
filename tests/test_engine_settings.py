"""The service runs the engine its settings name, or refuses to start with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from service_env import ServiceEnv
from videos import make_video

from service.config import Settings
from service.model.engine_spec import EngineSpec
from service.model.engines import Engine, EngineError, TorchEngine, build_engine


@pytest.fixture(scope="module")
def onnx_dir(small_weights: Path, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from service.cli import main

    out = tmp_path_factory.mktemp("graphs") / "onnx"
    assert main(["export", "onnx", "--weights", str(small_weights), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_worker_runs_onnxruntime_from_settings_and_agrees_with_the_cli(small_weights: Path, onnx_dir: Path,
                                                                      tmp_path: Path) -> None:
    import httpx

    from service.cli import main

    video = tmp_path / "clip.mp4"
    make_video(video, 21, 64, 48)
    env = ServiceEnv(tmp_path, small_weights, STEMSEG_ENGINE="onnxruntime", STEMSEG_ONNX_DIR=str(onnx_dir))
    try:
        env.start_api()
        env.start_worker()
        with video.open("rb") as f:
            r = httpx.post(f"{env.base}/v1/jobs", files={"file": ("clip.mp4", f, "video/mp4")}, timeout=60)
        assert r.status_code == 202, r.text
        job = env.wait(r.json()["id"])
        assert job["status"] == "succeeded", job
        tracks = httpx.get(f"{env.base}/v1/jobs/{job['id']}/result", timeout=60).json()["tracks"]
    finally:
        env.close()
    out = tmp_path / "cli"
    assert main(["segment", str(video), "--engine", "onnxruntime", "--onnx", str(onnx_dir), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    cli = json.loads((out / "results.json").read_text())
    assert tracks and [(t["category_id"], t["segmentations"]) for t in tracks] == [
        (c["category_id"], c["segmentations"]) for c in cli]


def _settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def engine_from_settings(settings: Settings) -> Engine:
    return build_engine(EngineSpec.from_settings(settings))


def test_engine_from_settings_builds_each_configured_engine(small_weights: Path, onnx_dir: Path) -> None:
    from service.model.batching import DynamicBatcher
    from service.model.engines import OnnxRuntimeEngine

    torch_engine = engine_from_settings(_settings(weights=small_weights, device="cpu", autocast="bf16"))
    assert isinstance(torch_engine, TorchEngine) and torch_engine.autocast == "bf16"
    ort_engine = engine_from_settings(_settings(engine="onnxruntime", onnx_dir=onnx_dir, device="cpu"))
    assert isinstance(ort_engine, OnnxRuntimeEngine) and ort_engine.cfg.name == "kitti_mots"
    batched = engine_from_settings(_settings(weights=small_weights, device="cpu", batch_max_size=8))
    try:
        assert isinstance(batched, DynamicBatcher) and batched.max_batch == 8
        assert isinstance(batched.engine, TorchEngine)
    finally:
        batched.close()


@pytest.mark.parametrize("settings, message", [
    ({"engine": "onnxruntime"}, "needs STEMSEG_ONNX_DIR"),
    ({"engine": "onnxruntime", "onnx_dir": "EMPTY"}, "no exported graphs"),
    ({"engine": "tensorrt", "onnx_dir": "EMPTY"}, "needs a CUDA GPU"),
    ({"engine": "onnxruntime-trt", "onnx_dir": "EMPTY"}, "needs a CUDA GPU"),
    ({"preset": "tiny"}, "STEMSEG_PRESET='tiny' is not a preset"),
    ({"torch_compile": "default", "batch_max_size": 4},
     "STEMSEG_BATCH_MAX_SIZE > 1 and STEMSEG_TORCH_COMPILE together would recompile per batch size"),
])
def test_misconfigured_engines_are_errors_not_fallbacks(small_weights: Path, tmp_path: Path, settings: dict,
                                                        message: str) -> None:
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has a GPU")
    settings = {k: (tmp_path if v == "EMPTY" else v) for k, v in settings.items()}
    with pytest.raises(EngineError, match=message):
        engine_from_settings(_settings(weights=small_weights, device="cpu", **settings))


@pytest.mark.parametrize("settings", [{"engine": "tvm"}, {"autocast": "fp8"}, {"torch_compile": "fast"}])
def test_unknown_engine_options_are_refused_by_the_settings(settings: dict) -> None:
    with pytest.raises(ValidationError, match=next(iter(settings))):
        _settings(**settings)


def test_torch_options_of_another_engine_are_unused_not_refused(tmp_path: Path) -> None:
    """One environment serves every engine (compose sets them all), as before the spec existed."""
    spec = EngineSpec.from_settings(_settings(engine="onnxruntime", onnx_dir=tmp_path, autocast="bf16", tf32=True))
    assert (spec.kind, spec.autocast, spec.tf32) == ("onnxruntime", "off", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("env, message", [
    ({"STEMSEG_DEVICE": "cuda"}, "STEMSEG_DEVICE: device 'cuda' asked for, but no CUDA GPU is available"),
    ({"STEMSEG_ENGINE": "tensorrt", "STEMSEG_ONNX_DIR": "/nonexistent"}, "needs a CUDA GPU"),
])
def test_worker_process_refuses_to_start_with_one_line(small_weights: Path, tmp_path: Path, env: dict,
                                                        message: str) -> None:
    e = ServiceEnv(tmp_path, small_weights, **env)
    try:
        p = subprocess.run([sys.executable, "-m", "service.cli", "worker"], env=e.env, capture_output=True, check=False,
                           text=True, timeout=120)
    finally:
        e.close()
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_torch_engine_options(official_weights) -> None:
    from service.model.checkpoint import load_model

    model = load_model(official_weights("kitti_mots"))
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="fp16 autocast needs a CUDA GPU"):
            TorchEngine(model, autocast="fp16")
    assert TorchEngine(model, compile=False).compile == "off"
    assert TorchEngine(model, compile=True).compile == "default"  # compiled lazily, on the first call


def test_cli_speed_options_apply_to_the_torch_engine_only(small_weights: Path, onnx_dir: Path, tmp_path: Path,
                                                          capsys) -> None:
    from service.cli import main

    video = tmp_path / "clip.mp4"
    make_video(video, 9, 64, 48)
    assert main(["bench", str(video), "--engine", "onnxruntime", "--onnx", str(onnx_dir), "--autocast", "bf16"]) == 2
    assert capsys.readouterr().err.strip() == ("stemseg: error: --autocast, --compile and --tf32 apply to "
                                               "--engine torch only")
    out = tmp_path / "bench.json"
    assert main(["bench", str(video), "--weights", str(small_weights), "--device", "cpu", "--serial",
                 "--json", str(out)]) == 0
    serial = json.loads(out.read_text())
    assert main(["bench", str(video), "--weights", str(small_weights), "--device", "cpu", "--autocast", "bf16",
                 "--clips-per-forward", "2", "--json", str(out)]) == 0
    fast = json.loads(out.read_text())
    assert (serial["pipeline"], fast["pipeline"]) == ("serial", "threaded, 2 clip(s) per forward")
    assert fast["autocast"] == "bf16" and serial["frames"] == fast["frames"] == 9
    assert "decode_wait" in fast["seconds"] and "decode_wait" not in serial["seconds"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cli_names_the_flag_or_the_setting_the_device_came_from(small_weights: Path, tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    from service.cli import main
    from service.config import get_settings

    video = tmp_path / "clip.mp4"
    make_video(video, 9, 64, 48)
    args = ["bench", str(video), "--weights", str(small_weights)]
    assert main([*args, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("stemseg: error: --device: device 'cuda' asked for")
    monkeypatch.setenv("STEMSEG_DEVICE", "cuda")
    get_settings.cache_clear()
    try:
        assert main(args) == 2
        assert capsys.readouterr().err.startswith("stemseg: error: STEMSEG_DEVICE: device 'cuda' asked for")
    finally:
        get_settings.cache_clear()
