# syntax=docker/dockerfile:1
# API image (CPU torch): `stemseg serve`; also the CPU-only worker (`stemseg worker`, compose profile `cpu`).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t stemseg-serve-api .
# Without registry access, on the bases deploy/local-bases.sh makes (the README's "Deployment" section):
#   podman build -f docker/api.Dockerfile --build-arg BASE_IMAGE=localhost/stemseg-base/python:3.11-bookworm \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg PIP_FIND_LINKS=/wheels \
#       --volume /opt/wheels:/wheels:ro -t stemseg-serve-api .      (deploy/smoke.sh does this)
# BASE_IMAGE: any Debian-family image with python3 (>= 3.11) and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A venv, so the same steps work on the official image (Python in /usr/local) and on Debian's python3
# (externally managed, PEP 668). No apt packages: the PyAV wheel bundles FFmpeg, and torch, numpy, scipy and
# pycocotools are wheels too.
RUN python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group stemseg \
    && mkdir -p /data /weights \
    && chown stemseg:stemseg /data

WORKDIR /app

# torch first, alone, from the CPU-only index: PyPI's Linux wheel is the CUDA build (several GB of nvidia-*
# wheels); the package install below then finds torch==2.13.0+cpu satisfying CI's constraint and keeps it.
# Build-time only, unset by default: PIP_FIND_LINKS, a directory of wheels mounted at build time that stands in
# for that index; PIP_CERT, a CA bundle for a TLS-intercepting proxy (neither stays in the image).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
ARG PIP_CERT
COPY .ci/constraints.txt .ci/constraints.txt
# Its C++ headers and test binaries (~150 MB) serve only compiling extensions and torch's own tests.
RUN pip install --no-cache-dir -c .ci/constraints.txt --index-url "${TORCH_INDEX_URL}" torch \
    && python -c "import torch; assert not torch.version.cuda, torch.__version__" \
    && rm -rf /opt/venv/lib/python3*/site-packages/torch/include /opt/venv/lib/python3*/site-packages/torch/test

# The shipped lite model (8 MB) and its card are in the image, so a container with no weights mounted
# serves it; official checkpoints are mounted at /weights and named by STEMSEG_WEIGHTS. Copied before the
# install, where the package may take them as package data.
COPY weights/lite.safetensors weights/MODEL_CARD.md weights/

# The whole package (pyproject's packages: service, model_export), installed like CI installs it.
COPY pyproject.toml README.md ./
COPY service/ service/
COPY model_export/ model_export/
RUN pip install --no-cache-dir -c .ci/constraints.txt '.[server,s3]' \
    && python -c "import torch, av, fastapi, redis, service.cli; assert not torch.version.cuda, torch.__version__"

# /data: uploads and results, a volume every API and worker container shares (a new named volume takes the
# directory's owner, uid 10001, from the image).
ENV STEMSEG_DATA_DIR=/data \
    STEMSEG_WEIGHTS=/app/weights/lite.safetensors \
    STEMSEG_DEVICE=cpu

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["stemseg", "serve", "--host", "0.0.0.0", "--port", "8000"]
