"""--mode=sample: the grid, .npz and strip of a trained workdir; per-class grids and captions with guidance."""

import json

import numpy as np
import pytest
from helpers import CLASSES
from PIL import Image

from ddpm_jax.errors import MissingCheckpointError
from ddpm_jax.modes import sample as sample_mode


def test_sample_writes_grid_arrays_and_strip_of_the_latest_checkpoint(copy_run, trained_run):
    _, config, _, _ = trained_run
    config = config.copy_and_resolve_references()
    config.sampling.method = "ddpm"
    out = sample_mode.run(config, str(copy_run))
    name = copy_run / "samples" / "step_0000040_ddpm100"
    assert out == {"sample grid": f"{name}.png", "samples (uint8 N,H,W,3)": f"{name}.npz",
                   "denoising strip": f"{name}_strip.png"}
    samples = np.load(f"{name}.npz")["samples"]
    assert samples.shape == (8, 8, 8, 3) and samples.dtype == np.uint8 and samples.std() > 0
    # 3 frames across, one row per sample; each 8x8 image shown at 64x64, 2 pixels apart.
    assert Image.open(f"{name}_strip.png").size == (3 * 66 + 2, 8 * 66 + 2)


def test_per_class_grids_with_guidance(tmp_path, conditional_run):
    import shutil

    workdir, config = conditional_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run, symlinks=True)
    # The training run's grid: one row per class, captioned.
    caption = json.loads((run / "samples" / "step_0000004_classes.json").read_text())
    assert caption["rows"] == list(CLASSES) and caption["labels"] == [0, 0, 1, 1, 2, 2]
    assert Image.open(run / "samples" / "step_0000004.png").size == (2 * 66 + 2, 3 * 66 + 2)
    assert json.loads((run / "classes.json").read_text())["class_names"] == list(CLASSES)

    config = config.copy_and_resolve_references()
    config.sampling.guidance_scale = 2.0
    out = sample_mode.run(config, str(run))
    name = run / "samples" / "step_0000004_ddim5_eta0_w2"
    assert out["sample grid"] == f"{name}.png" and out["class captions"] == f"{name}_classes.json"
    caption = json.loads((run / "samples" / f"{name.name}_classes.json").read_text())
    assert caption["rows"] == list(CLASSES) and caption["guidance_scale"] == 2.0
    config.sampling.class_label = 1
    one = sample_mode.run(config, str(run))
    assert one["sample grid"].endswith("step_0000004_ddim5_eta0_w2_class1.png")
    assert np.load(one["samples (uint8 N,H,W,3)"])["samples"].shape == (6, 8, 8, 3)


def test_sampling_a_workdir_without_checkpoints_says_train_first(tmp_path, tiny):
    with pytest.raises(MissingCheckpointError, match="train first with --mode=train"):
        sample_mode.run(tiny, str(tmp_path / "empty"))
