# syntax=docker/dockerfile:1
# GPU worker image: `stemseg worker` takes clip tasks from Redis and runs the network on CUDA.
# Build from the repository root: docker build -f docker/worker.Dockerfile -t stemseg-serve-worker .
# Needs the NVIDIA Container Toolkit on the host and a driver for CUDA 13.
#
# CUDA 13 throughout: torch 2.13.0's Linux wheel on PyPI is built for CUDA 13 (it brings its own
# nvidia-* runtime wheels), onnxruntime-gpu (>=1.24) and the `tensorrt` metapackage (11.x -> tensorrt-cu13)
# are CUDA 13 builds. The base image supplies the CUDA 13 runtime and cuDNN 9 that ONNX Runtime's CUDA and
# TensorRT providers load (`stemseg segment --engine onnxruntime|tensorrt`).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python is 3.12 (the package needs >= 3.11). A venv, since the system Python is
# externally managed (PEP 668). Versions come from the pinned base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group stemseg \
    && mkdir -p /data /weights \
    && chown stemseg:stemseg /data

WORKDIR /app

# Same constraints file as CI (torch==2.13.0); here torch comes from PyPI, i.e. the CUDA build.
COPY pyproject.toml README.md ./
COPY .ci/constraints.txt .ci/constraints.txt
COPY service/ service/
COPY model_export/ model_export/
RUN pip install --no-cache-dir -c .ci/constraints.txt '.[server,gpu]' \
    && python -c "import torch, av, tensorrt, onnxruntime, service.cli; assert torch.version.cuda, torch.__version__"

ENV STEMSEG_DATA_DIR=/data \
    STEMSEG_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001

# Exits 0 when Redis answers (the worker's liveness in the queue is its heartbeat, seen by /readyz).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["stemseg", "worker", "--check"]

CMD ["stemseg", "worker"]
