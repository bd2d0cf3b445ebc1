#!/usr/bin/env bash
# Install (if needed) and run the whole test suite on the CPU.
#   bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TIKTOKEN_CACHE_DIR=""
exec python -m pytest -q "$@"
