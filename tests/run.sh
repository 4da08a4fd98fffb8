#!/usr/bin/env bash
# Set up a virtual environment with the CPU build of torch and run the whole test suite.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k reference`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -c .ci/constraints.txt -e '.[test,export,server,eval]'
exec .venv/bin/python -m pytest "$@"
