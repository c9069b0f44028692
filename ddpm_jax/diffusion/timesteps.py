"""Which timesteps a sampler visits: descending int32 grids over 0..T-1, with diffusers' spacings and Karras'.

    linspace  round(linspace(T-1, 0, N)): both ends included (DDIM's, and ddpm_jax's default)
    leading   (T // N) * [N-1, ..., 1, 0]: the grid starts below T-1 (diffusers' "leading", steps_offset 0)
    trailing  round(arange(T, 0, -T/N)) - 1: starts at T-1 and ends at T/N - 1 (diffusers' "trailing")
    karras    the timesteps whose noise level sigma_t = sqrt((1 - abar_t) / abar_t) follows Karras et al.'s (2022)
              rho = 7 ramp from min(sigma_{T-1}, 80) to sigma_0, rounded to N distinct whole timesteps

After the last timestep of every grid, samplers take one more step to the clean image (t = -1).
"""

from __future__ import annotations

import numpy as np

SPACINGS = ("linspace", "leading", "trailing", "karras")
KARRAS_RHO = 7.0
# Karras et al.'s sigma_max for VP models. The cosine schedule clips its last betas at 0.999, so its sigma_{T-1} is
# 2e4: a ramp from there spends most of its steps on the last three timesteps, where x is noise either way.
KARRAS_SIGMA_MAX = 80.0


def _check(num_timesteps: int, num_steps: int) -> None:
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"sampling.num_steps={num_steps} must be between 1 and diffusion.num_timesteps={num_timesteps}"
        )


def linspace(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T-1 down to 0 (num_steps of them); num_steps == T gives every step."""
    _check(num_timesteps, num_steps)
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def leading(num_timesteps: int, num_steps: int) -> np.ndarray:
    """(T // N) * [N-1, ..., 0]: multiples of the stride, from 0 up (diffusers' "leading" spacing)."""
    _check(num_timesteps, num_steps)
    return (np.arange(num_steps)[::-1] * (num_timesteps // num_steps)).astype(np.int32)


def trailing(num_timesteps: int, num_steps: int) -> np.ndarray:
    """round(arange(T, 0, -T/N)) - 1: from T-1 down in strides of T/N (diffusers' "trailing" spacing)."""
    _check(num_timesteps, num_steps)
    return (np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1).astype(np.int32)[:num_steps]


def karras(alphas_cumprod: np.ndarray, num_steps: int) -> np.ndarray:
    """Timesteps whose sigma follows Karras et al.'s rho = 7 ramp from min(sigma_{T-1}, 80) to sigma_0, decreasing.

    Each ramp sigma is mapped to the timestep of the nearest log-sigma. Where several ramp points round to the same
    timestep (near t = 0, or when N is close to T), the widest gaps are split until there are N distinct ones (and
    when every gap is one step, the grid grows above the ramp's top).
    """
    abar = np.asarray(alphas_cumprod, np.float64)
    num_timesteps = len(abar)
    _check(num_timesteps, num_steps)
    log_sigmas = 0.5 * np.log((1.0 - abar) / abar)
    if num_steps == 1:
        return np.array([num_timesteps - 1], np.int32)
    lo = np.exp(log_sigmas[0]) ** (1 / KARRAS_RHO)
    hi = min(np.exp(log_sigmas[-1]), KARRAS_SIGMA_MAX) ** (1 / KARRAS_RHO)
    ramp = (hi + np.linspace(0.0, 1.0, num_steps) * (lo - hi)) ** KARRAS_RHO
    t = np.interp(np.log(ramp), log_sigmas, np.arange(num_timesteps))  # log_sigmas rises with t.
    chosen = sorted(set(np.round(t).astype(int).tolist()) | {0}, reverse=True)[:num_steps]
    while len(chosen) < num_steps:  # Near t = 0 ramp points round to the same timestep: split the widest gap,
        gaps = [chosen[i] - chosen[i + 1] for i in range(len(chosen) - 1)]  # or go above the ramp once all are 1.
        i = int(np.argmax(gaps)) if gaps else 0
        if gaps and gaps[i] > 1:
            chosen.insert(i + 1, chosen[i] - gaps[i] // 2)
        else:
            chosen.insert(0, chosen[0] + 1)
    return np.asarray(chosen, np.int32)


def grid(alphas_cumprod: np.ndarray, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """num_steps descending timesteps of a T-step schedule, spaced by `spacing` (one of SPACINGS)."""
    num_timesteps = len(alphas_cumprod)
    if spacing == "linspace":
        return linspace(num_timesteps, num_steps)
    if spacing == "leading":
        return leading(num_timesteps, num_steps)
    if spacing == "trailing":
        return trailing(num_timesteps, num_steps)
    if spacing == "karras":
        return karras(alphas_cumprod, num_steps)
    raise ValueError(f"unknown sampling.timestep_spacing {spacing!r}; accepted: {', '.join(SPACINGS)}")
