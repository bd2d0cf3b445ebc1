#!/usr/bin/env bash
# Create ./.venv (once) and install abmll with its test extras into it. Safe to rerun.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# torch first and pinned: on a CPU machine an unpinned torch pulls several GB of CUDA wheels.
python -c "import torch" 2>/dev/null || { echo "[setup] installing torch==2.13.0"; pip install -q torch==2.13.0; }
echo "[setup] installing abmll (torchtune==0.6.1, torchao==0.15.0, ...) and test extras"
pip install -q -e ".[dev]"
