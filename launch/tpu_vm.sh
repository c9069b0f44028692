#!/usr/bin/env bash
# Train ddpm_jax on a Cloud TPU VM or pod slice from your own machine: create the TPU, install the project on every
# worker, train with a gs:// workdir in the background, follow the log, watch for preemption (recreate the TPU and
# resume from the latest checkpoint), delete. Every command runs gcloud here; --dry-run prints the commands instead.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/tpu_vm.sh COMMAND [options] [-- extra ddpm_jax flags...]

Commands:
  create    create the TPU VM or pod slice and wait until it is READY
  install   copy this checkout (or git clone --repo) to every worker and install it there: a virtual environment
            with Python 3.12, requirements.txt, the project with its [gcs] extra, and jax[tpu]
  train     start training on every worker (--worker=all), in the background so that ssh may disconnect:
              python -m ddpm_jax.main --config=CONFIG --workdir=gs://... --distributed [extra flags]
            Starting it again after a stop or a preemption resumes from the latest checkpoint in the workdir.
  logs      follow the training log of one worker (Ctrl-C stops following, not training)
  status    the TPU's state and the training status on every worker
  stop      stop training on every worker: each saves a checkpoint at the end of its step and exits
  watch     keep the run going: every --poll seconds, check the TPU and the workers. A missing, PREEMPTED or
            TERMINATED TPU (queued: SUSPENDED or FAILED) is deleted and created again, then install and train
            run again with the same command, and training resumes from the latest checkpoint in the bucket.
            A worker whose training failed is restarted (at most --max-restarts times). Stops when training has
            finished, after 'stop', or on a configuration error. With no TPU yet, watch creates it: it is
            create + install + train + recovery in one command.
  delete    delete the TPU (the gs:// workdir stays)

Options (environment variable in brackets):
  --name NAME          TPU name [TPU_NAME] (required)
  --zone ZONE          zone, e.g. us-central2-b (v4), us-west4-a (v5e), europe-west4-a [TPU_ZONE] (required)
  --project PROJECT    Google Cloud project [TPU_PROJECT, default: gcloud's configured project]
  --accelerator TYPE   v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ... [TPU_ACCELERATOR, default v4-8]
  --runtime VERSION    TPU software version [TPU_RUNTIME, default from the accelerator: tpu-ubuntu2204-base for
                       v2-v4, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e]
  --spot               create a Spot TPU: much cheaper, can be preempted at any time [TPU_SPOT=1]
  --preemptible        create a preemptible TPU (the older kind of Spot; not with --queued) [TPU_PREEMPTIBLE=1]
  --queued             create through a queued resource, which waits for capacity instead of failing
                       (gcloud compute tpus queued-resources; the queued resource is named like the TPU) [TPU_QUEUED=1]
  --config FILE        config file in the repository, e.g. configs/butterflies.py [DDPM_CONFIG] (train, watch)
  --workdir URL        gs://BUCKET/PATH for checkpoints, samples and TensorBoard files [DDPM_WORKDIR] (train,
                       watch). It must be a bucket: a TPU VM's disk is lost when it is preempted or deleted.
  --repo URL           install from this git repository instead of copying this checkout [DDPM_REPO]
  --ref REF            with --repo: branch, tag or commit [DDPM_REF, default HEAD]
  --python VERSION     Python for the workers' virtual environment, fetched with uv [DDPM_PYTHON, default 3.12]
  --worker N|all       logs: which worker [default 0]
  --lines N            logs: lines of history to show first [default 100]
  --poll SECONDS       watch: seconds between checks [TPU_POLL, default 60]
  --max-restarts N     watch: restarts after failed training (preemptions do not count) [TPU_MAX_RESTARTS,
                       default 3]
  --delete-when-done   watch: delete the TPU once training has finished
  --yes                delete: do not ask for confirmation
  --dry-run            print the commands, one per line, and run nothing (gcloud is not needed)
  -h, --help           this help
  -- FLAGS...          extra flags for ddpm_jax.main, e.g. --config.training.batch_size=256 [DDPM_FLAGS, split
                       on spaces; flags after -- come last]

Example (a Spot v4-8 training the butterflies into a bucket, recreated after every preemption):
  export TPU_NAME=ddpm-v4 TPU_ZONE=us-central2-b DDPM_WORKDIR=gs://my-bucket/ddpm/butterflies
  bash launch/tpu_vm.sh watch --spot --config configs/butterflies.py -- --config.training.batch_size=256
  bash launch/tpu_vm.sh logs            # in another terminal
  bash launch/tpu_vm.sh delete
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

note() {
  echo "[$(date +%H:%M:%S)] $*" >&2
}

is_true() {
  case "${1:-0}" in
    1 | true | yes | on) return 0 ;;
    *) return 1 ;;
  esac
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
commands="create, install, train, logs, status, stop, watch, delete"
command="${1:-}"
case "$command" in
  -h | --help) usage; exit 0 ;;
  create | install | train | logs | status | stop | watch | delete) shift ;;
  "") die "no command given: use one of $commands (see --help)" ;;
  *) die "unknown command '$command': use one of $commands (see --help)" ;;
esac

name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accelerator="${TPU_ACCELERATOR:-v4-8}"
runtime="${TPU_RUNTIME:-}"
spot=0; is_true "${TPU_SPOT:-}" && spot=1
preemptible=0; is_true "${TPU_PREEMPTIBLE:-}" && preemptible=1
queued=0; is_true "${TPU_QUEUED:-}" && queued=1
config="${DDPM_CONFIG:-}"
workdir="${DDPM_WORKDIR:-}"
repo="${DDPM_REPO:-}"
ref="${DDPM_REF:-HEAD}"
python="${DDPM_PYTHON:-3.12}"
worker=0
lines=100
poll="${TPU_POLL:-60}"
max_restarts="${TPU_MAX_RESTARTS:-3}"
delete_when_done=0
yes=0
dry_run=0
extra=()
read -r -a extra <<<"${DDPM_FLAGS:-}"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --accelerator) need_value "$@"; accelerator="$2"; shift 2 ;;
    --runtime) need_value "$@"; runtime="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --queued) queued=1; shift ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --repo) need_value "$@"; repo="$2"; shift 2 ;;
    --ref) need_value "$@"; ref="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --worker) need_value "$@"; worker="$2"; shift 2 ;;
    --lines) need_value "$@"; lines="$2"; shift 2 ;;
    --poll) need_value "$@"; poll="$2"; shift 2 ;;
    --max-restarts) need_value "$@"; max_restarts="$2"; shift 2 ;;
    --delete-when-done) delete_when_done=1; shift ;;
    --yes) yes=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown option '$1' (see --help; flags for ddpm_jax go after --)" ;;
  esac
done

# --- checks: every missing or wrong setting is one line on stderr and exit code 2 ---
[ -n "$name" ] || die "--name (or TPU_NAME) is required: the name of the TPU VM, e.g. --name ddpm-v4"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name' must be lowercase letters, digits and dashes, starting with a letter"
[ -n "$zone" ] || die "--zone (or TPU_ZONE) is required, e.g. --zone us-central2-b; list zones with: gcloud compute tpus locations list"
for number in "$lines" "$poll" "$max_restarts"; do
  [[ "$number" =~ ^[0-9]+$ ]] || die "'$number' is not a whole number (options --lines, --poll, --max-restarts)"
done
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker number or 'all', not '$worker'"
if [ "$command" = create ] || [ "$command" = watch ]; then
  [ "$spot" = 0 ] || [ "$preemptible" = 0 ] || die "--spot and --preemptible exclude each other: use --spot"
  [ "$queued" = 0 ] || [ "$preemptible" = 0 ] || die "queued resources take --spot, not --preemptible"
  if [ -z "$runtime" ]; then
    case "$accelerator" in
      v2-* | v3-* | v4-*) runtime="tpu-ubuntu2204-base" ;;
      v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) runtime=v2-alpha-tpuv5 ;;
      v6e-*) runtime=v2-alpha-tpuv6e ;;
      v5e-*) die "gcloud calls v5e '${accelerator/v5e/v5litepod}': use --accelerator ${accelerator/v5e/v5litepod}" ;;
      *) die "no default software version for --accelerator '$accelerator': give one with --runtime (gcloud compute tpus tpu-vm versions list)" ;;
    esac
  fi
fi
if [ "$command" = train ] || [ "$command" = watch ]; then
  [ -n "$config" ] || die "--config (or DDPM_CONFIG) is required, e.g. --config configs/butterflies.py"
  [ -n "$workdir" ] || die "--workdir (or DDPM_WORKDIR) is required: a bucket path such as gs://my-bucket/ddpm/run1"
  [[ "$workdir" == gs://?* ]] || die "--workdir must be a gs://BUCKET/PATH: a TPU VM's disk is lost when it is preempted or deleted, and all workers must share the checkpoints (got '$workdir')"
  if [ -z "$repo" ] && [ ! -f "$root/$config" ]; then
    die "config '$config' is not in this checkout ($root); give a path relative to the repository root, e.g. configs/butterflies.py"
  fi
fi
if [ "$dry_run" = 0 ] && ! command -v gcloud >/dev/null; then
  die "gcloud is not installed: see https://cloud.google.com/sdk/docs/install (or use --dry-run to see the commands)"
fi

where=(--zone="$zone")
[ -z "$project" ] || where+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
queue=(gcloud compute tpus queued-resources)
remote_dir=ddpm_jax  # on every worker, relative to the home directory; the virtual environment is its .venv

# Runs a shell command on one worker or on all of them.
on_workers() {
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

# The shell command each worker runs to start training (the same one after every preemption).
train_remote_command() {
  local start=(bash launch/worker.sh start)
  [ "${1:-}" != replace ] || start+=(--replace)
  echo "cd $remote_dir && $(show "${start[@]}" -- .venv/bin/python -m ddpm_jax.main --config="$config" \
    --workdir="$workdir" --distributed "${extra[@]}")"
}

create_tpu() {
  local args
  if [ "$queued" = 1 ]; then
    args=("${queue[@]}" create "$name" "${where[@]}" --node-id="$name" --accelerator-type="$accelerator"
      --runtime-version="$runtime")
  else
    args=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$runtime")
  fi
  [ "$spot" = 0 ] || args+=(--spot)
  [ "$preemptible" = 0 ] || args+=(--preemptible)
  run "${args[@]}" || return 1
  wait_until_ready
}

delete_tpu() {
  local args
  if [ "$queued" = 1 ]; then
    args=("${queue[@]}" delete "$name" "${where[@]}" --force)
  else
    args=("${tpu[@]}" delete "$name" "${where[@]}")
  fi
  [ "${1:-}" != quiet ] || args+=(--quiet)
  run "${args[@]}"
}

# One gcloud describe; prints the value, or MISSING when the resource does not exist, or UNKNOWN on other errors.
describe() {
  local out err
  err=$(mktemp)
  if out=$("$@" "$name" "${where[@]}" 2>"$err"); then
    echo "${out:-UNKNOWN}"
  elif grep -qi "not.found" "$err"; then
    echo MISSING
  else
    sed 's/^/  gcloud: /' "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

# The TPU's state as one word: READY, MISSING, GONE (preempted, terminated, suspended, failed), UNKNOWN (could not
# ask), or a passing state such as CREATING or WAITING_FOR_RESOURCES.
tpu_state() {
  if [ "$queued" = 1 ]; then
    local queue_state
    queue_state=$(describe "${queue[@]}" describe --format='value(state.state)')
    case "$queue_state" in
      ACTIVE) ;;
      SUSPENDING | SUSPENDED | FAILED) echo GONE; return ;;
      *) echo "$queue_state"; return ;;
    esac
  fi
  local state
  state=$(describe "${tpu[@]}" describe --format='value(state)')
  case "$state" in
    PREEMPTED | TERMINATED) echo GONE ;;
    *) echo "$state" ;;
  esac
}

wait_until_ready() {
  if [ "$dry_run" = 1 ]; then
    echo "# then, every 30 s until the TPU is READY:"
    [ "$queued" = 0 ] || show "${queue[@]}" describe "$name" "${where[@]}" --format='value(state.state)'
    show "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
    return 0
  fi
  local state
  while :; do
    state=$(tpu_state)
    case "$state" in
      READY) note "TPU $name is READY"; return 0 ;;
      GONE) note "TPU $name was preempted or failed while starting"; return 1 ;;
      *) note "TPU $name: $state; checking again in 30 s"; sleep 30 ;;
    esac
  done
}

install_project() {
  local fetch
  if [ -z "$repo" ]; then
    local tarball="${TMPDIR:-/tmp}/ddpm_jax-$name.tgz"
    # The checkout without what .gitignore leaves out (virtual environment, caches, local workdirs).
    run env COPYFILE_DISABLE=1 tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache --exclude='./workdir*' \
      --exclude=./runs --exclude='*.npz' -C "$root" . || return 1
    run "${tpu[@]}" scp "$tarball" "$name:$remote_dir.tgz" "${where[@]}" --worker=all || return 1
    fetch="mkdir -p $remote_dir && tar -xzf $remote_dir.tgz -C $remote_dir"
  else
    fetch="{ [ -d $remote_dir/.git ] || git clone $(show "$repo") $remote_dir; } && git -C $remote_dir fetch origin $(show "$ref") && git -C $remote_dir checkout --force FETCH_HEAD"
  fi
  on_workers all "$fetch && cd $remote_dir && $(show bash launch/worker.sh install --python "$python" --jax tpu --gcs)"
}

start_training() {
  on_workers all "$(train_remote_command "${1:-}")"
}

# Runs a step up to 3 times: right after a TPU is created, ssh is sometimes not ready yet.
retry() {
  local attempt
  for attempt in 1 2 3; do
    "$@" && return 0
    [ "$attempt" = 3 ] || { note "'$1' failed; trying again in 30 s"; sleep 30; }
  done
  return 1
}

watch_dry_run() {
  echo "# every $poll s: the TPU's state, then the training status on every worker"
  [ "$queued" = 0 ] || show "${queue[@]}" describe "$name" "${where[@]}" --format='value(state.state)'
  show "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
  on_workers all "$worker_status"
  echo "# when the TPU is missing, PREEMPTED or TERMINATED (queued: SUSPENDED or FAILED): delete it, create it, install, train"
  delete_tpu quiet
  create_tpu
  install_project
  start_training
  echo "# when training failed on a worker or was stopped by a signal (at most $max_restarts failures): train again"
  start_training replace
  echo "# when training has finished on every worker: stop watching"
  [ "$delete_when_done" = 0 ] || delete_tpu quiet
}

watch_run() {
  local failures=0 recoveries=0 state statuses line running finished broken failed config_error user_stop
  note "watching TPU $name every $poll s (Ctrl-C stops watching, not training)"
  while :; do
    state=$(tpu_state)
    case "$state" in
      READY)
        if ! statuses=$(on_workers all "$worker_status" 2>/dev/null); then
          note "could not reach every worker; checking again in $poll s"
        else
          running=0 finished=0 broken=0 failed=0 config_error=0 user_stop=0
          while read -r line; do
            case "$line" in
              *stopped-by-user*) user_stop=1 ;;
              *config-error*) config_error=1 ;;
              *not-installed*) broken=$((broken + 1)); state=NOT_INSTALLED ;;
              *running*) running=$((running + 1)) ;;
              *finished*) finished=$((finished + 1)) ;;
              *failed*) broken=$((broken + 1)); failed=$((failed + 1)) ;;
              *stopped* | *not-started*) broken=$((broken + 1)) ;;
            esac
          done <<<"$statuses"
          if [ "$config_error" = 1 ]; then
            die "training stopped with a configuration error: see 'bash launch/tpu_vm.sh logs', fix it, then run watch again (the TPU is still up and billed)"
          elif [ "$user_stop" = 1 ]; then
            note "training was stopped with 'stop'; not restarting it"
            return 0
          elif [ "$broken" -gt 0 ]; then
            if [ "$failed" -gt 0 ]; then
              failures=$((failures + 1))
              [ "$failures" -le "$max_restarts" ] || die "training failed $failures times; see 'bash launch/tpu_vm.sh logs' (the TPU is still up and billed)"
              note "training failed on a worker: restart $failures of $max_restarts"
            fi
            if [ "$state" = NOT_INSTALLED ]; then
              retry install_project || note "install failed; trying again in $poll s"
            fi
            retry start_training replace || note "could not start training; trying again in $poll s"
          elif [ "$running" -gt 0 ]; then
            :
          elif [ "$finished" -gt 0 ]; then
            note "training has finished; results are in $workdir"
            [ "$delete_when_done" = 0 ] || delete_tpu quiet
            return 0
          else
            note "no training status from the workers; checking again in $poll s"
          fi
        fi
        ;;
      MISSING | GONE)
        recoveries=$((recoveries + 1))
        note "TPU $name is ${state/GONE/preempted or terminated}: creating it again (recovery $recoveries); training resumes from the latest checkpoint in $workdir"
        # A queued resource outlives its preempted node, and must go before one of the same name is created.
        if [ "$state" = GONE ] || [ "$queued" = 1 ]; then delete_tpu quiet || note "delete failed; creating anyway"; fi
        if create_tpu && retry install_project && retry start_training; then
          note "training started again"
        else
          note "recovery did not complete; trying again in $poll s"
        fi
        ;;
      UNKNOWN) note "could not read the TPU's state; checking again in $poll s" ;;
      *) note "TPU $name: $state; checking again in $poll s" ;;
    esac
    sleep "$poll"
  done
}

worker_status="cd $remote_dir 2>/dev/null && bash launch/worker.sh status || echo not-installed"

case "$command" in
  create) create_tpu ;;
  install) install_project ;;
  train)
    start_training
    [ "$dry_run" = 1 ] || note "follow the log with: bash launch/tpu_vm.sh logs --name $name --zone $zone"
    ;;
  logs) on_workers "$worker" "cd $remote_dir && $(show bash launch/worker.sh logs --lines "$lines" --follow)" ;;
  status)
    if [ "$dry_run" = 1 ]; then
      [ "$queued" = 0 ] || show "${queue[@]}" describe "$name" "${where[@]}" --format='value(state.state)'
      show "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
    else
      state=$(tpu_state)
      echo "TPU $name: $state"
      [ "$state" = READY ] || exit 0
    fi
    on_workers all "$worker_status"
    ;;
  stop) on_workers all "cd $remote_dir && bash launch/worker.sh stop" ;;
  watch)
    if [ "$dry_run" = 1 ]; then watch_dry_run; else watch_run; fi
    ;;
  delete)
    if [ "$yes" = 1 ]; then delete_tpu quiet; else delete_tpu; fi
    [ "$dry_run" = 1 ] || [ -z "$workdir" ] || note "the workdir $workdir is kept; delete it with: gcloud storage rm -r $workdir"
    ;;
esac
