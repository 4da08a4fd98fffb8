#!/usr/bin/env bash
# Run the test suite in its own virtual environment, .venv-test (STEMSEG_TEST_VENV chooses another),
# so the environment the README's install made (.venv) or any of yours keeps its torch.
# The test environment gets the CPU build of torch from PyTorch's CPU wheel index (STEMSEG_TORCH_INDEX
# for a mirror), pinned by .ci/constraints.txt, once: later runs keep the torch it has.
# It lints first (ruff, configured in pyproject.toml; its version pinned by .ci/constraints.txt), then
# runs pytest; extra arguments go to pytest (e.g. `bash tests/run.sh -k reference`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${STEMSEG_TEST_VENV:-.venv-test}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # Only torch from this index (--no-deps): its dependencies come from PyPI with the project's.
  "$venv"/bin/pip install --quiet --retries 2 --no-deps -c .ci/constraints.txt torch \
    --index-url "${STEMSEG_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
"$venv"/bin/pip install --quiet -c .ci/constraints.txt -e '.[test,export,server,eval]'
"$venv/bin/ruff" check service model_export tests bench
exec "$venv/bin/python" -m pytest "$@"
