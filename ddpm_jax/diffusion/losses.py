"""The DDPM training objective: noise a clean batch, predict the chosen target, take the (weighted) squared error.

Loss weightings, per example, as functions of SNR_t = abar_t / (1 - abar_t):
  none     1: the "simple" loss of Ho et al. (2020) on whatever the network predicts
  min_snr  Hang et al. (2023), "Efficient Diffusion Training via Min-SNR Weighting Strategy": min(SNR_t, gamma) on
           the x0 error, i.e. min(SNR, gamma) / SNR on the eps error and min(SNR, gamma) / (SNR + 1) on the v error
  p2       Choi et al. (2022), "Perception Prioritized Training of Diffusion Models": 1 / (1 + SNR_t)^gamma on the eps
           error (k = 1), i.e. SNR / (1 + SNR)^gamma on the x0 error and that times 1 / (SNR + 1) on the v error
The conversions hold because, at fixed x_t, |eps error|^2 = SNR |x0 error|^2 = SNR / (SNR + 1) |v error|^2.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization

WEIGHTINGS = ("none", "min_snr", "p2")


def snr(sched: sch.Schedule, t: jnp.ndarray) -> jnp.ndarray:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps t."""
    abar = jnp.take(sched.alphas_cumprod, t)
    return abar / (1.0 - abar)


def loss_weights(param: Parameterization, t: jnp.ndarray, weighting: str, gamma: float) -> jnp.ndarray:
    """Per-example weights (B,) of the squared error on param's prediction target at timesteps t (B,)."""
    ratio = snr(param.schedule, t)
    if weighting == "min_snr":
        on_eps = jnp.minimum(ratio, gamma) / ratio
    elif weighting == "p2":
        on_eps = 1.0 / (1.0 + ratio) ** gamma
    elif weighting == "none":
        return jnp.ones_like(ratio)
    else:
        raise ValueError(f"unknown training.loss_weighting {weighting!r}; accepted: {', '.join(WEIGHTINGS)}")
    to_target = {"eps": 1.0, "x0": ratio, "v": ratio / (ratio + 1.0)}[param.prediction]
    return on_eps * to_target


def diffusion_loss(
    apply_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    param: Parameterization,
    x0: jnp.ndarray,
    t: jnp.ndarray,
    noise: jnp.ndarray,
    weighting: str = "none",
    gamma: float = 5.0,
) -> jnp.ndarray:
    """Mean over the batch of the (weighted) mean over pixels of ||f(x_t, t) - target||^2.

    weighting "none" is the 'simple' loss of Ho et al., a plain mean over the batch and all pixels.
    """
    x_t = sch.q_sample(param.schedule, x0, t, noise)
    output = apply_fn(x_t, t)
    error = jnp.square(output.astype(jnp.float32) - param.target(x0, t, noise))
    if weighting == "none":
        return jnp.mean(error)
    per_example = jnp.mean(error.reshape(error.shape[0], -1), axis=1)
    return jnp.mean(loss_weights(param, t, weighting, gamma) * per_example)


def sample_noise_and_timesteps(
    keys: jax.Array, shape: tuple[int, ...], num_timesteps: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-example noise (B, *shape) and uniform timesteps (B,), one PRNG key per example."""
    def one(key: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
        k_t, k_noise = jax.random.split(key)
        return jax.random.normal(k_noise, shape), jax.random.randint(k_t, (), 0, num_timesteps)

    return jax.vmap(one)(keys)
