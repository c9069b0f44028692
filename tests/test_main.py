"""End to end through the command line: train on real butterflies, resume, sample; bad input fails fast."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

TINY_FLAGS = [
    "--config.data.image_size=8", "--config.model.ch=8", "--config.model.ch_mult=(1,2)",
    "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=(4,)", "--config.model.num_groups=4",
    "--config.model.dropout=0.0", "--config.diffusion.num_timesteps=50", "--config.training.batch_size=8",
    "--config.training.log_every_steps=2", "--config.training.checkpoint_every_steps=2",
    "--config.training.sample_every_steps=4", "--config.sampling.num_steps=5", "--config.sampling.num_samples=6",
    "--config.sampling.num_intermediates=4",
]


def run_main(workdir, *flags, devices=2, timeout=600, cwd=REPO):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    config = os.path.relpath(REPO / "configs" / "quickstart.py", cwd)
    cmd = [sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_resume_and_sample_through_main(butterflies_dir, tmp_path):
    workdir = tmp_path / "run"
    data = f"--config.data.dataset={butterflies_dir}"
    first = run_main(workdir, data, *TINY_FLAGS, "--config.training.num_train_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert (workdir / "samples" / "step_0000004.png").is_file()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert "starting from scratch" in first.stderr

    second = run_main(workdir, data, *TINY_FLAGS, "--config.training.num_train_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming training from the checkpoint at step 4" in second.stderr
    assert "step 6/6" in second.stderr
    assert "6" in os.listdir(workdir / "checkpoints")

    sample = run_main(workdir, data, *TINY_FLAGS, "--mode=sample", "--config.sampling.method=ddpm")
    assert sample.returncode == 0, sample.stderr[-3000:]
    npz_path = workdir / "samples" / "step_0000006_ddpm50.npz"
    assert f"sample grid: {workdir / 'samples' / 'step_0000006_ddpm50.png'}" in sample.stdout
    samples = np.load(npz_path)["samples"]
    assert samples.shape == (6, 8, 8, 3) and samples.dtype == np.uint8
    assert samples.std() > 0  # Not a blank image.
    strip = Image.open(workdir / "samples" / "step_0000006_ddpm50_strip.png")
    assert strip.size == (4 * 10 + 2, 6 * 10 + 2)  # 4 frames left to right, one row per sample, 2-pixel padding.


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--config.data.dataset=/nonexistent/images"], "does not exist"),
        (["--config.training.batch_size=7"], "not divisible by the 2 devices"),
        (["--config.sampling.method=euler"], "accepted: ddpm, ddim"),
    ],
)
def test_bad_input_fails_fast_with_one_line(tmp_path, butterflies_dir, flags, message):
    start = time.monotonic()
    result = run_main(tmp_path / "run", f"--config.data.dataset={butterflies_dir}", *TINY_FLAGS, *flags)
    assert result.returncode == 2
    assert message in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert time.monotonic() - start < 60


def test_config_files_load_from_any_working_directory(tmp_path, butterflies_dir):
    """Experiment configs import configs/default.py; that must work when --config is a path from elsewhere."""
    result = run_main(tmp_path / "run", f"--config.data.dataset={butterflies_dir}", *TINY_FLAGS,
                      "--config.training.batch_size=7", cwd=tmp_path)
    assert result.returncode == 2 and "not divisible by the 2 devices" in result.stderr, result.stderr[-2000:]


def test_sampling_a_workdir_without_checkpoints_says_train_first(tmp_path):
    result = run_main(tmp_path / "empty", *TINY_FLAGS, "--mode=sample")
    assert result.returncode == 2
    assert "train first with --mode=train" in result.stderr


def test_a_workdir_of_another_model_is_refused_and_left_alone(butterflies_dir, tmp_path):
    workdir = tmp_path / "run"
    data = f"--config.data.dataset={butterflies_dir}"
    assert run_main(workdir, data, *TINY_FLAGS, "--config.training.num_train_steps=2").returncode == 0
    before = sorted((p, p.stat().st_mtime_ns) for p in (workdir / "checkpoints").rglob("*"))
    result = run_main(workdir, data, *TINY_FLAGS, "--config.model.ch=16", "--config.training.num_train_steps=4")
    assert result.returncode == 2
    assert "different shape" in result.stderr and "new --workdir" in result.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in (workdir / "checkpoints").rglob("*")) == before


def test_the_reference_run_gives_the_recorded_arrays(butterflies_dir, tmp_path):
    """tests/reference_run.py's 30-step run and 8 DDIM samples, against what it gave before the house refactor.

    Bitwise on the CPU kind and jaxlib it was recorded on; elsewhere float results may differ in the last bits, so
    the samples must agree within a few levels and every leaf's mean and norm within a small tolerance.
    """
    import json

    import reference_run

    fixture = np.load(REPO / "tests" / "data" / "reference_run.npz")
    meta, stats = json.loads(str(fixture["meta"])), json.loads(str(fixture["stats"]))
    arrays = reference_run.record(tmp_path / "run", str(butterflies_dir))
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
