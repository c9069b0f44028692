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
# One worker per core (at most 4), each taking whole test files, so a file's shared fixtures are made once per worker.
exec "$venv/bin/python" -m pytest -q -n auto --maxprocesses=4 --dist loadfile --durations=15 "$@" tests
