"""The command line: the reference run gives its recorded arrays; every user error is one line and exit code 2."""

import json
import time

import numpy as np
import pytest
import reference_run
from helpers import CLI_FLAGS, REPO, one_error_line, run_main


def test_the_reference_run_gives_the_recorded_arrays(reference_run_arrays):
    """tests/reference_run.py's 30-step run and 8 DDIM samples against its recording (reference_run.py says when).

    Bitwise on the CPU kind and jaxlib it was recorded on; elsewhere float results may differ in the last bits, so
    the samples must agree within a few levels and every leaf's mean and norm within a small tolerance.
    """
    fixture = np.load(REPO / "tests" / "data" / "reference_run.npz")
    meta, stats = json.loads(str(fixture["meta"])), json.loads(str(fixture["stats"]))
    _, arrays = reference_run_arrays
    assert sorted(arrays) == sorted(meta["digests"])
    if reference_run.machine() == meta["machine"]:
        different = [k for k, v in arrays.items() if reference_run.digest(v) != meta["digests"][k]]
        assert not different, f"{len(different)} arrays differ bitwise from the reference, e.g. {different[:5]}"
        return
    gap = np.abs(arrays["samples"].astype(int) - fixture["samples"].astype(int))
    assert gap.max() <= 8 and gap.mean() <= 1.0, (gap.max(), gap.mean())
    for key, (mean, norm) in stats.items():
        value = arrays[key].astype(np.float64)
        np.testing.assert_allclose([value.mean(), np.linalg.norm(value)], [mean, norm], rtol=1e-2, atol=1e-5,
                                   err_msg=key)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--config.data.dataset=/nonexistent/images"], "data.dataset: folder /nonexistent/images does not exist"),
        (["--config.training.batch_size=7"], "not divisible by the 2 devices"),
        (["--config.sampling.method=euler"], "accepted: ddpm, ddim"),
        (["--config.training.batchsize=8"], "unknown config key training.batchsize; did you mean training.batch_size?"),
        (["--config.training.batch_size=eight"], "--config.training.batch_size=eight: training.batch_size takes int"),
        (["--config=configs/nope.py"], "cannot load config file configs/nope.py: it does not exist"),
        (["--num_processes=2"], "--coordinator_address, --num_processes and --process_id go together"),
    ],
    ids=["missing-folder", "batch", "method", "mistyped-key", "wrong-type", "config-file", "distributed"],
)
def test_bad_input_fails_fast_with_one_line(tmp_path, butterflies_dir, flags, message):
    start = time.monotonic()
    result = run_main(tmp_path / "run", f"--config.data.dataset={butterflies_dir}", *CLI_FLAGS, *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in one_error_line(result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run" / "checkpoints").exists()  # Nothing was saved.


def test_config_files_load_from_any_working_directory(tmp_path, butterflies_dir):
    """Experiment configs build on ddpm_jax.config, and quickstart_conditional on quickstart, from any directory."""
    result = run_main(tmp_path / "run", f"--config.data.dataset={butterflies_dir}", *CLI_FLAGS,
                      "--config.training.batch_size=7", cwd=tmp_path, config="quickstart_conditional.py")
    assert result.returncode == 2 and "not divisible by the 2 devices" in result.stderr, result.stderr[-2000:]


def test_help_lists_the_modes(tmp_path):
    result = run_main(tmp_path / "run", "--helpfull")
    assert result.returncode == 1 and "Traceback" not in result.stderr  # absl's usage exit.
    for mode in ("train", "sample", "eval", "fid", "inpaint", "edit"):
        assert f"{mode}:" in result.stdout
