"""Preemption and recovery end to end through main (the scenarios of tests/fault_injection.py)."""

import signal

import fault_injection as fi
import pytest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, butterflies_dir, sig):
    fi.scenario_sigterm(tmp_path, str(butterflies_dir), sig)


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, butterflies_dir):
    fi.scenario_sigkill_exact_resume(tmp_path, str(butterflies_dir))


def test_damaged_latest_checkpoint_falls_back_to_an_intact_one(tmp_path, butterflies_dir):
    fi.scenario_damaged_checkpoint(tmp_path, str(butterflies_dir))
