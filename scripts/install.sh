#!/usr/bin/env bash
# Install llamafactory-moe (editable) into the active virtualenv (or ./.venv, created if none is active) with the tested
# stack pinned by constraints.txt: torch 2.14.1 (+ the matching torchaudio that LLaMA-Factory hard-imports),
# transformers 4.57.6, peft 0.18.1, llamafactory 0.9.5, opencompass 0.5.4, deepspeed 0.19.8. No native build.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
start=$SECONDS
python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[eval,deepspeed,test,demo]"
python -c "import llamafactory_moe, llamafactory, peft, opencompass, deepspeed; print('llamafactory-moe installed')"
echo "install took $((SECONDS - start)) s ($(python -c 'import sys; print(sys.prefix)'))"
