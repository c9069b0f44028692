#!/usr/bin/env bash
# Runs on the training machine itself (a TPU VM worker or a GPU host): installs ddpm_jax into a virtual environment,
# and runs a training command with a log file, a status file and optional restarts. launch/tpu_vm.sh calls it over
# ssh on every TPU worker; launch/gpu_host.sh calls it on the host. See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/worker.sh COMMAND [options] [-- TRAIN COMMAND...]

Runs on the machine that trains. Commands:
  install   create the virtual environment (if missing) and pip install ddpm_jax with JAX for the accelerator
  run       run TRAIN COMMAND in the foreground; its output goes to RUN_DIR/train.log and to the terminal
  start     the same as run, in the background (nohup + setsid, so closing ssh does not stop it); returns at once
  stop      send SIGTERM to training (it saves a checkpoint and exits), then wait for the run to end
  status    print one line: running | finished | stopped | stopped-by-user | config-error | failed RC | not-started
  logs      print the end of RUN_DIR/train.log

Options (environment variable in brackets):
  --venv DIR         virtual environment, relative to the repository root [DDPM_JAX_VENV, default .venv]
  --python PY        install: an interpreter (python3, /usr/bin/python3.12) for 'python -m venv', or a version
                     such as 3.12 that uv fetches (TPU VM images ship Python 3.10; JAX needs 3.11+)
                     [DDPM_PYTHON, default python3]
  --jax KIND         install: tpu | cuda12 | cuda13 | cpu, the JAX build to install [DDPM_JAX_KIND, default cpu]
  --gcs              install: also the [gcs] extra (gcsfs), needed for gs:// workdirs
  --run-dir DIR      where train.log, status and pid files live [DDPM_RUN_DIR, default ~/ddpm_jax_run]
  --restarts N       run/start: restart TRAIN COMMAND up to N times when it fails (exit code other than 0 and 2;
                     code 2 is a configuration error that a restart cannot fix) [DDPM_RESTARTS, default 0]
  --restart-delay S  seconds between a failure and the restart [default 30]
  --replace          start: stop a run that is still going first, instead of refusing
  --timeout S        stop: seconds to wait for the checkpoint and exit [default 600]
  -n, --lines N      logs: number of lines [default 100]
  -f, --follow       logs: keep printing new lines
  --dry-run          print the commands, one per line, and run nothing
  -h, --help         this help

A run that exits with code 0 is finished, unless it was stopped by a signal (training logs 'stopped at step N';
it resumes from that checkpoint when started again). Training runs in its own session: Ctrl-C or a closed
terminal reach it as one SIGTERM from this script. A SIGTERM to this script is not passed on, because at a
shutdown (a preemption) training gets its own and a second one would stop it before its checkpoint.

Example:
  bash launch/worker.sh install --jax cuda12
  bash launch/worker.sh start --restarts 3 -- .venv/bin/python -m ddpm_jax.main \
      --config=configs/cifar10.py --workdir=/data/runs/cifar10
  bash launch/worker.sh logs --follow
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command="${1:-}"
case "$command" in
  -h | --help) usage; exit 0 ;;
  install | run | start | stop | status | logs) shift ;;
  "") die "no command given: use one of install, run, start, stop, status, logs (see --help)" ;;
  *) die "unknown command '$command': use one of install, run, start, stop, status, logs (see --help)" ;;
esac

venv="${DDPM_JAX_VENV:-.venv}"
python="${DDPM_PYTHON:-python3}"
jax_kind="${DDPM_JAX_KIND:-cpu}"
gcs=0
run_dir="${DDPM_RUN_DIR:-$HOME/ddpm_jax_run}"
restarts="${DDPM_RESTARTS:-0}"
restart_delay=30
replace=0
timeout=600
lines=100
follow=0
dry_run=0
train_cmd=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --venv) need_value "$@"; venv="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --jax) need_value "$@"; jax_kind="$2"; shift 2 ;;
    --gcs) gcs=1; shift ;;
    --run-dir) need_value "$@"; run_dir="$2"; shift 2 ;;
    --restarts) need_value "$@"; restarts="$2"; shift 2 ;;
    --restart-delay) need_value "$@"; restart_delay="$2"; shift 2 ;;
    --replace) replace=1; shift ;;
    --timeout) need_value "$@"; timeout="$2"; shift 2 ;;
    -n | --lines) need_value "$@"; lines="$2"; shift 2 ;;
    -f | --follow) follow=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_cmd=("$@"); break ;;
    *) die "unknown option '$1' for '$command' (see --help)" ;;
  esac
done
for number in "$restarts" "$restart_delay" "$timeout" "$lines"; do
  [[ "$number" =~ ^[0-9]+$ ]] || die "'$number' is not a whole number (options --restarts, --restart-delay, --timeout, --lines)"
done

case "$run_dir" in /*) ;; *) run_dir="$PWD/$run_dir" ;; esac
log="$run_dir/train.log"
status_file="$run_dir/status"
loop_pid_file="$run_dir/run.pid"
child_pid_file="$run_dir/train.pid"
stop_marker="$run_dir/stop-requested"

# The pid of a run that is still going, or nothing.
running_pid() {
  local pid
  pid=$(cat "$loop_pid_file" 2>/dev/null) || return 0
  # A pid file left behind by a crashed machine may name an unrelated process since, and a run that has just
  # ended may linger as a zombie until its parent reaps it: check what the process runs.
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    if [ ! -r "/proc/$pid/cmdline" ] || tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "worker.sh run"; then
      echo "$pid"
    fi
  fi
}

do_install() {
  run cd "$root"
  local jax_spec=() project_spec=(-e .)
  case "$jax_kind" in
    tpu | cuda12 | cuda13) jax_spec=("jax[$jax_kind]") ;;
    cpu) ;;
    *) die "--jax must be tpu, cuda12, cuda13 or cpu, not '$jax_kind'" ;;
  esac
  if [ "$gcs" = 1 ]; then project_spec=(-e ".[gcs]"); fi
  if [ -x "$venv/bin/python" ]; then
    echo "# reusing the virtual environment $venv"
  elif [[ "$python" =~ ^3\.[0-9]+$ ]]; then
    # Ubuntu 22.04 (TPU VM images) has Python 3.10 and JAX needs 3.11+: uv downloads a standalone Python.
    # PIP_BREAK_SYSTEM_PACKAGES lets a --user install through on distributions that mark their Python as managed.
    run env PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet --upgrade uv
    run python3 -m uv venv --seed --python "$python" "$venv"
  else
    if [ "$dry_run" = 0 ] && ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      die "$python is missing or older than Python 3.11, which JAX needs: pass --python 3.12 to fetch one with uv"
    fi
    run "$python" -m venv "$venv"
  fi
  run "$venv/bin/python" -m pip install --quiet --upgrade pip
  run "$venv/bin/python" -m pip install --quiet -r requirements.txt "${project_spec[@]}" "${jax_spec[@]}"
  run "$venv/bin/python" -c 'import jax, ddpm_jax; print("ddpm_jax installed with jax", jax.__version__)'
}

# The foreground loop: runs the command, classifies how it ended, restarts failures, writes the status file.
do_run() {
  [ "${#train_cmd[@]}" -gt 0 ] || die "$command needs the training command after '--' (see --help)"
  if [ "$dry_run" = 1 ]; then
    show mkdir -p "$run_dir"
    show "${train_cmd[@]}"
    echo "# output appended to $log; restarts on failure: $restarts"
    return 0
  fi
  mkdir -p "$run_dir"
  local other
  other=$(running_pid)
  [ -z "$other" ] || die "a run is already going in $run_dir (pid $other): stop it with 'bash launch/worker.sh stop'"
  echo $$ >"$loop_pid_file"
  rm -f "$status_file" "$stop_marker"
  touch "$log"
  export PYTHONUNBUFFERED=1

  local child="" signalled=0 attempt=0 rc=0 start_bytes outcome tail_pid=""
  # The child runs in its own session, so Ctrl-C and a closed terminal reach only this loop: they are passed on
  # as one SIGTERM (training then checkpoints and stops; a second Ctrl-C stops it at once). A SIGTERM is not passed
  # on: at shutdown (a preemption) the child gets its own, and a second one would make it stop before its
  # checkpoint. `worker.sh stop` signals the child itself.
  pass_on() { if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi; }
  trap 'signalled=1; pass_on' INT HUP
  trap 'signalled=1' TERM
  if [ -t 1 ]; then
    tail -n 0 -F "$log" 2>/dev/null &
    tail_pid=$!
  fi
  while :; do
    start_bytes=$(wc -c <"$log" 2>/dev/null || echo 0)
    echo "=== $(date -u +%FT%TZ) attempt $((attempt + 1)) on $(hostname): $(show "${train_cmd[@]}")" >>"$log"
    setsid "${train_cmd[@]}" >>"$log" 2>&1 </dev/null &
    child=$!
    echo "$child" >"$child_pid_file"
    # A trapped signal interrupts `wait`; keep waiting until the child has really exited, then read its status.
    wait "$child" || true
    while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
    rc=0
    wait "$child" || rc=$?
    child=""
    if [ -f "$stop_marker" ]; then
      outcome=stopped-by-user
    elif [ "$signalled" = 1 ]; then
      outcome=stopped
    elif [ "$rc" = 0 ]; then
      outcome=finished
      # Training that receives SIGTERM directly (e.g. a preemption notice) checkpoints, logs this and exits 0.
      if tail -c "+$((start_bytes + 1))" "$log" | grep -q "stopped at step"; then outcome=stopped; fi
    elif [ "$rc" = 2 ]; then
      outcome=config-error
    else
      outcome="failed $rc"
      if [ "$attempt" -lt "$restarts" ]; then
        attempt=$((attempt + 1))
        echo "=== exit code $rc; restart $attempt of $restarts in ${restart_delay}s" >>"$log"
        # Short sleeps, so that `stop` or a signal during the delay is noticed at once.
        local tenths=$((restart_delay * 10))
        while [ "$tenths" -gt 0 ] && [ "$signalled" = 0 ] && [ ! -f "$stop_marker" ]; do
          sleep 0.1
          tenths=$((tenths - 1))
        done
        if [ -f "$stop_marker" ]; then
          outcome=stopped-by-user
        elif [ "$signalled" = 1 ]; then
          outcome=stopped
        else
          continue
        fi
      fi
    fi
    break
  done
  echo "=== $(date -u +%FT%TZ) $outcome (exit code $rc)" >>"$log"
  echo "$outcome" >"$status_file"
  rm -f "$loop_pid_file" "$child_pid_file"
  if [ -n "$tail_pid" ]; then
    sleep 1
    kill "$tail_pid" 2>/dev/null || true
  fi
  case "$outcome" in
    finished | stopped*) return 0 ;;
    *) exit "$rc" ;;
  esac
}

do_start() {
  [ "${#train_cmd[@]}" -gt 0 ] || die "start needs the training command after '--' (see --help)"
  local loop=(bash "$root/launch/worker.sh" run --run-dir "$run_dir" --restarts "$restarts"
    --restart-delay "$restart_delay" -- "${train_cmd[@]}")
  if [ "$dry_run" = 1 ]; then
    [ "$replace" = 1 ] && show bash "$root/launch/worker.sh" stop --run-dir "$run_dir" --timeout "$timeout"
    show mkdir -p "$run_dir"
    show nohup setsid "${loop[@]}"
    echo "# in the background, output to $log"
    return 0
  fi
  local other
  other=$(running_pid)
  if [ -n "$other" ]; then
    [ "$replace" = 1 ] || die "a run is already going in $run_dir (pid $other): stop it first, or pass --replace"
    do_stop
  fi
  mkdir -p "$run_dir"
  rm -f "$status_file"
  nohup setsid "${loop[@]}" >/dev/null 2>&1 </dev/null &
  local waited=0
  while [ ! -f "$loop_pid_file" ] && [ ! -f "$status_file" ] && [ "$waited" -lt 100 ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "started on $(hostname): $(do_status); log: $log"
}

do_stop() {
  local pid
  pid=$(running_pid)
  if [ -z "$pid" ]; then
    echo "not running on $(hostname)"
    return 0
  fi
  if [ "$dry_run" = 1 ]; then
    show touch "$stop_marker"
    show kill -TERM "$(cat "$child_pid_file" 2>/dev/null || echo "$pid")"
    return 0
  fi
  touch "$stop_marker"
  # Training gets one SIGTERM; between restarts there is no training, and the loop itself is stopped.
  local child
  child=$(cat "$child_pid_file" 2>/dev/null || true)
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child"
  else
    kill -TERM "$pid"
  fi
  local deadline=$((SECONDS + timeout))
  while [ -n "$(running_pid)" ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "the run (pid $pid) is still going after ${timeout}s; kill -KILL $(cat "$child_pid_file" 2>/dev/null) $pid"
    sleep 0.2
  done
  echo "stopped on $(hostname): $(cat "$status_file" 2>/dev/null || echo unknown)"
}

do_status() {
  local pid
  pid=$(running_pid)
  if [ -n "$pid" ]; then
    echo "running (pid $pid)"
  elif [ -f "$status_file" ]; then
    cat "$status_file"
  else
    echo not-started
  fi
}

do_logs() {
  [ -f "$log" ] || [ "$dry_run" = 1 ] || die "no log yet at $log on $(hostname)"
  if [ "$follow" = 1 ]; then
    run tail -n "$lines" -F "$log"
  else
    run tail -n "$lines" "$log"
  fi
}

case "$command" in
  install) do_install ;;
  run) do_run ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  logs) do_logs ;;
esac
