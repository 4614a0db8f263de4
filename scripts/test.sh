#!/usr/bin/env bash
# Install, then run the whole test-suite (CPU, offline; ~30 min on 2 cores) in the active virtualenv (or ./.venv).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
bash scripts/install.sh
. scripts/_browser.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
