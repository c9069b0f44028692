"""Sampling methods and the sampler that runs them as one compiled `lax.scan`.

A method's step takes x at timestep t to timestep t_next < t (t_next = -1 is the clean image):
  ddpm          the posterior q(x_{t-1} | x_t, x0) over unit steps (Ho et al. 2020)
  ddim          between any two timesteps, with stochasticity eta (Song et al. 2021; eta = 1 over unit steps is DDPM)
  heun          Heun's 2nd-order step on the probability-flow ODE of the VP process in sigma = sqrt((1-abar)/abar)
                (Karras et al. 2022): two network evaluations per step, one on the step to the clean image
  dpm_solver++  DPM-Solver++ (Lu et al. 2022), multistep in the data prediction, order sampling.solver_order (2 or 3)
  unipc         UniPC (Zhao et al. 2023), the bh2 predictor-corrector in the data prediction, one evaluation a step
Multistep methods (dpm_solver++, unipc) use the network outputs of the previous steps of the grid, start at first
order and end with a first-order step to the clean image; the others are single steps between any two timesteps,
which is what RePaint's walk back up needs (`diffusion.editing`).

A sampler takes `denoise_fn(x_t, t) -> network output`, interpreted by a `Parameterization`, so the same code runs a
trained UNet or an analytic denoiser. The loop never leaves the device and compiles in the same time for 10 or 1000
steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import multistep, timesteps
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import DenoiseFn, Parameterization

SINGLE_STEP = ("ddpm", "ddim", "heun")
MULTISTEP = ("dpm_solver++", "unipc")
METHODS = SINGLE_STEP + MULTISTEP
# (param, denoise_fn, x, t, t_next, noise) -> x at t_next; t and t_next are int32 scalars.
ReverseStep = Callable[[Parameterization, DenoiseFn, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _unknown(method: str) -> ValueError:
    return ValueError(f"unknown sampling method {method!r}; accepted: {', '.join(METHODS)}")


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T-1 down to 0 (num_steps of them); num_steps == T gives every step."""
    return timesteps.linspace(num_timesteps, num_steps)


def method_timesteps(
    param: Parameterization, method: str, num_steps: int | None = None, spacing: str = "linspace"
) -> np.ndarray:
    """The timesteps a method visits, descending: all of T-1..0 for "ddpm", else num_steps spaced by `spacing`."""
    if method == "ddpm":
        return np.arange(param.num_timesteps - 1, -1, -1, dtype=np.int32)
    if method not in METHODS:
        raise _unknown(method)
    return timesteps.grid(np.asarray(param.schedule.alphas_cumprod), num_steps or param.num_timesteps, spacing)


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


def heun_step(
    param: Parameterization, denoise_fn: DenoiseFn, x: jnp.ndarray, t: jnp.ndarray, t_next: jnp.ndarray,
    noise: jnp.ndarray,
) -> jnp.ndarray:
    """Heun's step t -> t_next on the probability-flow ODE d(x/alpha) = eps d(sigma/alpha) (noise unused).

    In y = x / sqrt(abar) and s = sqrt((1 - abar) / abar) the ODE is dy/ds = eps. An Euler step to s_next, then the
    mean of the slopes at both ends; the step to the clean image (s_next = 0) stays an Euler step, which is DDIM's.
    """
    del noise
    abar, abar_next = param.schedule.alphas_cumprod[t], alpha_bar(param, t_next)
    s, s_next = jnp.sqrt((1 - abar) / abar), jnp.sqrt((1 - abar_next) / abar_next)
    _, eps = param.predict(denoise_fn, x, t)
    y = x / jnp.sqrt(abar)
    euler = y + (s_next - s) * eps

    def corrected() -> jnp.ndarray:
        _, eps_next = param.predict(denoise_fn, jnp.sqrt(abar_next) * euler, t_next)
        return y + (s_next - s) * 0.5 * (eps + eps_next)

    return jnp.sqrt(abar_next) * jax.lax.cond(t_next >= 0, corrected, lambda: euler)


def reverse_step(method: str, eta: float = 0.0) -> ReverseStep:
    """The single step of `method` (ddpm, ddim with `eta`, or heun), which goes between any two timesteps."""
    if method == "ddpm":
        return ddpm_step
    if method == "ddim":
        return make_ddim_step(eta)
    if method == "heun":
        return heun_step
    if method in MULTISTEP:
        raise ValueError(f"sampling method {method!r} is multistep and has no single step; the methods with one "
                         f"are {', '.join(SINGLE_STEP)}")
    raise _unknown(method)


class Method(NamedTuple):
    """A method as the sampler runs it: its state between steps, and its step (x, state) -> (x, state)."""

    init: Callable[[jnp.ndarray], Any]
    step: Callable[..., tuple[jnp.ndarray, Any]]  # (param, denoise_fn, x, state, t, t_next, noise, order)


def make_method(name: str, eta: float = 0.0, solver_order: int = 2) -> Method:
    """The method `name` (one of METHODS) with its settings: DDIM's eta, the multistep solvers' order."""
    if name in SINGLE_STEP:
        step = reverse_step(name, eta)
        return Method(lambda x: (), lambda param, f, x, state, t, tn, noise, order: (step(param, f, x, t, tn, noise),
                                                                                  state))
    if name == "dpm_solver++":
        return Method(lambda x: multistep.dpm_solver_pp_state(x, solver_order), multistep.dpm_solver_pp_step)
    if name == "unipc":
        return Method(lambda x: multistep.unipc_state(x, solver_order), multistep.unipc_step)
    raise _unknown(name)


def step_orders(name: str, num_steps: int, solver_order: int) -> np.ndarray:
    """Each step's order: for multistep methods min(solver_order, steps done + 1, steps left); 1 for the others."""
    if name not in MULTISTEP:
        return np.ones(num_steps, np.int32)
    i = np.arange(num_steps)
    return np.minimum(np.minimum(solver_order, i + 1), num_steps - i).astype(np.int32)


def frame_slots(num_steps: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """For each step, which frame slot its output goes to and whether it is recorded (evenly spaced, last included)."""
    slots = np.zeros(num_steps, np.int32)
    record = np.zeros(num_steps, bool)
    if num_frames:
        steps = np.unique(np.round(np.linspace(0, num_steps - 1, num_frames)).astype(int))
        slots[steps] = np.arange(len(steps))
        record[steps] = True
    return slots, record


def descend(
    denoise_fn: DenoiseFn,
    param: Parameterization,
    key: jax.Array,
    x: jnp.ndarray,
    ts: np.ndarray,
    *,
    method: str = "ddim",
    eta: float = 0.0,
    solver_order: int = 2,
    num_intermediates: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Runs `method` from x at timestep ts[0] down the descending grid ts, then to the clean image, as one lax.scan.

    Step i draws its noise (used by ddpm and ddim with eta > 0) from fold_in(key, i). Returns (x_0, frames) with
    frames (num_intermediates, *x.shape), evenly spaced over the steps.
    """
    ts = np.asarray(ts, np.int32)
    t_next = np.append(ts[1:], -1).astype(np.int32)
    if np.any(t_next >= ts):
        raise ValueError(f"timesteps must strictly decrease, got {ts.tolist()}")
    run = make_method(method, eta, solver_order)
    orders = step_orders(method, len(ts), solver_order)
    slots, record = frame_slots(len(ts), num_intermediates)
    shape = x.shape
    frames = jnp.zeros((int(record.sum()), *shape), x.dtype)

    def body(carry, xs):
        x, state, frames = carry
        i, t, tn, order, slot, rec = xs
        noise = jax.random.normal(jax.random.fold_in(key, i), shape)
        x, state = run.step(param, denoise_fn, x, state, t, tn, noise, order)
        if frames.shape[0]:
            frames = frames.at[slot].set(jnp.where(rec, x, frames[slot]))
        return (x, state, frames), None

    xs = (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(t_next), jnp.asarray(orders), jnp.asarray(slots),
          jnp.asarray(record))
    (x, _, frames), _ = jax.lax.scan(body, (x, run.init(x), frames), xs)
    return x, frames


def sample(
    denoise_fn: DenoiseFn,
    param: Parameterization,
    rng: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "linspace",
    solver_order: int = 2,
    num_intermediates: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draws samples of `shape` from noise; returns (x_0, frames) with frames (num_intermediates, *shape).

    method "ddpm" runs all T ancestral steps with the posterior variance of q(x_{t-1}|x_t,x_0); the others run
    `num_steps` steps spaced by `timestep_spacing` (ddim with stochasticity `eta`; eta=1 over all T steps equals
    "ddpm"; dpm_solver++ and unipc of order `solver_order`).
    """
    ts = method_timesteps(param, method, num_steps, timestep_spacing)
    rng_init, rng_steps = jax.random.split(rng)
    x = jax.random.normal(rng_init, shape)
    return descend(denoise_fn, param, rng_steps, x, ts, method=method, eta=eta, solver_order=solver_order,
                   num_intermediates=num_intermediates)
