"""bench/gpu.sh --dry-run: the GPU script's every step runs on the CPU before device time is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_env import REDIS_URL

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 30 to 70 s on a shared 2-core machine
def test_dry_run_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "STEMSEG_TEST_REDIS_URL": REDIS_URL}
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=540, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "gpu_report_dry_run.json").read_text())
    assert report["dry_run"] and report["complete"]
    steps = report["steps"]
    assert list(steps) == ["environment", "assets", "tensorrt_build", "reference", "bench", "service", "agreement",
                           "ap"]
    for name, step in steps.items():
        assert step["status"] == "ok" or step["status"].startswith("skipped: "), (name, step["status"])
    assert steps["tensorrt_build"]["status"] == "skipped: needs a CUDA GPU"
    assert steps["environment"]["versions"]["torch"]

    # Torch fp32 reproduces the original's vectors; bf16 and the exported graphs are compared to it.
    vectors = steps["reference"]["vectors"]
    assert max(vectors["youtube_vis"]["vs_original"].values()) < 1e-3
    assert vectors["youtube_vis"]["torch-bf16"]["within"]
    assert vectors["bench_network"]["onnxruntime"]["within"]
    assert vectors["youtube_vis"]["torch-fp16"] == "skipped: needs a CUDA GPU"

    # Every engine at both sizes: measured, or skipped with the reason.
    runs = steps["bench"]["runs"]
    assert len(runs) == 2 * 7
    for key in ("torch-fp32@96", "torch-bf16@96", "onnxruntime@64", "torch-fp32@64"):
        assert runs[key]["frames"] == 16 and runs[key]["frames_per_second"] > 0, key
    assert runs["tensorrt-fp16@96"] == "skipped: needs a CUDA GPU"
    assert set(steps["bench"]["speedup_vs_torch_fp32"]) >= {"torch-bf16@96", "onnxruntime@64"}

    lite = steps["agreement"]["matched_track_iou"]["lite"]
    assert lite["fp32_tracks"] > 0 and 0.0 <= lite["torch-bf16"]["mean_matched_iou"] <= 1.0
    assert "torch-bf16" in steps["ap"]["ap_difference_vs_fp32"]
    service = steps["service"]
    assert service["one_job"]["statuses"] == ["succeeded"]
    assert service["concurrent_jobs"]["statuses"] == ["succeeded"] * 4
    assert service["gpu_utilization"].startswith("skipped: ")
    # The scratch directory is removed; only the report is left.
    assert [p.name for p in out.iterdir()] == ["gpu_report_dry_run.json"]
    assert not list(tmp_path.glob("stemseg-bench-*"))


def test_time_budget_skips_the_remaining_steps_with_the_reason(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--budget-s", "1"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    steps = json.loads((tmp_path / "out" / "gpu_report_dry_run.json").read_text())["steps"]
    assert steps["assets"]["status"] == "ok"
    for name in ("tensorrt_build", "reference", "bench", "service", "agreement", "ap"):
        assert steps[name]["status"].startswith("skipped: time budget"), (name, steps[name])
