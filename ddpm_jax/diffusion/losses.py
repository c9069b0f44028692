"""The DDPM training objective: noise a clean batch, predict the chosen target, take the mean squared error."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization


def diffusion_loss(
    apply_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    param: Parameterization,
    x0: jnp.ndarray,
    t: jnp.ndarray,
    noise: jnp.ndarray,
) -> jnp.ndarray:
    """Mean over the batch and all pixels of ||f(x_t, t) - target||^2 (the 'simple' loss of Ho et al.)."""
    x_t = sch.q_sample(param.schedule, x0, t, noise)
    output = apply_fn(x_t, t)
    return jnp.mean(jnp.square(output.astype(jnp.float32) - param.target(x0, t, noise)))


def sample_noise_and_timesteps(
    keys: jax.Array, shape: tuple[int, ...], num_timesteps: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-example noise (B, *shape) and uniform timesteps (B,), one PRNG key per example."""
    def one(key: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
        k_t, k_noise = jax.random.split(key)
        return jax.random.normal(k_noise, shape), jax.random.randint(k_t, (), 0, num_timesteps)

    return jax.vmap(one)(keys)
