"""The DDPM training objective: noise a clean batch, predict the chosen target, take the mean squared error."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import schedule as sch

PREDICTIONS = ("eps", "x0", "v")


def regression_target(
    sched: sch.Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, prediction: str
) -> jnp.ndarray:
    """What the network is trained to output for (x0, t, noise): eps, x0 or v."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return sch.predict_v(sched, x0, t, noise)
    raise ValueError(f"unknown prediction target {prediction!r}; accepted: {', '.join(PREDICTIONS)}")


def diffusion_loss(
    apply_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    sched: sch.Schedule,
    x0: jnp.ndarray,
    t: jnp.ndarray,
    noise: jnp.ndarray,
    prediction: str = "eps",
) -> jnp.ndarray:
    """Mean over the batch and all pixels of ||f(x_t, t) - target||^2 (the 'simple' loss of Ho et al.)."""
    x_t = sch.q_sample(sched, x0, t, noise)
    output = apply_fn(x_t, t)
    target = regression_target(sched, x0, t, noise, prediction)
    return jnp.mean(jnp.square(output.astype(jnp.float32) - target))


def sample_noise_and_timesteps(
    keys: jax.Array, shape: tuple[int, ...], num_timesteps: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-example noise (B, *shape) and uniform timesteps (B,), one PRNG key per example."""
    def one(key: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
        k_t, k_noise = jax.random.split(key)
        return jax.random.normal(k_noise, shape), jax.random.randint(k_t, (), 0, num_timesteps)

    return jax.vmap(one)(keys)
