"""Inpainting (RePaint) and denoising/editing (SDEdit) with a trained DDPM, each as one `lax.scan` of reverse steps.

Both walk a path of timesteps built on the host: a sequence of moves (t, t_next). A move down (t_next < t) is one
reverse step of the sampler (`samplers.reverse_step`: DDPM ancestral over all T steps, or DDIM over respaced steps);
a move up (t_next > t) adds forward noise, q(x_t_next | x_t). t = -1 stands for the clean image. The scan runs over
that array, so compile time does not depend on its length.

* RePaint (Lugmayr et al., 2022): after every move down the kept pixels are replaced by the original noised to the
  new level, q_sample(x_0, t_next) (the original itself at t_next = -1), and the filled pixels come from the model.
  Its jump schedule goes back up `jump_length` steps and descends again, `resample_count` times per stretch, so the
  filled region has time to agree with the kept one.
* SDEdit (Meng et al., 2022): the input is noised to `t_start` with q_sample and denoised back to t = -1. An input
  that already carries Gaussian noise of known sigma is mapped onto the diffusion path instead (`noisy_to_x_t`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import samplers
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import DenoiseFn, Parameterization

DOWN, UP = -1, 1


# --------------------------------------------------------------------------------------------------------------------
# Paths of timesteps, built on the host.


def jump_schedule(num_steps: int, jump_length: int, resample_count: int) -> np.ndarray:
    """RePaint's jump schedule over step indices K-1 .. 0: int32 (M, 2) rows of (index, direction DOWN or UP).

    The walk starts at index K-1 and ends with the move down from index 0 to the clean image. Each time it arrives
    (going down) at an index in 0, j, 2j, ... below K - j, it goes back up j indices, r - 1 times per index. So it makes
    K + j (r - 1) len(range(0, K - j, j)) moves down and j (r - 1) len(range(0, K - j, j)) moves up; j = r = 1 is
    the plain descent. Same walk as `get_schedule_jump` of the official RePaint code (without its extra jump levels).
    """
    if num_steps < 1 or jump_length < 1 or resample_count < 1:
        raise ValueError(
            f"need num_steps, jump_length and resample_count >= 1, got {num_steps}, {jump_length}, {resample_count}"
        )
    jumps_left = dict.fromkeys(range(0, num_steps - jump_length, jump_length), resample_count - 1)
    moves = []
    k = num_steps - 1
    while k >= 0:
        moves.append((k, DOWN))
        k -= 1
        if jumps_left.get(k, 0) > 0:
            jumps_left[k] -= 1
            for _ in range(jump_length):
                moves.append((k, UP))
                k += 1
    return np.asarray(moves, np.int32).reshape(-1, 2)


def step_grid(param: Parameterization, method: str, num_steps: int | None, spacing: str = "linspace") -> np.ndarray:
    """Ascending timesteps the sampler visits: all of 0..T-1 for "ddpm", else num_steps spaced by `spacing`."""
    return samplers.method_timesteps(param, method, num_steps, spacing)[::-1].copy()


def timestep_moves(index_moves: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Maps (index, direction) moves onto timesteps: int32 (M, 2) rows of (t, t_next), index -1 being t = -1."""
    padded = np.append(grid, -1).astype(np.int32)  # padded[-1] == -1: the move down from index 0 ends at t = -1.
    k, direction = index_moves[:, 0], index_moves[:, 1]
    return np.stack([padded[k], padded[k + direction]], axis=1).astype(np.int32)


def descent_moves(t_start: int, grid: np.ndarray) -> np.ndarray:
    """Moves straight down from t_start: t_start, then every grid timestep below it, then -1 (int32 (M, 2)).

    t_start = -1 (already clean) gives no moves.
    """
    if t_start < 0:
        return np.zeros((0, 2), np.int32)
    path = np.concatenate([[t_start], grid[grid < t_start][::-1], [-1]]).astype(np.int32)
    return np.stack([path[:-1], path[1:]], axis=1)


def start_timestep(strength: float, num_timesteps: int) -> int:
    """SDEdit start: the input goes through round(strength T) forward steps, so x lands at t = that count - 1."""
    return int(round(strength * num_timesteps)) - 1


def noise_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sqrt((1 - abar_t) / abar_t): the std of Gaussian noise on x_0 that x_t / sqrt(abar_t) carries."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - abar) / abar)


def timestep_for_sigma(alphas_cumprod: np.ndarray, sigma: float) -> int:
    """The first timestep whose noise level sqrt((1 - abar_t) / abar_t) reaches sigma; ValueError if none does."""
    sigmas = noise_sigmas(alphas_cumprod)
    if not 0 < sigma <= sigmas[-1]:
        raise ValueError(f"noise sigma {sigma} must be in (0, {sigmas[-1]:.4g}], the noise levels of this schedule")
    return int(np.searchsorted(sigmas, sigma, side="left"))


# --------------------------------------------------------------------------------------------------------------------
# The compiled walk.


def noisy_to_x_t(sched: sch.Schedule, y: jnp.ndarray, t: int, sigma: float, noise: jnp.ndarray) -> jnp.ndarray:
    """Puts an image with Gaussian noise of std sigma, y = x_0 + sigma z, onto the diffusion path at step t.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z', so x_t / sqrt(abar_t) is x_0 plus noise of std
    sigma_t = sqrt((1 - abar_t) / abar_t). With t the first step where sigma_t >= sigma, the missing noise of variance
    sigma_t^2 - sigma^2 is added and the sum scaled by sqrt(abar_t): the result is distributed exactly as x_t.
    """
    abar = sched.alphas_cumprod[t]
    top_up = jnp.sqrt(jnp.maximum((1.0 - abar) / abar - sigma**2, 0.0))
    return jnp.sqrt(abar) * (y + top_up * noise)


def walk(
    denoise_fn: DenoiseFn,
    param: Parameterization,
    rng: jax.Array,
    x: jnp.ndarray,
    moves: np.ndarray,
    *,
    known: jnp.ndarray | None = None,
    keep: jnp.ndarray | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
) -> jnp.ndarray:
    """Runs the moves (t, t_next) from x at moves[0, 0] as one lax.scan; returns x at the last t_next.

    Moves down are the single step of `method` (`samplers.reverse_step`: "ddpm" walks unit steps only, "ddim" with
    `eta` and "heun" go between any two timesteps; multistep methods cannot follow a path that goes back up). Moves
    up sample q(x_t_next | x_t). With `known` (clean images) and `keep`
    (1 where kept, broadcast against x), every move down ends by replacing the kept pixels with q_sample(known,
    t_next), or known at t_next = -1.
    """
    moves = np.asarray(moves, np.int32).reshape(-1, 2)
    step = samplers.reverse_step(method, eta)
    if method == "ddpm" and np.any((moves[:, 1] < moves[:, 0]) & (moves[:, 1] != moves[:, 0] - 1)):
        raise ValueError("method 'ddpm' walks unit steps only; use 'ddim' for respaced steps")
    if len(moves) == 0:
        return x

    def down(x: jnp.ndarray, t: jnp.ndarray, t_next: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
        step_rng, known_rng = jax.random.split(rng)
        x = step(param, denoise_fn, x, t, t_next, jax.random.normal(step_rng, x.shape, x.dtype))
        if known is not None:
            known_noise = jax.random.normal(known_rng, x.shape, x.dtype)
            abar_next = samplers.alpha_bar(param, t_next)
            known_t = jnp.sqrt(abar_next) * known + jnp.sqrt(1 - abar_next) * known_noise
            x = keep * known_t + (1 - keep) * x
        return x

    def up(x: jnp.ndarray, t: jnp.ndarray, t_next: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
        # q(x_t_next | x_t) = N(sqrt(ratio) x_t, (1 - ratio) I)
        ratio = samplers.alpha_bar(param, t_next) / samplers.alpha_bar(param, t)
        noise = jax.random.normal(rng, x.shape, x.dtype)
        return jnp.sqrt(ratio) * x + jnp.sqrt(1 - ratio) * noise

    def body(x: jnp.ndarray, xs: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, None]:
        i, t, t_next = xs
        # lax.cond runs only the taken branch: moves up never pay for a network evaluation.
        return jax.lax.cond(t_next < t, down, up, x, t, t_next, jax.random.fold_in(rng, i)), None

    xs = (jnp.arange(len(moves)), jnp.asarray(moves[:, 0]), jnp.asarray(moves[:, 1]))
    x, _ = jax.lax.scan(body, x, xs)
    return x


def inpaint(
    denoise_fn: DenoiseFn,
    param: Parameterization,
    rng: jax.Array,
    x0: jnp.ndarray,
    keep: jnp.ndarray,
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "linspace",
    jump_length: int = 10,
    resample_count: int = 10,
) -> jnp.ndarray:
    """RePaint: fills the pixels of x0 (in [-1, 1]) where keep == 0 so they agree with the kept ones.

    `keep` is 1 where x0 is kept, broadcast against x0 (e.g. (B, H, W, 1)). method "ddpm" walks all T steps, "ddim"
    (with stochasticity `eta`) and "heun" `num_steps` steps spaced by `timestep_spacing`; `jump_length` and
    `resample_count` are RePaint's j and r. The kept pixels of the result equal x0.
    """
    grid = step_grid(param, method, num_steps, timestep_spacing)
    moves = timestep_moves(jump_schedule(len(grid), jump_length, resample_count), grid)
    keep = keep.astype(x0.dtype)
    init_rng, walk_rng = jax.random.split(rng)
    noise_known, noise_free = jax.random.normal(init_rng, (2, *x0.shape), x0.dtype)
    t_top = jnp.full((x0.shape[0],), grid[-1], jnp.int32)
    x = keep * sch.q_sample(param.schedule, x0, t_top, noise_known) + (1 - keep) * noise_free
    return walk(denoise_fn, param, walk_rng, x, moves, known=x0, keep=keep, method=method, eta=eta)


def denoise_from(
    denoise_fn: DenoiseFn,
    param: Parameterization,
    rng: jax.Array,
    x_t: jnp.ndarray,
    t_start: int,
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "linspace",
    solver_order: int = 2,
) -> jnp.ndarray:
    """Runs the reverse process from x_t at step t_start (-1: already clean, returned as is) down to x_0.

    "ddpm" takes every step t_start .. 0; the other methods go to the largest grid step below t_start, then along
    the grid, about (t_start + 1) / T * num_steps steps. Single-step methods walk the moves (`walk`), multistep
    ones (dpm_solver++, unipc) run `samplers.descend` from x_t.
    """
    if not -1 <= t_start < param.num_timesteps:
        raise ValueError(f"t_start={t_start} must be in [-1, {param.num_timesteps - 1}]")
    moves = descent_moves(t_start, step_grid(param, method, num_steps, timestep_spacing))
    if method in samplers.SINGLE_STEP or len(moves) == 0:
        return walk(denoise_fn, param, rng, x_t, moves, method=method, eta=eta)
    return samplers.descend(denoise_fn, param, rng, x_t, moves[:, 0], method=method, solver_order=solver_order)[0]


def sdedit(
    denoise_fn: DenoiseFn,
    param: Parameterization,
    rng: jax.Array,
    x0: jnp.ndarray,
    t_start: int,
    **kwargs: Any,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """SDEdit: noises x0 to step t_start with q_sample and denoises it back; returns (x_t_start, edited x_0).

    t_start = -1 returns x0 unchanged; t_start = T - 1 starts from (nearly) pure noise, so the result hardly depends
    on x0. Keyword arguments go to `denoise_from` (method, num_steps, eta, timestep_spacing, solver_order).
    """
    noise_rng, walk_rng = jax.random.split(rng)
    if t_start < 0:
        return x0, x0
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_t = sch.q_sample(param.schedule, x0, jnp.full((x0.shape[0],), t_start, jnp.int32), noise)
    return x_t, denoise_from(denoise_fn, param, walk_rng, x_t, t_start, **kwargs)
