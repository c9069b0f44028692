"""Data parallelism: the padded chunk loop, and two processes on localhost (4 CPU devices each, gloo collectives)
against one process with 8 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, flat_params, tiny_config
from multihost_worker import NUM_STEPS, explicit_batches, train_on_explicit_batches

from ddpm_jax import checkpointing, parallel
from ddpm_jax.data import cache
from ddpm_jax.errors import ConfigError


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
    _, ema_params, step = checkpointing.restore_ema_params(config, str(workdir), parallel.make_mesh())
    assert step == 4
    trained = np.load(outdir / "trained.npz")
    for k, v in flat_params(ema_params).items():
        np.testing.assert_array_equal(trained[k], v, err_msg=k)


def test_two_processes_stream_disjoint_shares_of_one_cache_that_cover_the_dataset(two_process_run):
    outdir, logs = two_process_run
    (folder,) = [p for p in (outdir / "caches").iterdir() if (p / cache.MANIFEST).is_file()]
    # One process built it; the other waited for it under the lock, or (started later) found it complete.
    assert sum("data: prepared 101 images" in log for log in logs) == 1
    assert all("preparing a cache" in log or "reading the prepared cache" in log for log in logs)
    whole = cache.open_source(str(folder), cache.read_manifest(str(folder)))
    everything = {image.tobytes() for image in whole.get_batch(np.arange(len(whole)))}
    epochs = [[image.tobytes() for image in np.load(outdir / f"epoch_{i}.npy")] for i in (0, 1)]
    assert [len(e) for e in epochs] == [51, 50] and all(len(set(e)) == len(e) for e in epochs)  # an epoch each
    assert not set(epochs[0]) & set(epochs[1]) and set(epochs[0]) | set(epochs[1]) == everything


def test_map_chunks_pads_the_last_chunk_and_trims_every_output():
    mesh = parallel.make_mesh()
    rows = np.arange(21 * 2, dtype=np.float32).reshape(21, 2)
    seen = []

    def fn(i, x):
        seen.append((i, x.shape, x.sharding.spec))
        return (x * 2, jax.numpy.sum(x, axis=1))

    out = list(parallel.map_chunks(fn, [rows], len(rows), 8, mesh))
    assert [s[:2] for s in seen] == [(0, (8, 2)), (1, (8, 2)), (2, (8, 2))]  # Every call the same shape.
    assert all(s[2] == jax.sharding.PartitionSpec("data") for s in seen)
    assert [len(o[0]) for o in out] == [8, 8, 5]
    np.testing.assert_array_equal(np.concatenate([o[0] for o in out]), rows * 2)
    np.testing.assert_array_equal(np.concatenate([o[1] for o in out]), rows.sum(axis=1))
    assert len(list(parallel.map_chunks(lambda i: (jax.numpy.zeros((8,)),), [], 9, 8, mesh))) == 2
    with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
        list(parallel.map_chunks(fn, [rows], len(rows), 6, mesh))
    assert parallel.round_up(5, 8) == 8 and parallel.round_up(16, 8) == 16 and parallel.round_up(17, 8) == 24


def test_distributed_flags_go_together():
    with pytest.raises(ConfigError, match="go together"):
        parallel.initialize_distributed("localhost:1234", None, None)
    with pytest.raises(ConfigError, match=r"--process_id=3 must be in \[0, --num_processes=2\)"):
        parallel.initialize_distributed("localhost:1234", 2, 3)
