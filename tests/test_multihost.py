"""Two processes on localhost (4 CPU devices each, gloo collectives) against one process with 8 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config
from multihost_worker import NUM_STEPS, explicit_batches, flat_params, train_on_explicit_batches

from ddpm_jax import generation, parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(butterflies_dir, tmp_path_factory):
    """Runs tests/multihost_worker.py as processes 0 and 1 of one job; returns its output folder."""
    outdir = tmp_path_factory.mktemp("multihost")
    port = str(_free_port())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    worker = str(REPO / "tests" / "multihost_worker.py")
    procs = [
        subprocess.Popen([sys.executable, worker, str(i), "2", port, str(outdir), str(butterflies_dir)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=480)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-process run did not finish in 480 s")
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
        assert f"process {i} done" in log
    return outdir, logs


def test_two_processes_reach_the_parameters_of_one_process(two_process_run, butterflies_dir):
    outdir, _ = two_process_run
    assert jax.process_count() == 1 and jax.device_count() == 8
    config = tiny_config(str(butterflies_dir), 8)
    state, losses = train_on_explicit_batches(config, explicit_batches(config, NUM_STEPS))
    theirs = np.load(outdir / "explicit.npz")
    np.testing.assert_allclose(theirs["losses"], losses, rtol=1e-5)
    mine = flat_params(state.params)
    assert set(mine) == set(theirs.files) - {"losses"}
    for k, v in mine.items():
        np.testing.assert_allclose(theirs[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_processes_checkpoint_restore_and_write_once(two_process_run, butterflies_dir):
    outdir, logs = two_process_run
    workdir = outdir / "workdir"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    # Metrics, progress and pictures come from process 0 only: one event file, no second writer.
    assert len(os.listdir(workdir / "tensorboard")) == 1
    assert "step 4/4" in logs[0] and "step 4/4" not in logs[1]
    paths = (outdir / "sample_paths.txt").read_text().split("\n")
    samples = np.load([p for p in paths if p.endswith(".npz")][0])["samples"]
    assert samples.shape == (8, 8, 8, 3) and samples.std() > 0  # Gathered from both processes' devices.

    # The cooperative checkpoint restores on one process with 8 devices and holds what the two processes had.
    config = tiny_config(str(butterflies_dir), 8)
    _, ema_params, step = generation.restore_ema_params(config, str(workdir), parallel.make_mesh())
    assert step == 4
    trained = np.load(outdir / "trained.npz")
    for k, v in flat_params(ema_params).items():
        np.testing.assert_array_equal(trained[k], v, err_msg=k)
