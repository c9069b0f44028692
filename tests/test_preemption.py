"""The stop request behind SIGTERM/SIGINT: a flag, and in the training loop a checkpoint and a clean return.
(Through the command line, kill -9 and its resume are tested in test_train.py; tests/fault_injection.py also sends
SIGTERM and SIGINT to `python -m ddpm_jax.main`.)"""

import os
import signal
import time

import pytest

from ddpm_jax import metric_writers, preemption, train


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_request_turns_a_signal_into_a_flag(sig):
    before = signal.getsignal(sig)
    with preemption.StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.signal_name == signal.Signals(sig).name
    assert signal.getsignal(sig) == before


def test_sigterm_saves_a_checkpoint_at_the_step_it_arrives_and_returns(copy_run, trained_run):
    """SIGTERM while training (here while step 43 is logged): the loop saves at the end of the step it is in (44) and
    returns."""
    _, config, _, _ = trained_run
    config = config.copy_and_resolve_references()
    t = config.training
    t.num_train_steps, t.checkpoint_every_steps, t.log_every_steps = 100_000, 100_000, 1
    t.fid_every_steps = t.sample_every_steps = 0
    real, before = metric_writers.log_progress, signal.getsignal(signal.SIGTERM)

    def log_and_signal(step, total, scalars):  # The signal arrives mid-run, from outside the step.
        real(step, total, scalars)
        if step == 43:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metric_writers, "log_progress", log_and_signal)
        state = train.train_and_evaluate(config, str(copy_run))
    assert int(state.step) == 44
    steps = sorted(int(p.name) for p in (copy_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [20, 40, 44], steps
    assert signal.getsignal(signal.SIGTERM) == before  # The handler is gone once training returns.
