"""The diffusion objects a config describes, built in one place: the noise schedule and its parameterisation.

diffusion/ never reads a config; these two functions are where config.diffusion meets it. (The UNet is built by
models.unet.create_model, the optimizer by train_state.create_optimizer.)
"""

from __future__ import annotations

import ml_collections

from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization


def create_schedule(config: ml_collections.ConfigDict) -> sch.Schedule:
    """The noise schedule named by config.diffusion."""
    d = config.diffusion
    return sch.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def create_parameterization(config: ml_collections.ConfigDict, clip_denoised: bool = True) -> Parameterization:
    """config.diffusion's schedule and prediction target, with x0 clipped to [-1, 1] if clip_denoised.

    Sampling clips as sampling.clip_denoised says, the bound as eval.clip_denoised says; training never clips.
    """
    return Parameterization(create_schedule(config), config.diffusion.prediction, bool(clip_denoised))
