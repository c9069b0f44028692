"""The variational bound on -log p(x_0) of a DDPM, in closed form, and its conversion to bits per dimension.

Ho et al. (2020), eq. 5, with the 0-based timesteps of schedule.py (x at index t is the x_{t+1} of the paper):

    -log p(x_0) <= L_prior + sum_{t=0}^{T-1} L_t
    L_prior = KL(q(x_T | x_0) || N(0, I))                                   (no parameters)
    L_t     = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   for t >= 1     (two Gaussians)
    L_0     = -log p(x_0 | x_1), a Gaussian discretised to the 256 uint8 levels (the decoder)

p's mean comes from the network through the predicted x_0 (eps, x0 or v outputs, like the samplers, optionally
clipped to [-1, 1] as the Parameterization says); its variance
is fixed: "fixed_small" is the posterior variance of q(x_{t-1} | x_t, x_0), "fixed_large" is beta_t (with the
t=0 value taken from the posterior variance at t=1, as in Ho et al.'s code, since beta_0 would make a poor decoder).
Every function here is pure and works under jit, vmap and scan. Values are nats unless a name ends in _bpd.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization

VARIANCES = ("fixed_small", "fixed_large")
_MIN_PROB = 1e-12  # Floor of a pixel's decoder probability: one hopeless pixel must not make the bound infinite.


def normal_kl(mean1: jnp.ndarray, log_var1: jnp.ndarray, mean2: jnp.ndarray, log_var2: jnp.ndarray) -> jnp.ndarray:
    """Elementwise KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) in nats; arguments broadcast."""
    # d + (exp(-d) - 1) instead of -1 + d + exp(-d): late terms are ~1e-7 nats per dimension, the size of float32
    # rounding of 1, and equal variances must give exactly 0.
    d = log_var2 - log_var1
    return 0.5 * (d + jnp.expm1(-d) + jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def _log_normal_cdf_difference(lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in the tails and for narrow intervals."""
    # Mirror onto the side where both CDFs are small, so the subtraction does not cancel: Phi(b) - Phi(a) equals
    # Phi(-a) - Phi(-b). Then log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))).
    mirror = lo + hi > 0
    a, b = jnp.where(mirror, -hi, lo), jnp.where(mirror, -lo, hi)
    log_a, log_b = jax.scipy.special.log_ndtr(a), jax.scipy.special.log_ndtr(b)
    return log_b + jnp.log(-jnp.expm1(jnp.minimum(log_a - log_b, 0.0)))


def discretized_gaussian_log_likelihood(x: jnp.ndarray, mean: jnp.ndarray, log_scale: jnp.ndarray) -> jnp.ndarray:
    """Elementwise log-probability (nats) of uint8 data scaled to [-1, 1] under N(mean, exp(log_scale)^2) binned.

    Level k of 0..255 sits at x = k/127.5 - 1 and owns the interval x +- 1/255; the two edge bins extend to
    -inf and +inf, so the 256 probabilities sum to 1.
    """
    half_bin = 1.0 / 255.0
    inv_scale = jnp.exp(-log_scale)
    lo = (x - mean - half_bin) * inv_scale
    hi = (x - mean + half_bin) * inv_scale
    log_prob = jnp.where(
        x < -0.999,
        jax.scipy.special.log_ndtr(hi),  # Bin 0: (-inf, -1 + 1/255].
        jnp.where(x > 0.999, jax.scipy.special.log_ndtr(-lo), _log_normal_cdf_difference(lo, hi)),  # Bin 255: [.., inf)
    )
    return jnp.maximum(log_prob, math.log(_MIN_PROB))


def p_log_variance_table(sched: sch.Schedule, variance: str) -> jnp.ndarray:
    """log of p(x_{t-1} | x_t)'s fixed variance for every t, shape (T,)."""
    if variance == "fixed_small":
        return sched.posterior_log_variance_clipped
    if variance == "fixed_large":
        # beta_t, except at t=0 where beta_0 (1e-4 on the linear schedule) is replaced by the posterior variance at
        # t=1, the same value fixed_small uses there: the decoder then has a sensible width.
        return jnp.log(jnp.concatenate([sched.posterior_variance[1:2], sched.betas[1:]]))
    raise ValueError(f"unknown variance {variance!r}; accepted: {', '.join(VARIANCES)}")


def _sum_per_example(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def prior_kl(sched: sch.Schedule, x0: jnp.ndarray) -> jnp.ndarray:
    """KL(q(x_T | x_0) || N(0, I)) per example (nats, summed over all dimensions), shape (B,)."""
    last = sched.num_timesteps - 1
    mean = sched.sqrt_alphas_cumprod[last] * x0
    log_var = 2.0 * jnp.log(sched.sqrt_one_minus_alphas_cumprod[last])
    return _sum_per_example(normal_kl(mean, log_var, 0.0, 0.0))


def _p_mean_and_log_var(
    param: Parameterization, x_t: jnp.ndarray, t: jnp.ndarray, model_output: jnp.ndarray, variance: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean and log-variance of p(x_{t-1} | x_t): the posterior mean at the predicted x_0, and the fixed variance."""
    x0_pred, _ = param.x0_and_eps(x_t, t, model_output.astype(jnp.float32))
    if param.clip_denoised:
        x0_pred = jnp.clip(x0_pred, -1.0, 1.0)
    model_mean, _, _ = sch.q_posterior(param.schedule, x0_pred, x_t, t)
    return model_mean, sch.extract(p_log_variance_table(param.schedule, variance), t, x_t.shape)


def kl_term(
    param: Parameterization, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray, model_output: jnp.ndarray, *,
    variance: str,
) -> jnp.ndarray:
    """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) per example (nats, summed over dimensions), for t >= 1."""
    model_mean, log_var = _p_mean_and_log_var(param, x_t, t, model_output, variance)
    true_mean, _, true_log_var = sch.q_posterior(param.schedule, x0, x_t, t)
    return _sum_per_example(normal_kl(true_mean, true_log_var, model_mean, log_var))


def decoder_nll(
    param: Parameterization, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray, model_output: jnp.ndarray, *,
    variance: str,
) -> jnp.ndarray:
    """-log p(x_0 | x_1) per example (nats, summed over dimensions): the discretised decoder, meant for t == 0."""
    model_mean, log_var = _p_mean_and_log_var(param, x_t, t, model_output, variance)
    return -_sum_per_example(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var))


def vb_term(
    param: Parameterization, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray, model_output: jnp.ndarray, *,
    variance: str,
) -> jnp.ndarray:
    """L_t per example (nats, summed over dimensions), shape (B,): the decoder NLL where t == 0, else the KL.

    `x0` holds the true images (on the uint8 grid in [-1, 1]), `x_t` their noised versions at the timesteps
    `t` (B,), and `model_output` the network's eps / x0 / v prediction at (x_t, t).
    """
    return jnp.where(t == 0, decoder_nll(param, x0, x_t, t, model_output, variance=variance),
                     kl_term(param, x0, x_t, t, model_output, variance=variance))


def bound_terms(
    denoise_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    param: Parameterization,
    x0: jnp.ndarray,
    keys: jax.Array,
    *,
    variances: Sequence[str] = VARIANCES,
) -> dict[str, jnp.ndarray]:
    """Every term of the bound for a batch, one network call per timestep inside a `lax.scan` over all T.

    `keys` (B,) holds one PRNG key per example; the noise at timestep t is drawn from fold_in(key, t), so an
    example's terms do not depend on the batch it is in. Returns per-example arrays: "prior" (B,), one (T, B) array
    of L_t per name in `variances` (all from the same network outputs), and "mse" (T, B), the mean squared error of
    the network's prediction target (the training loss) at every t. All in nats, summed over dimensions, but mse.
    """
    batch = x0.shape[0]
    sched = param.schedule

    def one_timestep(_: None, t: jnp.ndarray) -> tuple[None, dict[str, jnp.ndarray]]:
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x0.shape[1:]))(keys)
        tb = jnp.full((batch,), t, jnp.int32)
        x_t = sch.q_sample(sched, x0, tb, noise)
        output = denoise_fn(x_t, tb).astype(jnp.float32)
        target = param.target(x0, tb, noise)
        out = {"mse": jnp.mean(jnp.square(output - target).reshape(batch, -1), axis=1)}
        for v in variances:
            # The decoder's normal CDFs cost about 20 times the KL; a cond (not a where) computes them at t=0 only.
            out[v] = jax.lax.cond(t == 0, functools.partial(decoder_nll, variance=v),
                                  functools.partial(kl_term, variance=v), param, x0, x_t, tb, output)
        return None, out

    _, per_t = jax.lax.scan(one_timestep, None, jnp.arange(sched.num_timesteps, dtype=jnp.int32))
    return {"prior": prior_kl(sched, x0), **per_t}


def bits_per_dim(nats: jnp.ndarray | float, num_dims: int) -> jnp.ndarray | float:
    """Nats per image -> bits per dimension: divide by D ln 2 (D = H * W * C)."""
    return nats / (num_dims * math.log(2.0))
