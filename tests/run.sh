#!/usr/bin/env bash
# The test command: install ddpm_jax and its test tools into a virtual environment, then run the whole suite.
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DDPM_JAX_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements-dev.txt -e .
"$venv/bin/python" -m ruff check ddpm_jax tests configs notebooks benchmarks
exec "$venv/bin/python" -m pytest -q --durations=15 "$@" tests
