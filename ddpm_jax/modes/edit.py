"""`--mode=edit`: SDEdit (noise to edit.strength, denoise back), or denoising of images with known noise."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import builders, checkpointing, data, fileio, outputs, parallel, pixels, rng, sampler
from ddpm_jax.diffusion import editing
from ddpm_jax.errors import ConfigError
from ddpm_jax.modes import common


def _start_step(config: ml_collections.ConfigDict, alphas_cumprod: np.ndarray) -> tuple[int, str]:
    """The timestep denoising starts from, and a description for the log."""
    c = config.edit
    if c.noise_sigma > 0:
        try:
            t_start = editing.timestep_for_sigma(alphas_cumprod, c.noise_sigma)
        except ValueError as e:
            raise ConfigError(f"edit.noise_sigma: {e}") from e
        return t_start, f"denoising images with noise sigma {c.noise_sigma:g} from step {t_start}"
    t_start = editing.start_timestep(c.strength, config.diffusion.num_timesteps)
    return t_start, f"editing images at strength {c.strength:g}: noised to step {t_start}"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Edits edit.num_images images with the EMA weights; returns {label: path} of the grid and the arrays."""
    workdir, mesh = common.start(config, workdir)
    c = config.edit
    param = builders.create_parameterization(config, config.sampling.clip_denoised)
    steps, order = common.reverse_steps(config), config.sampling.solver_order
    t_start, what = _start_step(config, np.asarray(param.schedule.alphas_cumprod))
    originals, _ = data.load_inputs(config, c.images, c.num_images, "edit.images")

    model, ema_params, step = checkpointing.restore_ema_params(config, workdir, mesh)
    grid = editing.step_grid(param, steps["method"], steps["num_steps"], steps["timestep_spacing"])
    logging.info("%s, %d network evaluations with %s", what, len(editing.descent_moves(t_start, grid)),
                 steps["method"])

    @functools.partial(jax.jit, out_shardings=(parallel.batch_sharded(mesh),) * 2)
    def edit(params: Any, key: jax.Array, images_u8: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = pixels.to_model_range(images_u8)
        denoise = sampler.sharded_denoiser(model, params, mesh)
        if c.noise_sigma > 0:
            noise_key, walk_key = jax.random.split(key)
            x_t = editing.noisy_to_x_t(param.schedule, x, t_start, c.noise_sigma,
                                       jax.random.normal(noise_key, x.shape))
            out = editing.denoise_from(denoise, param, walk_key, x_t, t_start, solver_order=order, **steps)
        else:
            x_t, out = editing.sdedit(denoise, param, key, x, t_start, solver_order=order, **steps)
        return pixels.to_uint8(x_t), pixels.to_uint8(out)

    started, results = common.run_on_images(edit, ema_params, rng.editing_key(c.seed), [originals], config, mesh)
    paths: dict[str, str] = {}
    if jax.process_index() == 0:
        name = os.path.join(workdir, "samples", f"edit_step_{step:07d}")
        rows, label = ([originals, results], "noisy inputs / denoised") if c.noise_sigma > 0 else (
            [originals, started, results], f"inputs / noised to step {t_start} / results")
        grid = outputs.comparison_grid([outputs.enlarge(r) for r in rows])
        paths[f"edit grid ({label})"] = outputs.save_png(name + ".png", grid)
        paths["edit arrays (originals, starts, results)"] = fileio.write_npz(
            name + ".npz", {"originals": originals, "starts": started, "results": results,
                            "t_start": np.int32(t_start)})
        logging.info("wrote %d edited images from the EMA weights at step %d", len(results), step)
    return paths
