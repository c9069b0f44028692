"""Reverse steps, one per method, and the sampler that runs them as one compiled `lax.scan`.

A reverse step takes x at timestep t to timestep t_next < t (t_next = -1 is the clean image): `ddpm_step` samples the
posterior q(x_{t-1} | x_t, x0) over unit steps (Ho et al. 2020); `ddim_step` moves between any two timesteps with
stochasticity eta (Song et al. 2021; eta = 1 over unit steps is DDPM). `sample` walks them down from noise; RePaint
and SDEdit (`diffusion.editing`) walk the same steps along their own paths.

A sampler takes `denoise_fn(x_t, t) -> network output`, interpreted by a `Parameterization`, so the same code runs a
trained UNet or an analytic denoiser. The loop never leaves the device and compiles in the same time for 10 or 1000
steps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import DenoiseFn, Parameterization

METHODS = ("ddpm", "ddim")
# (param, denoise_fn, x, t, t_next, noise) -> x at t_next; t and t_next are int32 scalars.
ReverseStep = Callable[[Parameterization, DenoiseFn, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T-1 down to 0 (num_steps of them); num_steps == T gives every step."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"sampling.num_steps={num_steps} must be between 1 and diffusion.num_timesteps={num_timesteps}"
        )
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def timesteps(num_timesteps: int, method: str, num_steps: int | None = None) -> np.ndarray:
    """The timesteps a method visits, descending: all of T-1..0 for "ddpm", num_steps respaced ones for "ddim"."""
    if method == "ddpm":
        return np.arange(num_timesteps - 1, -1, -1, dtype=np.int32)
    if method == "ddim":
        return ddim_timesteps(num_timesteps, num_steps or num_timesteps)
    raise ValueError(f"unknown sampling method {method!r}; accepted: {', '.join(METHODS)}")


def alpha_bar(param: Parameterization, t: jnp.ndarray) -> jnp.ndarray:
    """abar_t, with abar_{-1} = 1 for the clean image."""
    abar = param.schedule.alphas_cumprod
    return jnp.where(t >= 0, abar[jnp.maximum(t, 0)], 1.0)


def ddpm_step(
    param: Parameterization, denoise_fn: DenoiseFn, x: jnp.ndarray, t: jnp.ndarray, t_next: jnp.ndarray,
    noise: jnp.ndarray,
) -> jnp.ndarray:
    """Ancestral step t -> t - 1: the posterior mean at the predicted x0 plus its standard deviation times noise."""
    del t_next  # Always t - 1.
    x0, _ = param.predict(denoise_fn, x, t)
    mean, _, log_var = sch.q_posterior(param.schedule, x0, x, jnp.full((x.shape[0],), t, jnp.int32))
    return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * noise


def make_ddim_step(eta: float) -> ReverseStep:
    """The DDIM step t -> t_next with stochasticity eta (0: deterministic)."""

    def ddim_step(
        param: Parameterization, denoise_fn: DenoiseFn, x: jnp.ndarray, t: jnp.ndarray, t_next: jnp.ndarray,
        noise: jnp.ndarray,
    ) -> jnp.ndarray:
        x0, eps = param.predict(denoise_fn, x, t)
        abar, abar_next = param.schedule.alphas_cumprod[t], alpha_bar(param, t_next)
        sigma = eta * jnp.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
        return jnp.sqrt(abar_next) * x0 + jnp.sqrt(jnp.maximum(1 - abar_next - sigma**2, 0.0)) * eps + sigma * noise

    return ddim_step


def reverse_step(method: str, eta: float = 0.0) -> ReverseStep:
    """The reverse step of `method` ("ddpm" or "ddim" with `eta`)."""
    if method == "ddpm":
        return ddpm_step
    if method == "ddim":
        return make_ddim_step(eta)
    raise ValueError(f"unknown sampling method {method!r}; accepted: {', '.join(METHODS)}")


def frame_slots(num_steps: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """For each step, which frame slot its output goes to and whether it is recorded (evenly spaced, last included)."""
    slots = np.zeros(num_steps, np.int32)
    record = np.zeros(num_steps, bool)
    if num_frames:
        steps = np.unique(np.round(np.linspace(0, num_steps - 1, num_frames)).astype(int))
        slots[steps] = np.arange(len(steps))
        record[steps] = True
    return slots, record


def sample(
    denoise_fn: DenoiseFn,
    param: Parameterization,
    rng: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    num_intermediates: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draws samples of `shape` from noise; returns (x_0, frames) with frames (num_intermediates, *shape).

    method "ddpm" runs all T ancestral steps with the posterior variance of q(x_{t-1}|x_t,x_0); "ddim" runs
    `num_steps` respaced steps with stochasticity `eta` (eta=1 over all T steps equals "ddpm").
    """
    ts = timesteps(param.num_timesteps, method, num_steps)
    t_next = np.append(ts[1:], -1).astype(np.int32)
    step = reverse_step(method, eta)
    slots, record = frame_slots(len(ts), num_intermediates)
    rng_init, rng_steps = jax.random.split(rng)
    x = jax.random.normal(rng_init, shape)
    frames = jnp.zeros((int(record.sum()), *shape), x.dtype)

    def body(carry, xs):
        x, frames = carry
        i, t, tn, slot, rec = xs
        noise = jax.random.normal(jax.random.fold_in(rng_steps, i), shape)
        x = step(param, denoise_fn, x, t, tn, noise)
        if frames.shape[0]:
            frames = frames.at[slot].set(jnp.where(rec, x, frames[slot]))
        return (x, frames), None

    xs = (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(t_next), jnp.asarray(slots), jnp.asarray(record))
    (x, frames), _ = jax.lax.scan(body, (x, frames), xs)
    return x, frames
