#!/usr/bin/env bash
# Smoke test of the real deployment: local base images, the API/CPU-worker image, the compose stack's `cpu`
# profile under podman-compose, one job end to end with a worker restart mid-job, then `down -v`.
# See deploy/smoke.py for the checks. Needs root, podman and runc (README, "Deployment"); not part of
# .ci/run (a cold run builds images for minutes). Arguments go to deploy/smoke.py (e.g. --keep, --frames N).
#
#   bash deploy/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

bash deploy/local-bases.sh

# podman-compose from PyPI into a cached venv, unless one is on PATH.
if ! pc=$(command -v podman-compose); then
  venv=${XDG_CACHE_HOME:-$HOME/.cache}/stemseg-deploy/venv
  [[ -x $venv/bin/podman-compose ]] || { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet podman-compose; }
  pc=$venv/bin/podman-compose
fi

args=(--podman-compose "$pc")
# torch's CPU wheel: from a local wheel directory when the PyTorch index is unreachable (pip's find-links).
links=${STEMSEG_WHEELS:-$(pip config get global.find-links 2>/dev/null || true)}
if [[ -n $links ]] && compgen -G "$links/torch-*+cpu-*.whl" >/dev/null; then args+=(--wheels "$links"); fi
# pip inside the build trusts the host's CA bundle (a TLS-intercepting proxy's CA is in it).
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[[ -f $ca ]] && args+=(--ca-bundle "$ca")

python3 deploy/smoke.py "${args[@]}" "$@"
echo "smoke test wall time: $(( $(date +%s) - start ))s"
