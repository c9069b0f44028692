#!/usr/bin/env bash
# The GPU check in one command, for an H100/H200 host (under 8 minutes there):
#   bash benchmarks/gpu_check.sh [--dry_run] [--out DIR] [--quickstart_data DIR]
# Uses $DDPM_JAX_PYTHON, else ./.venv/bin/python, in which jax must see the GPU: `bash launch/gpu_host.sh install`
# makes that .venv (jax[cuda12]). --dry_run checks the script on any device (CI runs it on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${DDPM_JAX_PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
  echo "error: no Python at $python; run 'bash launch/gpu_host.sh install' once or set DDPM_JAX_PYTHON" >&2
  exit 2
fi
# The numbers of a GPU run mean what they say only with the whole device: no preallocation, one process at a time.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$python" benchmarks/gpu_check.py "$@"
