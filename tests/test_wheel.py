"""The wheel carries the shipped model and its card: build it, install it into a fresh virtual
environment, and load the default model from there, away from this checkout."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_runs_the_shipped_model(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dist), str(ROOT)], check=True, timeout=300, cwd=tmp_path)
    wheel = next(dist.glob("stemseg_serve-*.whl"))
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # The dependencies come from this environment (no network needed); the package only from the wheel.
    target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    (Path(target) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300, cwd=tmp_path)
    check = f"""
import hashlib, service
from pathlib import Path
from service.config import SHIPPED_CARD, get_settings
from service.pipeline.session import load
weights = get_settings().weights_path
assert Path(service.__file__).is_relative_to(Path(r'{env_dir}')), service.__file__
assert weights.is_file() and weights.is_relative_to(Path(r'{env_dir}')), weights
assert hashlib.sha256(weights.read_bytes()).hexdigest() in SHIPPED_CARD.read_text()
# The upload page and the offline API docs' assets are package data too.
from service.api.routes.web import STATIC
for name in ("index.html", "app.js", "app.css", "vendor/swagger-ui/swagger-ui-bundle.js",
             "vendor/swagger-ui/LICENSE", "vendor/redoc/redoc.standalone.js", "vendor/redoc/LICENSE"):
    assert (STATIC / name).is_file() and STATIC.is_relative_to(Path(r'{env_dir}')), name
print(load(device="cpu").cfg.name)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEMSEG_", "PYTHON"))}
    p = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
                       check=False)
    assert p.returncode == 0 and p.stdout.strip() == "lite", p.stderr
    # The installed command segments the sample with the default model.
    stemseg = env_dir / "bin" / "stemseg"
    p = subprocess.run([stemseg, "segment", str(ROOT / "examples" / "sample.mp4"), "--out", str(tmp_path / "o"),
                        "--format", "ytvis", "--no-progress", "--device", "cpu"], capture_output=True, text=True,
                       cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600, check=False)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "results.json").stat().st_size > 100
    assert subprocess.run([stemseg, "--version"], capture_output=True, text=True, env=env,
                          check=True).stdout.startswith("stemseg 0.")
