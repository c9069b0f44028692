#!/usr/bin/env bash
# Train ddpm_jax on a GPU machine: install into a virtual environment with jax[cuda12], then train on all of this
# host's GPUs, or as one process of a multi-host run (one invocation per host). Logs go to a file; restarts after a
# failure are optional. The work is done by launch/worker.sh; see --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/gpu_host.sh COMMAND [options] [-- extra ddpm_jax flags...]

Commands:
  install   create the virtual environment (if missing) and install requirements.txt, the project and jax[cuda12]
  train     run python -m ddpm_jax.main --config=CONFIG --workdir=WORKDIR [extra flags] on this host's GPUs, with
            its output in RUN_DIR/train.log (and on the terminal unless --background). Running the same command
            again resumes from the latest checkpoint in WORKDIR.
  stop      stop a training run started here: it saves a checkpoint at the end of its step and exits
  status    print whether training runs here: running | finished | stopped | config-error | failed RC | ...
  logs      print the end of the log (--follow to keep printing)

Options (environment variable in brackets):
  --config FILE          config file, e.g. configs/cifar10.py [DDPM_CONFIG] (train, required)
  --workdir DIR          checkpoints, samples, TensorBoard files: a local or shared directory, or gs://BUCKET/PATH
                         (install with --gcs for that) [DDPM_WORKDIR] (train, required)
  --cuda KIND            cuda12 or cuda13: the JAX build, with NVIDIA's CUDA libraries from pip [DDPM_CUDA,
                         default cuda12]; the NVIDIA driver must be new enough for it (see nvidia-smi)
  --python PY            interpreter for the virtual environment (3.11 or newer), or a version such as 3.12 that
                         uv fetches [DDPM_PYTHON, default python3]
  --gcs                  install: also the [gcs] extra (gcsfs) for gs:// workdirs
  --venv DIR             virtual environment, relative to the repository root [DDPM_JAX_VENV, default .venv]
  --run-dir DIR          where train.log and the status files go [DDPM_RUN_DIR, default ~/ddpm_jax_run]
  --background           train: start in the background (nohup; survives logging out) and return at once
  --restarts N           train: restart up to N times after a failure (not after a configuration error, exit
                         code 2) [DDPM_RESTARTS, default 0]
  Several hosts (give all three, and run the same command on every host with its own --process-id):
  --coordinator HOST:PORT  address of process 0, reachable from every host [DDPM_COORDINATOR]
  --num-processes N        number of hosts [DDPM_NUM_PROCESSES]
  --process-id I           this host's number, 0 to N-1 [DDPM_PROCESS_ID]
  --lines N              logs: number of lines [default 100]
  --follow               logs: keep printing new lines
  --dry-run              print the commands, one per line, and run nothing
  -h, --help             this help
  -- FLAGS...            extra flags for ddpm_jax.main, e.g. --config.training.batch_size=256 [DDPM_FLAGS, split
                         on spaces; flags after -- come last]

Relative --workdir and --config paths are taken from the directory you run the command in.

Examples:
  bash launch/gpu_host.sh install
  bash launch/gpu_host.sh train --config configs/cifar10.py --workdir ~/runs/cifar10 --background --restarts 3
  bash launch/gpu_host.sh logs --follow
  # two hosts with 8 GPUs each (global batch split over all 16 GPUs); on host 0 (10.0.0.2) and on host 1:
  bash launch/gpu_host.sh train --config configs/cifar10.py --workdir gs://my-bucket/cifar10 \
      --coordinator 10.0.0.2:8476 --num-processes 2 --process-id 0
  bash launch/gpu_host.sh train --config configs/cifar10.py --workdir gs://my-bucket/cifar10 \
      --coordinator 10.0.0.2:8476 --num-processes 2 --process-id 1
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# An absolute path for a path given relative to the caller's directory; gs:// and other URLs stay as they are.
absolute() {
  case "$1" in
    /* | *://*) echo "$1" ;;
    "~"/*) echo "$HOME/${1#"~/"}" ;;
    *) echo "$PWD/$1" ;;
  esac
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
commands="install, train, stop, status, logs"
command="${1:-}"
case "$command" in
  -h | --help) usage; exit 0 ;;
  install | train | stop | status | logs) shift ;;
  "") die "no command given: use one of $commands (see --help)" ;;
  *) die "unknown command '$command': use one of $commands (see --help)" ;;
esac

config="${DDPM_CONFIG:-}"
workdir="${DDPM_WORKDIR:-}"
cuda="${DDPM_CUDA:-cuda12}"
python="${DDPM_PYTHON:-python3}"
venv="${DDPM_JAX_VENV:-.venv}"
run_dir="${DDPM_RUN_DIR:-$HOME/ddpm_jax_run}"
restarts="${DDPM_RESTARTS:-0}"
coordinator="${DDPM_COORDINATOR:-}"
num_processes="${DDPM_NUM_PROCESSES:-}"
process_id="${DDPM_PROCESS_ID:-}"
gcs=0
background=0
lines=100
follow=0
dry_run=0
extra=()
read -r -a extra <<<"${DDPM_FLAGS:-}"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --cuda) need_value "$@"; cuda="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --gcs) gcs=1; shift ;;
    --venv) need_value "$@"; venv="$2"; shift 2 ;;
    --run-dir) need_value "$@"; run_dir="$2"; shift 2 ;;
    --background) background=1; shift ;;
    --restarts) need_value "$@"; restarts="$2"; shift 2 ;;
    --coordinator) need_value "$@"; coordinator="$2"; shift 2 ;;
    --num-processes) need_value "$@"; num_processes="$2"; shift 2 ;;
    --process-id) need_value "$@"; process_id="$2"; shift 2 ;;
    --lines) need_value "$@"; lines="$2"; shift 2 ;;
    --follow) follow=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown option '$1' (see --help; flags for ddpm_jax go after --)" ;;
  esac
done

run_dir=$(absolute "$run_dir")
worker=(bash "$root/launch/worker.sh")
common=(--run-dir "$run_dir")
[ "$dry_run" = 0 ] || common+=(--dry-run)

case "$command" in
  install)
    case "$cuda" in
      cuda12 | cuda13) ;;
      *) die "--cuda must be cuda12 or cuda13, not '$cuda'" ;;
    esac
    args=(install --venv "$venv" --python "$python" --jax "$cuda")
    [ "$gcs" = 0 ] || args+=(--gcs)
    exec "${worker[@]}" "${args[@]}" "${common[@]}"
    ;;
  stop | status) exec "${worker[@]}" "$command" "${common[@]}" ;;
  logs)
    args=(logs --lines "$lines")
    [ "$follow" = 0 ] || args+=(--follow)
    exec "${worker[@]}" "${args[@]}" "${common[@]}"
    ;;
esac

# train
[ -n "$config" ] || die "--config (or DDPM_CONFIG) is required, e.g. --config configs/cifar10.py"
[ -n "$workdir" ] || die "--workdir (or DDPM_WORKDIR) is required: where checkpoints go, e.g. --workdir ~/runs/cifar10"
[[ "$restarts" =~ ^[0-9]+$ ]] || die "--restarts must be a whole number, not '$restarts'"
# A config path is looked up from the caller's directory first, then from the repository root (configs/NAME.py).
[ -f "$config" ] && config=$(absolute "$config")
[ -f "$config" ] || [ -f "$root/$config" ] || die "config file '$config' not found (here or in $root)"
workdir=$(absolute "$workdir")
distributed=()
if [ -n "$coordinator$num_processes$process_id" ]; then
  [ -n "$coordinator" ] && [ -n "$num_processes" ] && [ -n "$process_id" ] \
    || die "a multi-host run needs all of --coordinator HOST:PORT, --num-processes N and --process-id I"
  [[ "$coordinator" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, e.g. 10.0.0.2:8476, not '$coordinator'"
  [[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive whole number, not '$num_processes'"
  [[ "$process_id" =~ ^[0-9]+$ ]] && [ "$process_id" -lt "$num_processes" ] \
    || die "--process-id must be between 0 and $((num_processes - 1)), not '$process_id'"
  distributed=(--distributed --coordinator_address="$coordinator" --num_processes="$num_processes"
    --process_id="$process_id")
fi
cd "$root"
[ "$dry_run" = 0 ] || printf 'cd %q\n' "$root"
if [ "$dry_run" = 0 ] && [ ! -x "$venv/bin/python" ]; then
  die "no virtual environment at $root/$venv: run 'bash launch/gpu_host.sh install' first"
fi
args=(run)
[ "$background" = 0 ] || args=(start)
args+=(--restarts "$restarts")
exec "${worker[@]}" "${args[@]}" "${common[@]}" -- "$venv/bin/python" -m ddpm_jax.main --config="$config" \
  --workdir="$workdir" "${distributed[@]}" "${extra[@]}"
