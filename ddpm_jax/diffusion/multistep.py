"""Multistep solvers of the probability-flow ODE in the data prediction: DPM-Solver++ and UniPC (bh2).

Both work in the half log-SNR lambda_t = log(alpha_t / sigma_t) = -log s_t, with alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t) and s_t = sigma_t / alpha_t. A step from t to t_next has h = lambda_next - lambda_t, and
e^-h = s_next / s_t, which is 0 on the step to the clean image (t_next = -1), where every update reduces to the
predicted x0. Each solver carries the x0 predictions and timesteps of its previous steps (most recent first); the
per-step `order` (samplers.step_orders) says how many of them a step uses. The formulas are Lu et al. (2022),
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models" (multistep, Algorithm 2; 2M with
the midpoint form), and Zhao et al. (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models" (UniP and UniC with B(h) = e^h - 1, "bh2"), as diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler compute them (tests/data/diffusers_multistep.npz holds their steps).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ddpm_jax.diffusion.parameterization import DenoiseFn, Parameterization

State = dict[str, Any]


def _levels(param: Parameterization, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(alpha_t, sigma_t, s_t) at timestep t (scalar or array), with (1, 0, 0) for the clean image at t = -1."""
    abar = jnp.where(t >= 0, param.schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar), jnp.sqrt((1.0 - abar) / abar)


def _h(s_t: jnp.ndarray, s_next: jnp.ndarray, t_next: jnp.ndarray) -> jnp.ndarray:
    """h = log(s_t / s_next); 1 (any finite value) on the step to the clean image, where no formula divides by it."""
    clean = t_next < 0
    return jnp.where(clean, 1.0, jnp.log(s_t) - jnp.log(jnp.where(clean, 1.0, s_next)))


def _push(stack: jnp.ndarray, value: jnp.ndarray) -> jnp.ndarray:
    """value, then the stack without its oldest entry (most recent first)."""
    return jnp.concatenate([value[None], stack[:-1]]) if stack.shape[0] > 1 else value[None]


def history(x: jnp.ndarray, size: int) -> State:
    """An empty history of `size` steps: x0 predictions shaped like x, and their timesteps."""
    size = max(size, 1)
    return {"x0": jnp.zeros((size, *x.shape), x.dtype), "t": jnp.zeros((size,), jnp.int32)}


def dpm_solver_pp_state(x: jnp.ndarray, solver_order: int) -> State:
    """DPM-Solver++ of order k uses the predictions of the last k - 1 steps."""
    return history(x, solver_order - 1)


def dpm_solver_pp_step(
    param: Parameterization, denoise_fn: DenoiseFn, x: jnp.ndarray, state: State, t: jnp.ndarray,
    t_next: jnp.ndarray, noise: jnp.ndarray, order: jnp.ndarray,
) -> tuple[jnp.ndarray, State]:
    """One DPM-Solver++ step t -> t_next of order 1 (DDIM), 2 (2M, midpoint) or 3 (3M); noise unused."""
    del noise
    _, sigma_t, s_t = _levels(param, t)
    alpha_n, sigma_n, s_n = _levels(param, t_next)
    x0, _ = param.predict(denoise_fn, x, t)
    h = _h(s_t, s_n, t_next)
    phi = s_n / s_t - 1.0  # e^-h - 1; -1 on the step to the clean image.
    out = (sigma_n / sigma_t) * x - alpha_n * phi * x0
    s_prev = _levels(param, state["t"])[2]  # s at the previous steps, most recent first.
    r = jnp.log(s_prev / s_t) / h  # r_k = (lambda_t - lambda_{t-k}) / h.
    d1 = (x0 - state["x0"][0]) / r[0]
    second = out - 0.5 * alpha_n * phi * d1
    if state["x0"].shape[0] >= 2:  # 3M: the last three predictions.
        r0, r1 = r[0], r[1] - r[0]
        d1_old = (state["x0"][0] - state["x0"][1]) / r1
        d1_3 = d1 + r0 / (r0 + r1) * (d1 - d1_old)
        d2 = (d1 - d1_old) / (r0 + r1)
        third = out + alpha_n * (phi / h + 1.0) * d1_3 - alpha_n * ((phi + h) / h**2 - 0.5) * d2
        out = jnp.where(order >= 3, third, jnp.where(order == 2, second, out))
    else:
        out = jnp.where(order >= 2, second, out)
    return out, {"x0": _push(state["x0"], x0), "t": _push(state["t"], t)}


def unipc_state(x: jnp.ndarray, solver_order: int) -> State:
    """UniPC of order k: the last k predictions and timesteps, the sample the last predictor started from, and that
    step's order (0 before the first step: nothing to correct yet)."""
    return {**history(x, solver_order), "last": jnp.zeros_like(x), "order": jnp.zeros((), jnp.int32)}


def _bh2_b(h: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """B(h) = e^-h - 1 and the right-hand side b_1, b_2 of UniPC's order conditions, in the data prediction."""
    hh = -h
    b_h = jnp.expm1(hh)
    phi_k = b_h / hh - 1.0
    b1 = phi_k / b_h
    b2 = (phi_k / hh - 0.5) * 2.0 / b_h
    return b_h, b1, b2


def unipc_step(
    param: Parameterization, denoise_fn: DenoiseFn, x: jnp.ndarray, state: State, t: jnp.ndarray,
    t_next: jnp.ndarray, noise: jnp.ndarray, order: jnp.ndarray,
) -> tuple[jnp.ndarray, State]:
    """One UniPC step: UniC corrects x at t with this step's x0 prediction, then UniP predicts x at t_next.

    The corrector reuses the network evaluation the predictor needs anyway, so a step costs one evaluation. It has
    the order of the previous predictor; `order` (1 or 2) is this predictor's. Noise is unused.
    """
    del noise
    alpha_t, sigma_t, s_t = _levels(param, t)
    alpha_n, sigma_n, s_n = _levels(param, t_next)
    m = param.predict(denoise_fn, x, t)[0]
    m1, m2 = state["x0"][0], state["x0"][-1]
    _, sigma_1, s_1 = _levels(param, state["t"][0])
    s_2 = _levels(param, state["t"][-1])[2]

    # UniC: from the last sample at t_1 (prediction m1), with m2 from the step before and m at t.
    h_c = jnp.log(s_1 / s_t)
    b_h, b1, b2 = _bh2_b(h_c)
    base = (sigma_t / sigma_1) * state["last"] - alpha_t * b_h * m1
    rk = jnp.log(s_1 / s_2) / h_c  # (lambda_2 - lambda_1) / h: below zero.
    rho0 = (b1 - b2) / (1.0 - rk)  # rho = R^-1 b for R = [[1, 1], [rk, 1]].
    rho1 = b1 - rho0
    second = base - alpha_t * b_h * (rho0 * (m2 - m1) / rk + rho1 * (m - m1))
    first = base - alpha_t * b_h * 0.5 * (m - m1)
    corrected = jnp.where(state["order"] >= 2, second, first)
    x = jnp.where(state["order"] >= 1, corrected, x)

    # UniP: from the corrected sample at t to t_next.
    h = _h(s_t, s_n, t_next)
    phi = s_n / s_t - 1.0  # B(h) = e^-h - 1; -1 on the step to the clean image.
    out = (sigma_n / sigma_t) * x - alpha_n * phi * m
    rk_p = jnp.log(s_t / s_1) / h  # (lambda_1 - lambda_t) / h: below zero.
    out = jnp.where(order >= 2, out - alpha_n * phi * 0.5 * (m1 - m) / rk_p, out)
    return out, {"x0": _push(state["x0"], m), "t": _push(state["t"], t), "last": x, "order": order}
