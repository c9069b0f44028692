"""--mode=fid on a trained workdir with an injected feature network, and without weights: one line, nothing run."""

import os

import pytest

from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import inception
from ddpm_jax.modes import fid as fid_mode


def test_fid_mode_scores_the_latest_checkpoint_against_the_cached_reference(copy_run, trained_run):
    _, config, extractor, loads = trained_run
    config = config.copy_and_resolve_references()
    config.eval.fid_num_samples = 16
    out = fid_mode.run(config, str(copy_run), extractor=extractor)
    assert float(out["FID@16"]) > 0 and "+-" in out["KID@16"]
    assert out["scores"] == os.path.join(copy_run, "eval", "fid_step_0000040_ddim5_eta0_16.json")
    assert "101 images" in out["reference"] and "at step 40" in out["samples"]
    assert len(loads) == 2  # The reference came from the cache the training run wrote.


def test_fid_mode_without_weights_fails_before_anything_runs(tmp_path, tiny):
    tiny.eval.inception_weights = str(tmp_path / "none.npz")
    with pytest.raises(ConfigError) as info:
        fid_mode.run(tiny, str(tmp_path / "w"))
    message = str(info.value)
    assert message.startswith("eval.inception_weights: no FID Inception weights at ")
    assert inception.FID_WEIGHTS_URL in message and "convert_inception_weights" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "w")  # Nothing was written.
