"""Pure-functional DDPM noise schedule: a pytree of arrays and the closed forms that use it.

Every function takes arrays and returns arrays; nothing is mutated, so everything here works under `jax.jit`,
`jax.vmap` and `lax.scan`, and from a notebook without flags. Tables are computed in float64 with NumPy and stored
as float32. Timesteps `t` are integer arrays indexing 0..T-1 (t=0 is the least noisy step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")


class Schedule(NamedTuple):
    """Per-timestep tables of a variance schedule (all float32, shape (T,))."""

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linear betas of Ho et al. (2020), scaled so that T=1000 gives 1e-4..0.02 exactly."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.clip(betas, 0.0, max_beta)


def make_schedule(
    name: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Schedule:
    """Builds the schedule tables in float64 and returns them as float32 arrays."""
    if name == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif name == "cosine":
        betas = cosine_betas(num_timesteps)
    else:
        raise ValueError(f"unknown noise schedule {name!r}; accepted: {', '.join(SCHEDULES)}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # The posterior variance is 0 at t=0; its log is clipped to the t=1 value (as in Ho et al.) to stay finite.
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    tables = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
    }
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


def extract(table: jnp.ndarray, t: jnp.ndarray, x_shape: tuple[int, ...]) -> jnp.ndarray:
    """Gathers table[t] for a batch of timesteps and reshapes it to broadcast against x of shape x_shape."""
    values = jnp.take(table, t)
    return values.reshape(values.shape + (1,) * (len(x_shape) - values.ndim))


def q_sample(sched: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """Samples x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def predict_x0_from_eps(sched: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (x_t - extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * eps) / extract(
        sched.sqrt_alphas_cumprod, t, x_t.shape
    )


def predict_eps_from_x0(sched: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray) -> jnp.ndarray:
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    return (x_t - extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * x0) / extract(
        sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape
    )


def predict_v(sched: Schedule, x0: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """The v target of Salimans & Ho (2022): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * eps
        - extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
    )


def predict_x0_from_v(sched: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * x_t
        - extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )


def predict_eps_from_v(sched: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return (
        extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        + extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * v
    )


def q_posterior(
    sched: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = (
        extract(sched.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(sched.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = extract(sched.posterior_variance, t, x_t.shape)
    log_variance = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance
