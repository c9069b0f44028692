"""Fault injection through `python -m ddpm_jax.main` on a tiny config: signals, SIGKILL + resume, damaged checkpoints.

Run it directly (each scenario prints PASS or raises):
    python tests/fault_injection.py --butterflies ../shared/data/butterflies [--workdir /tmp/faults]
tests/test_train.py and tests/test_preemption.py run the SIGKILL and the signal scenarios under pytest.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

from reference_run import MODEL, flag  # noqa: E402  (tests/ is on sys.path, as a script and in pytest)

RUN = {"training.log_every_steps": 1, "training.sample_every_steps": 0}  # Progress lines to wait for; no grids.


def tiny_config(dataset: str, **overrides: object):
    """The quickstart config with reference_run.MODEL and `overrides` applied, as the command line applies them."""
    from ddpm_jax.config import load_config_file

    config = load_config_file(REPO / "configs" / "quickstart.py")
    for key, value in {"data.dataset": dataset, **MODEL, **RUN, **overrides}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def start_main(workdir: pathlib.Path, dataset: str, *, mode: str = "train", devices: int = 2,
               launcher: tuple[str, ...] = (), **overrides: object) -> subprocess.Popen:
    """Starts the CLI on the tiny config; stderr (the log) is readable line by line from the returned process.

    `overrides` replace MODEL's values (a key given twice on the command line keeps its first value); `launcher`
    goes between the interpreter and `-m ddpm_jax.main` (tests/peak_rss.py, to report the peak RSS).
    """
    settings = {**MODEL, "data.dataset": dataset, **RUN, **overrides}
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, *launcher, "-m", "ddpm_jax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
           f"--mode={mode}", *[flag(k, v) for k, v in settings.items()]]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_main(workdir: pathlib.Path, dataset: str, **kwargs: object) -> subprocess.CompletedProcess:
    """Runs the CLI to completion; returns the finished process with its stdout and stderr."""
    proc = start_main(workdir, dataset, **kwargs)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for_line(proc: subprocess.Popen, text: str, timeout_s: float = 300) -> list[str]:
    """Reads the log until a line contains `text`; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout_s
    for line in proc.stderr:
        lines.append(line)
        if text in line:
            return lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"never saw {text!r}; last lines:\n{''.join(lines[-20:])}")


def load_state(workdir: pathlib.Path, config, step: int | None = None):
    """The train state saved in workdir (latest step by default), restored onto this process's devices."""
    from ddpm_jax import checkpointing, parallel, train_state
    from ddpm_jax.models import unet

    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    abstract = train_state.abstract_train_state(
        config, unet.create_model(config), train_state.create_optimizer(config), parallel.make_mesh())
    state, _ = ckpt.restore(step if step is not None else ckpt.latest_step(), abstract)
    ckpt.close()
    return state


def assert_same_state(a, b) -> None:
    """Bitwise equality of two train states (params, EMA, optimizer state, step)."""
    import jax
    import numpy as np

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def scenario_sigterm(root: pathlib.Path, dataset: str, sig: int = signal.SIGTERM) -> int:
    """A signal mid-run saves a checkpoint at the current step and exits cleanly; returns that step."""
    workdir = root / f"signal_{signal.Signals(sig).name}"
    proc = start_main(workdir, dataset, **{"training.num_train_steps": 100000,
                                           "training.checkpoint_every_steps": 100000})
    wait_for_line(proc, "step 3/")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert f"by {signal.Signals(sig).name}; checkpoint saved" in err, err[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and steps[0] >= 3, steps
    print(f"PASS {signal.Signals(sig).name}: checkpoint written at step {steps[0]}, exit code 0")
    return steps[0]


def scenario_sigkill_exact_resume(root: pathlib.Path, dataset: str, straight: pathlib.Path | None = None,
                                  total: int = 8, **extra: object) -> None:
    """Killed with SIGKILL after a checkpoint and rerun until done == never interrupted, bit for bit.

    `straight`: a workdir that tests/reference_run.py trained (its final checkpoint is the uninterrupted run, so no
    straight run is needed here); without it, a straight run of `total` steps is made first. `extra`: more config
    overrides of the killed run (the data's, such as streaming it from a cache).
    """
    every = 2
    if straight is not None:
        from reference_run import NUM_STEPS

        total, every = NUM_STEPS, 10
    overrides = {"training.num_train_steps": total, "training.checkpoint_every_steps": every, **extra}
    if straight is None:
        straight = root / "straight"
        result = run_main(straight, dataset, **overrides)
        assert result.returncode == 0, result.stderr[-3000:]

    workdir = root / "killed"
    proc = start_main(workdir, dataset, **overrides)
    wait_for_line(proc, f"step {2 * every + 1}/")  # Past the second checkpoint, before the next one.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (workdir / "checkpoints" / str(total)).exists(), "the run finished before the kill"
    reruns = 0
    while True:
        result = run_main(workdir, dataset, **overrides)
        reruns += 1
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming training from the checkpoint at step" in result.stderr
        if f"step {total}/{total}" in result.stderr or reruns == 3:
            break
    config = tiny_config(dataset, **overrides)
    assert_same_state(load_state(straight, config, total), load_state(workdir, config, total))
    print(f"PASS SIGKILL: resumed after the kill ({reruns} rerun), final state bitwise equal to the straight run")


def _damage(step_dir: pathlib.Path) -> None:
    """Truncates every data file of a saved checkpoint and deletes its state metadata."""
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.parent.name in ("d", "ocdbt.process_0"):
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 3)
    for f in step_dir.rglob("_METADATA"):
        f.unlink()


def scenario_damaged_checkpoint(root: pathlib.Path, dataset: str) -> None:
    """A corrupt latest checkpoint: sampling and training fall back to the newest intact one, good ones untouched."""
    workdir = root / "damaged"
    overrides = {"training.num_train_steps": 6, "training.checkpoint_every_steps": 2, "training.keep_checkpoints": 5}
    first = run_main(workdir, dataset, **overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = workdir / "checkpoints"
    _damage(ckpts / "6")
    good = {p: p.stat().st_mtime_ns for d in ("2", "4") for p in (ckpts / d).rglob("*")}

    sample = run_main(workdir, dataset, mode="sample", **overrides)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "checkpoint at" in sample.stderr and "/6 is damaged" in sample.stderr, sample.stderr[-3000:]
    assert (workdir / "samples").is_dir() and any(p.name.startswith("step_0000004_") for p in
                                                   (workdir / "samples").iterdir())

    overrides["training.num_train_steps"] = 8
    resumed = run_main(workdir, dataset, **overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training from the checkpoint at step 4" in resumed.stderr, resumed.stderr[-3000:]
    assert any(p.name.startswith("damaged-6-") for p in ckpts.iterdir())
    assert {p: p.stat().st_mtime_ns for d in ("2", "4") for p in (ckpts / d).rglob("*")} == good
    assert {"6", "8"} <= {p.name for p in ckpts.iterdir()}
    print("PASS damaged checkpoint: sampling and training fell back to step 4; 2 and 4 untouched; 6 set aside")


def main() -> None:
    """Runs every scenario in a scratch directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--butterflies", default=str(REPO.parent / "shared" / "data" / "butterflies"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="ddpm_jax_faults_"))
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    scenario_sigterm(root, args.butterflies, signal.SIGTERM)
    scenario_sigterm(root, args.butterflies, signal.SIGINT)
    scenario_sigkill_exact_resume(root, args.butterflies)
    scenario_damaged_checkpoint(root, args.butterflies)
    print(f"all fault-injection scenarios passed (workdirs under {root})")


if __name__ == "__main__":
    main()
