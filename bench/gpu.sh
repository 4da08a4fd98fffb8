#!/usr/bin/env bash
# The GPU measurements, one command: `bash bench/gpu.sh` on a machine with one NVIDIA GPU
# (<= 8 min on an H100), `bash bench/gpu.sh --dry-run` anywhere (CPU, tiny sizes; CI runs it).
# Writes one JSON report into $OUT (default bench/out/): gpu_report.json or gpu_report_dry_run.json.
#
# On the device machine: run bench/fetch_device_deps.sh here first, then carry bench/.deps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/out}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Packages the device image lacks (bench/fetch_device_deps.sh made them; carry bench/.deps).
if [ -f bench/.deps/site.tar.xz ] && ! "$PY" -c "import av, pydantic_settings" 2>/dev/null; then
    mkdir -p /tmp/stemseg-site && tar -C /tmp/stemseg-site -xJf bench/.deps/site.tar.xz
    export PYTHONPATH="/tmp/stemseg-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -x bench/.deps/redis/redis-server ] && ! command -v redis-server >/dev/null; then
    export PATH="$PWD/bench/.deps/redis:$PATH" LD_LIBRARY_PATH="$PWD/bench/.deps/redis${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_bench.py --out "$OUT" "$@"
