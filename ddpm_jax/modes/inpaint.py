"""`--mode=inpaint`: fills the inpaint.mask region of images with RePaint; writes a grid and an .npz under samples/."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import builders, checkpointing, data, fileio, outputs, parallel, pixels, rng, sampler
from ddpm_jax.data import masks
from ddpm_jax.diffusion import editing, samplers
from ddpm_jax.errors import ConfigError
from ddpm_jax.modes import common


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Inpaints inpaint.num_images images with the EMA weights; returns {label: path} of the grid and the arrays."""
    workdir, mesh = common.start(config, workdir)
    c, size = config.inpaint, config.data.image_size
    steps = common.reverse_steps(config)
    if steps["method"] not in samplers.SINGLE_STEP:
        raise ConfigError(
            f"--mode=inpaint cannot use sampling.method={steps['method']}: RePaint walks back up the steps, which a "
            f"multistep solver cannot follow; use one of {', '.join(samplers.SINGLE_STEP)}"
        )
    param = builders.create_parameterization(config, config.sampling.clip_denoised)
    grid = editing.step_grid(param, steps["method"], steps["num_steps"], steps["timestep_spacing"])
    if c.resample_count > 1 and c.jump_length >= len(grid):
        raise ConfigError(
            f"inpaint.jump_length={c.jump_length} must be below the {len(grid)} steps of sampling.method="
            f"{steps['method']} for resample_count={c.resample_count} to resample anything"
        )
    originals, sizes = data.load_inputs(config, c.images, c.num_images, "inpaint.images")
    if c.mask in masks.SHAPES:
        keep = masks.make_masks(c.mask, len(originals), size, c.seed)
    else:
        keep = masks.load_masks(c.mask, len(originals), size, sizes)
    if keep.all():
        logging.warning("inpaint.mask keeps every pixel: there is nothing to fill")

    model, ema_params, step = checkpointing.restore_ema_params(config, workdir, mesh)
    moves = editing.jump_schedule(len(grid), c.jump_length, c.resample_count)
    logging.info("inpainting %d images with %s: %d steps, jump length %d, %d resamplings: %d network evaluations",
                 len(originals), steps["method"], len(grid), c.jump_length, c.resample_count,
                 int((moves[:, 1] == editing.DOWN).sum()) * (2 if steps["method"] == "heun" else 1))

    @functools.partial(jax.jit, out_shardings=(parallel.batch_sharded(mesh),))
    def inpaint(params: Any, key: jax.Array, images_u8: jax.Array, keep_mask: jax.Array) -> tuple[jax.Array]:
        out = editing.inpaint(sampler.sharded_denoiser(model, params, mesh), param, key,
                              pixels.to_model_range(images_u8), keep_mask[..., None], jump_length=c.jump_length,
                              resample_count=c.resample_count, **steps)
        return (pixels.to_uint8(out),)

    (results,) = common.run_on_images(inpaint, ema_params, rng.editing_key(c.seed), [originals, keep], config, mesh)
    masked = np.where(keep[..., None], originals, np.uint8(128))  # The fill region shown in mid-grey.
    paths: dict[str, str] = {}
    if jax.process_index() == 0:
        name = os.path.join(workdir, "samples", f"inpaint_step_{step:07d}")
        paths["inpainting grid (originals / masked inputs / results)"] = outputs.save_png(
            name + ".png", outputs.comparison_grid([outputs.enlarge(r) for r in (originals, masked, results)]))
        paths["inpainting arrays (originals, keep_masks, results)"] = fileio.write_npz(
            name + ".npz", {"originals": originals, "keep_masks": keep, "results": results})
        logging.info("wrote %d inpainted images from the EMA weights at step %d", len(results), step)
    return paths

