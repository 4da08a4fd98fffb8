# syntax=docker/dockerfile:1
# API image (CPU): `stemseg serve`. Also runs a CPU-only worker (`stemseg worker`, compose profile `cpu`).
# Build from the repository root: docker build -f docker/api.Dockerfile -t stemseg-serve-api .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# No apt packages: the PyAV wheel bundles FFmpeg, and torch, numpy, scipy and pycocotools are wheels too.
RUN useradd --create-home --uid 10001 --user-group stemseg \
    && mkdir -p /data /weights \
    && chown stemseg:stemseg /data

WORKDIR /app

# Install exactly as CI does (tests/run.sh), with the same constraints (torch==2.13.0).
# torch first from the CPU-only index: PyPI's Linux wheel is the CUDA build (several GB of nvidia-* wheels);
# the second line then finds torch==2.13.0+cpu already satisfying the constraint and keeps it.
COPY pyproject.toml README.md ./
COPY .ci/constraints.txt .ci/constraints.txt
RUN pip install --no-cache-dir -c .ci/constraints.txt --index-url https://download.pytorch.org/whl/cpu torch
COPY service/ service/
COPY model_export/ model_export/
RUN pip install --no-cache-dir -c .ci/constraints.txt '.[server]' \
    && python -c "import torch, av, service.cli; assert not torch.version.cuda, torch.__version__"

# Uploads and results: mount a volume at /data that every API and worker container shares (a new named
# volume takes the directory's owner, uid 10001, from the image). Weights are bind-mounted read-only.
ENV STEMSEG_DATA_DIR=/data \
    STEMSEG_DEVICE=cpu

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["stemseg", "serve", "--host", "0.0.0.0", "--port", "8000"]
