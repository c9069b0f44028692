"""Samplers as one compiled `lax.scan`: DDPM ancestral sampling (all T steps) and DDIM (respaced steps).

A sampler takes `denoise_fn(x_t, t) -> network output` (eps, x0 or v, as named by `prediction`), so the same code
runs a trained UNet or an analytic denoiser. The loop never leaves the device and compiles in the same time for 10
or 1000 steps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import schedule as sch

METHODS = ("ddpm", "ddim")
DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T-1 down to 0 (num_steps of them); num_steps == T gives every step."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"sampling.num_steps={num_steps} must be between 1 and diffusion.num_timesteps={num_timesteps}"
        )
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def frame_slots(num_steps: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """For each step, which frame slot its output goes to and whether it is recorded (evenly spaced, last included)."""
    slots = np.zeros(num_steps, np.int32)
    record = np.zeros(num_steps, bool)
    if num_frames:
        steps = np.unique(np.round(np.linspace(0, num_steps - 1, num_frames)).astype(int))
        slots[steps] = np.arange(len(steps))
        record[steps] = True
    return slots, record


def predict_x0_and_eps(
    sched: sch.Schedule, denoise_fn: DenoiseFn, x: jnp.ndarray, t: jnp.ndarray, prediction: str, clip: bool
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Runs the network and returns (x0, eps), with x0 clipped to [-1, 1] and eps made consistent with it if asked."""
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    x0, eps = sch.model_to_x0_eps(sched, x, tb, denoise_fn(x, tb), prediction)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = sch.predict_eps_from_x0(sched, x, tb, x0)
    return x0, eps


def sample(
    denoise_fn: DenoiseFn,
    sched: sch.Schedule,
    rng: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    prediction: str = "eps",
    clip_denoised: bool = True,
    num_intermediates: int = 0,
    constrain: Callable[[jnp.ndarray], jnp.ndarray] = lambda x: x,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draws samples of `shape` from noise; returns (x_0, frames) with frames (num_intermediates, *shape).

    method "ddpm" runs all T ancestral steps with the posterior variance of q(x_{t-1}|x_t,x_0); "ddim" runs
    `num_steps` respaced steps with stochasticity `eta` (eta=1 over all T steps equals "ddpm"). `constrain` is
    applied to every new x (e.g. a sharding constraint that keeps the batch split over devices).
    """
    T = sched.num_timesteps
    if method == "ddpm":
        ts = np.arange(T - 1, -1, -1, dtype=np.int32)
        t_prev = ts - 1
    elif method == "ddim":
        ts = ddim_timesteps(T, num_steps or T)
        t_prev = np.append(ts[1:], -1).astype(np.int32)
    else:
        raise ValueError(f"unknown sampling method {method!r}; accepted: {', '.join(METHODS)}")
    slots, record = frame_slots(len(ts), num_intermediates)
    rng_init, rng_steps = jax.random.split(rng)
    x = constrain(jax.random.normal(rng_init, shape))
    frames = jnp.zeros((int(record.sum()), *shape), x.dtype)

    def ddpm_update(x: jnp.ndarray, t: jnp.ndarray, t_prev: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
        x0, _ = predict_x0_and_eps(sched, denoise_fn, x, t, prediction, clip_denoised)
        mean, _, log_var = sch.q_posterior(sched, x0, x, jnp.full((shape[0],), t, jnp.int32))
        return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * noise

    def ddim_update(x: jnp.ndarray, t: jnp.ndarray, t_prev: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
        x0, eps = predict_x0_and_eps(sched, denoise_fn, x, t, prediction, clip_denoised)
        abar = sched.alphas_cumprod[t]
        abar_prev = jnp.where(t_prev >= 0, sched.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0)) * eps + sigma * noise

    update = ddpm_update if method == "ddpm" else ddim_update

    def body(carry, xs):
        x, frames = carry
        i, t, tp, slot, rec = xs
        noise = constrain(jax.random.normal(jax.random.fold_in(rng_steps, i), shape))
        x = constrain(update(x, t, tp, noise))
        if frames.shape[0]:
            frames = frames.at[slot].set(jnp.where(rec, x, frames[slot]))
        return (x, frames), None

    xs = (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(t_prev), jnp.asarray(slots), jnp.asarray(record))
    (x, frames), _ = jax.lax.scan(body, (x, frames), xs)
    return x, frames


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
    """Maps images in [-1, 1] to uint8 [0, 255] with rounding."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
