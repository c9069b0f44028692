"""--mode=inpaint on a trained workdir: mask files, the kept pixels exact, the grid; bad inputs before compiling."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.errors import ConfigError, DataError
from ddpm_jax.modes import inpaint as inpaint_mode


def test_inpaint_fills_the_masked_region_and_keeps_the_rest(copy_run, trained_run, butterfly_files, tmp_path):
    _, config, _, _ = trained_run
    config = config.copy_and_resolve_references()
    mask = np.full((8, 8), 255, np.uint8)
    mask[:, 5:] = 0
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "mask.png")
    config.inpaint.images = ",".join(map(str, butterfly_files[:3]))
    config.inpaint.mask, config.inpaint.jump_length, config.inpaint.resample_count = str(tmp_path / "masks"), 2, 3
    out = inpaint_mode.run(config, str(copy_run))
    grid = copy_run / "samples" / "inpaint_step_0000040.png"
    assert out["inpainting grid (originals / masked inputs / results)"] == str(grid)
    arrays = np.load(copy_run / "samples" / "inpaint_step_0000040.npz")
    originals, keep, results = arrays["originals"], arrays["keep_masks"], arrays["results"]
    assert originals.shape == results.shape == (3, 8, 8, 3) and keep.shape == (3, 8, 8)  # 3 images on 8 devices.
    assert not keep[:, :, 5:].any() and keep[:, :, :5].all()
    np.testing.assert_array_equal(results[keep], originals[keep])
    assert not np.array_equal(results[~keep], originals[~keep])  # The model drew the rest.
    # Originals, masked inputs, results: 3 rows of 8x8 images shown at 64x64, 2 pixels apart.
    assert Image.open(grid).size == (3 * 66 + 2, 3 * 66 + 2)


def test_bad_inputs_fail_before_anything_is_compiled(copy_run, trained_run, tmp_path):
    _, config, _, _ = trained_run
    samples = copy_run / "samples"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in samples.iterdir())
    config = config.copy_and_resolve_references()
    config.inpaint.mask, config.inpaint.jump_length = str(tmp_path / "missing.png"), 2
    with pytest.raises(DataError, match="neither a mask file nor a folder"):
        inpaint_mode.run(config, str(copy_run))
    config.inpaint.mask, config.inpaint.jump_length = "center", 5
    with pytest.raises(ConfigError, match="inpaint.jump_length=5 must be below the 5 steps"):
        inpaint_mode.run(config, str(copy_run))
    config.inpaint.jump_length, config.sampling.method = 2, "dpm_solver++"
    with pytest.raises(ConfigError, match="cannot use sampling.method=dpm_solver\\+\\+.*use one of ddpm, ddim, heun"):
        inpaint_mode.run(config, str(copy_run))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in samples.iterdir()) == before  # Nothing written.
