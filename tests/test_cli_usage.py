"""Every subcommand given bad values: one line on stderr, exit 2, no traceback; `--out` never
destroys what stemseg did not write; `stemseg serve` with no configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_env import REDIS_URL, free_port
from videos import make_video

from service.cli import main
from service.config import get_settings


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch, tmp_path: Path):
    """Settings come from the environment each time; fetched weights from an empty directory."""
    for key in list(os.environ):
        if key.startswith("STEMSEG_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("STEMSEG_WEIGHTS_DIR", str(tmp_path / "fetched"))
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own exits (bad option values, --version, --help)
        return int(e.code or 0)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "v.mp4"
    make_video(path, 9, 64, 48)
    return path


def bad_cases(video: Path, tmp: Path) -> list[list[str]]:
    v = str(video)
    notes = tmp / "notes.txt"
    notes.write_text("my notes")
    (tmp / "mine").mkdir(exist_ok=True)
    (tmp / "mine" / "data.csv").write_text("1,2\n")
    garbage = tmp / "garbage.json"
    garbage.write_text("{not json")
    no_ids = tmp / "no_ids.json"  # parses, but a video has no id and there are no categories
    no_ids.write_text(json.dumps({"videos": [{"file_names": ["a.jpg"]}], "annotations": [], "categories": []}))
    return [
        ["segment", v, "--min-iou", "2"], ["segment", v, "--min-iou", "-1"], ["segment", v, "--min-iou", "nan"],
        ["segment", v, "--min-dim", "0"], ["segment", v, "--min-dim", "abc"], ["segment", v, "--device", "bogus"],
        ["segment", v, "--device", "cuda:x"], ["segment", v, "--preset", "bogus"], ["segment", v, "--format", "gif"],
        ["segment", v, "--min-score", "1.5"], ["segment", v, "--engine", "bogus"], ["segment", v, "--secondary", "x"],
        ["segment", v, "--masks", "x"], ["segment", v, "--weights", str(tmp / "missing.pth")],
        ["segment", v, "--weights", "youtube_vis"], ["segment", v, "--weights", str(notes)],
        ["segment", str(tmp / "missing.mp4")], ["segment", v, "--out", str(notes)],
        ["segment", v, "--out", str(notes / "x")], ["segment", v, "--out", "."],
        ["segment", v, "--out", str(tmp / "mine")], ["segment", v, "--engine", "onnxruntime"],
        ["segment"], ["segment", v, "--unknown-option"],
        ["bench", v, "--min-dim", "10"], ["bench", v, "--device", "cuda:x"], ["bench", str(tmp)],
        ["bench", v, "--clips-per-forward", "0"], ["bench", v, "--engine", "onnxruntime", "--autocast", "bf16"],
        ["bench", v, "--autocast", "fp16", "--device", "cpu"], ["bench", v, "--compile", "bogus"],
        ["bench", v, "--json", str(tmp / "no" / "such" / "dir.json"), "--min-dim", "32"],
        ["eval", "--gt", str(tmp / "missing")], ["eval", "--gt", str(garbage)], ["eval", "--metric", "foo"],
        ["eval", "--gt", str(no_ids), str(no_ids), "--pred", str(no_ids)],
        ["export", "onnx", "--opset", "5"], ["export", "onnx", "--preset", "bogus"],
        ["export", "onnx", "--weights", str(tmp / "missing.pth")], ["export", "tensorrt", "--onnx", str(tmp)],
        ["export", "bogus"], ["export"],
        ["serve", "--port", "0"], ["serve", "--port", "70000"], ["serve", "--port", "http"],
        ["weights"], ["weights", "fetch", "bogus"], ["weights", "fetch", "davis", "--url", "ftp://example.org/x.pth"],
        ["weights", "fetch", "davis", "--url", f"http://127.0.0.1:{free_port()}/davis.pth", "--to", str(tmp / "w")],
        ["synth", "--out", "s", "--videos", "0", "--seed", "1"],
        ["synth", "--out", "s", "--videos", "2", "--seed", "-1"],
        ["synth", "--out", "s", "--videos", "2", "--seed", "1", "--size", "10x10"],
        ["synth", "--out", "s", "--videos", "2", "--seed", "1", "--size", "abc"],
        ["synth", "--out", "s", "--videos", "2", "--seed", "1", "--frames", "0"],
        ["train", "--data", str(tmp), "--out", "w.safetensors"],
        ["train", "--data", str(tmp), "--out", "w.safetensors", "--steps", "0"],
        ["train", "--data", str(tmp), "--out", "w.safetensors", "--lr", "0"],
        ["train", "--data", str(tmp), "--out", "w.safetensors", "--batch", "-3"],
        ["train", "--data", str(tmp), "--out", "w.safetensors", "--preset", "bogus"],
        ["synth-weights", "--preset", "bogus", "--out", "x.pth"],
        ["bogus-command"], [],
    ]


def test_every_subcommand_refuses_bad_values_in_one_line(video: Path, tmp_path: Path, capsys) -> None:
    cases = bad_cases(video, tmp_path)  # makes the user's files the cases point at
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert before, "the cases need files of the user's to protect"
    for argv in cases:
        rc = run(argv)
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert rc == 2, (argv, rc, err)
        assert len(err.splitlines()) == 1 and "error: " in err and "Traceback" not in err, (argv, err)
    # Nothing the user had was touched, and no output appeared.
    assert {p: p.read_bytes() for p in before} == before
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == set(before)
    assert not (tmp_path / "v_stemseg").exists() and not (tmp_path / "s").exists()


def test_bad_settings_one_line(video: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    for name, value in [("STEMSEG_FORMATS", "ytvis,gif"), ("STEMSEG_DEVICE", "bogus"),
                        ("STEMSEG_MAX_FRAME_PIXELS", "many"), ("STEMSEG_WEIGHTS", "kitti_mots")]:
        monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        assert run(["segment", str(video), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert name in err or value in err, err
        monkeypatch.delenv(name)


def test_version(capsys) -> None:
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.startswith("stemseg 0.")


def test_a_real_process_prints_one_line_for_bad_values(video: Path, tmp_path: Path) -> None:
    for argv in (["segment", str(video), "--min-iou", "2"], ["segment", str(video), "--device", "bogus"],
                 ["synth", "--out", "x", "--videos", "0", "--seed", "1"]):
        p = subprocess.run([sys.executable, "-m", "service.cli", *argv], capture_output=True, text=True,
                           timeout=120, check=False, cwd=tmp_path)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_out_refuses_then_force_replaces_only_a_previous_output(video: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    args = ["segment", str(video), "--out", str(out), "--no-progress", "--format", "ytvis", "mots"]
    assert run(args) == 0
    first = (out / "results.json").read_bytes()
    assert run(args) == 2 and "--force" in capsys.readouterr().err  # a previous output: only with --force
    assert run([*args, "--force", "--format", "ytvis"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "stemseg-output.json"]
    assert (out / "results.json").read_bytes() == first
    (out / "mine.txt").write_text("added by the user")
    assert run([*args, "--force"]) == 2  # no longer only ours
    assert (out / "mine.txt").read_text() == "added by the user"


def test_out_creates_only_the_final_directory(video: Path, tmp_path: Path, capsys) -> None:
    deep = tmp_path / "missing" / "parent" / "out"
    assert run(["segment", str(video), "--out", str(deep), "--no-progress", "--format", "mots"]) == 2
    err = capsys.readouterr().err
    assert "parent" in err and str(deep.parent) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()  # nothing made, not even the first missing level
    assert run(["segment", str(video), "--out", str(tmp_path / "made"), "--no-progress", "--format", "mots"]) == 0
    assert (tmp_path / "made" / "mots.txt").is_file()


def test_default_formats_and_out_directory(video: Path, tmp_path: Path, monkeypatch) -> None:
    local = tmp_path / "clip.mp4"
    local.write_bytes(video.read_bytes())
    assert run(["segment", str(local), "--no-progress"]) == 0
    written = sorted(p.name for p in (tmp_path / "clip_stemseg").iterdir())
    assert written == ["davis", "mots.txt", "overlay.mp4", "results.json", "stemseg-output.json"]
    monkeypatch.setenv("STEMSEG_FORMATS", "mots")
    get_settings.cache_clear()
    assert run(["segment", str(local), "--no-progress", "--out", str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["mots.txt", "stemseg-output.json"]


def test_help_shows_the_default_formats(capsys) -> None:
    assert run(["segment", "--help"]) == 0
    assert "default: ytvis davis mots overlay" in " ".join(capsys.readouterr().out.split())


def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STEMSEG_")}
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *args],
                            env={**base, "OMP_NUM_THREADS": "1", **env}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_without_configuration_serves_the_shipped_model(tmp_path: Path, redis_prefix: str) -> None:
    pytest.importorskip("uvicorn", reason="the server extra is not installed")
    port = free_port()
    # Only where Redis is and a private key prefix: no weights, no preset.
    proc = _serve(tmp_path, "--port", str(port), "--with-worker", STEMSEG_REDIS_URL=REDIS_URL,
                  STEMSEG_REDIS_PREFIX=redis_prefix, STEMSEG_DATA_DIR=str(tmp_path / "data"))
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("env", [{"STEMSEG_REDIS_URL": "redis://127.0.0.1:1/0"},
                                 {"STEMSEG_REDIS_URL": "not-a-url"},
                                 {"STEMSEG_WEIGHTS": "davis", "STEMSEG_REDIS_URL": REDIS_URL},
                                 {"STEMSEG_WEIGHTS": "/no/such.pth", "STEMSEG_REDIS_URL": REDIS_URL},
                                 {"STEMSEG_CLIPS_PER_TASK": "lots"}])
def test_serve_misconfigured_one_line(tmp_path: Path, env: dict) -> None:
    pytest.importorskip("uvicorn", reason="the server extra is not installed")
    proc = _serve(tmp_path, "--port", str(free_port()), "--with-worker",
                  STEMSEG_WEIGHTS_DIR=str(tmp_path / "none"), **env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_serve_without_the_server_extra_one_line(tmp_path: Path) -> None:
    # A sitecustomize that hides uvicorn, as an install without [server] would.
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text("import sys\nsys.modules['uvicorn'] = None\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("STEMSEG_")}
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "service.cli", "serve"], capture_output=True, text=True, timeout=60,
                       env={**base, "PYTHONPATH": f"{tmp_path / 'hide'}:{root}"}, cwd=tmp_path, check=False)
    assert p.returncode == 2 and "stemseg-serve[server]" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert json.dumps(p.stderr).count("\\n") == 1


def test_settings_out_of_range_are_one_line_exit_2(tmp_path: Path) -> None:
    for name, value in (("STEMSEG_CLIPS_PER_TASK", "0"), ("STEMSEG_MAX_DELIVERIES", "0"),
                        ("STEMSEG_MAX_UPLOAD_BYTES", "-5"), ("STEMSEG_REDIS_TIMEOUT_S", "0"),
                        ("STEMSEG_CLIPS_PER_FORWARD", "0"), ("STEMSEG_WEBHOOK_ATTEMPTS", "0")):
        p = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--check"], capture_output=True, text=True,
                           timeout=120, check=False, cwd=tmp_path, env={**os.environ, name: value})
        assert p.returncode == 2 and "Traceback" not in p.stderr, (name, p.stderr)
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and name in p.stderr, p.stderr


@pytest.mark.parametrize("argv", [
    ["segment", "/no/such/video.mp4"],
    ["segment", "{video}", "--weights", "/no/such.pth"],
    ["segment", "{video}", "--out", "/no/such/dir/out"],
    ["bench", "{video}", "--weights", "/no/such.pth"],
    ["submit", "{video}"],
])
def test_mistakes_are_reported_before_torch_is_imported(video: Path, argv: list[str]) -> None:
    """What makes an error take seconds is importing torch first (`python bench/cli_errors.py` times them)."""
    argv = [a.format(video=video) for a in argv]
    code = ("import sys\nfrom service.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMSEG_")}
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, env=env,
                       check=False)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_the_shipped_model_warns_and_the_track_cap_is_said(tmp_path: Path, capsys, official_weights) -> None:
    """The sample has 21 tracks for lite's cap of 10: segment says both numbers, and that lite sees
    only synthetic shapes; bench counts tracks as segment does."""
    sample = Path(__file__).resolve().parents[1] / "examples" / "sample.mp4"
    assert run(["segment", str(sample), "--out", str(tmp_path / "o"), "--format", "ytvis", "--no-progress"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("stemseg: warning:")]
    assert len(warning) == 1 and "synthetic shapes" in warning[0] and "stemseg weights fetch" in warning[0]
    assert "10 tracks (the 11 shortest-lived of 21 cut by the preset's max_tracks=10)" in captured.out
    assert len(json.loads((tmp_path / "o" / "results.json").read_text())) == 10
    assert run(["bench", str(sample), "--min-dim", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tracks"] <= report["max_tracks"] == 10 and report["tracks_found"] >= report["tracks"]
    # An official-format model is not synthetic-only: no warning.
    assert run(["segment", str(sample), "--weights", str(official_weights("kitti_mots")), "--min-dim", "64",
                "--out", str(tmp_path / "k"), "--format", "ytvis", "--no-progress"]) == 0
    assert "stemseg: warning" not in capsys.readouterr().err
