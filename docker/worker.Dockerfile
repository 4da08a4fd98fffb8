# syntax=docker/dockerfile:1
# GPU worker image: `stemseg worker` takes clip tasks from Redis and runs the network on CUDA.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t stemseg-serve-worker .
#
# Host: an NVIDIA driver >= 580.65.06 (CUDA 13.0; the base image's NVIDIA_REQUIRE_CUDA makes the NVIDIA
# Container Toolkit refuse to start the container on an older one) and the NVIDIA Container Toolkit.
#
# CUDA 13.0 throughout, every GPU package pinned in docker/gpu-constraints.txt: torch 2.13.0 (PyPI's Linux
# wheel, CUDA 13.0.3 runtime and cuDNN 9.20 as nvidia-* wheels), onnxruntime-gpu 1.31.1 (CUDA 13 / cuDNN 9
# build) and TensorRT 11.4 (tensorrt-cu13, its libraries as a wheel from NVIDIA's index). The CUDA
# user-space libraries therefore come from those wheels, once, and the base is NVIDIA's `base` flavour
# (no toolkit or cuDNN of its own, which would be a second multi-GB copy); ldconfig is pointed at the wheels' lib directories so ONNX
# Runtime's CUDA provider finds cuBLAS/cuDNN whether or not torch was imported first.
# BASE_IMAGE: any Ubuntu/Debian image with Python >= 3.11 available as python3 (+ python3-venv from apt).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python is 3.12 (the package needs >= 3.11). A venv, since the system Python is externally
# managed (PEP 668). Versions come from the pinned base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group stemseg \
    && mkdir -p /data /weights \
    && chown stemseg:stemseg /data

WORKDIR /app

# The heavy, rarely changing layer first: the pinned GPU stack alone. TensorRT's library wheel
# (tensorrt-cu13-libs) is only on NVIDIA's index; PyPI has a stub sdist that fails without it.
# PIP_CERT (build-time only, unset by default): a CA bundle for a TLS-intercepting proxy.
ARG NVIDIA_INDEX_URL=https://pypi.nvidia.com
ARG PIP_CERT
COPY .ci/constraints.txt .ci/constraints.txt
COPY docker/gpu-constraints.txt docker/gpu-constraints.txt
RUN pip install --no-cache-dir -c .ci/constraints.txt -c docker/gpu-constraints.txt \
        --extra-index-url "${NVIDIA_INDEX_URL}" torch onnxruntime-gpu tensorrt \
    && python -c "import sys, pathlib, nvidia; \
print('\n'.join(sorted({str(p.parent) for d in nvidia.__path__ for p in pathlib.Path(d).glob('**/lib/*.so*')})))" \
       > /etc/ld.so.conf.d/nvidia-wheels.conf \
    && ldconfig

# The shipped lite model (8 MB) and its card are in the image, so a container with no weights mounted
# serves it; official checkpoints are mounted at /weights and named by STEMSEG_WEIGHTS. Copied before the
# install, where the package may take them as package data.
COPY weights/lite.safetensors weights/MODEL_CARD.md weights/

# The whole package (pyproject's packages: service, model_export), installed like CI installs it.
COPY pyproject.toml README.md ./
COPY service/ service/
COPY model_export/ model_export/
RUN pip install --no-cache-dir -c .ci/constraints.txt -c docker/gpu-constraints.txt \
        --extra-index-url "${NVIDIA_INDEX_URL}" '.[server,gpu,s3]' \
    && python -c "import torch, av, tensorrt, onnxruntime, service.cli; assert torch.version.cuda, torch.__version__"

ENV STEMSEG_DATA_DIR=/data \
    STEMSEG_WEIGHTS=/app/weights/lite.safetensors \
    STEMSEG_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001

# Exits 0 when Redis answers (the worker's liveness in the queue is its heartbeat, seen by /readyz).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["stemseg", "worker", "--check"]

CMD ["stemseg", "worker"]
