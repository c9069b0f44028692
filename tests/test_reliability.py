"""Non-finite losses, unwritable or full workdirs, and the stop request behind SIGTERM/SIGINT."""

import os
import signal
import time

import fault_injection as fi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpointing, losses, preemption, train


def _poison_loss(monkeypatch):
    """Makes every later training loss NaN, as a diverging model would."""
    real = losses.diffusion_loss
    monkeypatch.setattr(losses, "diffusion_loss", lambda *a, **k: real(*a, **k) * jnp.nan)


def test_nonfinite_loss_stops_training_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    tiny.training.num_train_steps, tiny.training.checkpoint_every_steps, tiny.training.log_every_steps = 2, 2, 1
    train.train_and_evaluate(tiny, str(tmp_path))
    good = fi.load_state(tmp_path, tiny, 2)
    _poison_loss(monkeypatch)
    tiny.training.num_train_steps = 4
    with pytest.raises(FloatingPointError, match="by step 3; the checkpoint at step 2 is kept"):
        train.train_and_evaluate(tiny, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]  # Nothing saved from step 3.
    fi.assert_same_state(good, fi.load_state(tmp_path, tiny, 2))


def test_nonfinite_updates_can_be_skipped_and_counted(tiny, tmp_path, monkeypatch):
    tiny.training.skip_nonfinite_updates = True
    tiny.training.num_train_steps, tiny.training.checkpoint_every_steps = 2, 2
    before = jax.device_get(train.train_and_evaluate(tiny, str(tmp_path)))
    _poison_loss(monkeypatch)
    tiny.training.num_train_steps = 4
    after = jax.device_get(train.train_and_evaluate(tiny, str(tmp_path)))
    assert int(after.step) == 4
    # Both poisoned updates were skipped: parameters, EMA and optimizer state are those of step 2.
    for a, b in zip(jax.tree.leaves(before.replace(step=after.step)), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(checkpointing.WorkdirError, match="cannot write to --workdir=.*choose a writable directory"):
        checkpointing.check_workdir(str(blocker / "run"), 1000)


def test_full_disk_fails_at_start(tmp_path, monkeypatch):
    class Usage:
        total, used, free = 10 << 30, (10 << 30) - (5 << 20), 5 << 20

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(checkpointing.WorkdirError, match="5 MiB free but checkpoints of this model need about"):
        checkpointing.check_workdir(str(tmp_path), 100 << 20)
    assert os.listdir(tmp_path) == []  # The probe file was removed.


def test_stop_request_turns_a_signal_into_a_flag():
    with preemption.StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
