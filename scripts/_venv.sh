# Sourced by install.sh, test.sh and demo.sh: run inside the active virtualenv or conda environment; with none active,
# create ./.venv (python3 -m venv) once and use it. The machine's own interpreter is never installed into.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "llamafactory-moe: no virtualenv is active; creating ./.venv (python3 -m venv .venv)"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  echo "llamafactory-moe: using ./.venv; in your shell run \`. .venv/bin/activate\` to use llamafactory-cli from it"
fi
