#!/usr/bin/env bash
# Quickstart on any Linux machine (CPU is enough): install ddpm_jax into ./.venv, fetch Fashion-MNIST from
# Debian's archive (offline-friendly, no hub download), train configs/quickstart.py, then sample from it.
#
#   bash launch/quickstart.sh [WORKDIR] [extra --config.KEY=VALUE flags...]
#
# Running it again resumes training from the latest checkpoint in WORKDIR (default: ./workdir/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."

workdir="${1:-workdir/quickstart}"
shift || true
venv="${DDPM_JAX_VENV:-.venv}"
data=/usr/share/datasets/fashion-mnist

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements.txt -e .

if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST from Debian (package dataset-fashion-mnist)..."
    apt-get install -y -qq dataset-fashion-mnist >/dev/null || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
  else
    echo "error: Fashion-MNIST not found under $data. Install it with 'sudo apt-get install dataset-fashion-mnist'," >&2
    echo "       or train on your own images: bash launch/quickstart.sh $workdir --config.data.dataset=/path/to/images" >&2
    exit 2
  fi
fi

"$venv/bin/python" -m ddpm_jax.main --config=configs/quickstart.py --workdir="$workdir" "$@"
"$venv/bin/python" -m ddpm_jax.main --config=configs/quickstart.py --workdir="$workdir" --mode=sample "$@"
