"""The variational bound, checked against closed forms computed independently in float64 NumPy.

The data model is the one of the samplers' tests (helpers.MU, STD): every pixel i.i.d. N(MU, STD^2), whose optimal
denoiser is analytic. For it each expected L_t, the prior term and (for continuous data) the decoder are Gaussian
integrals in closed form.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MU, STD, gaussian_output

from ddpm_jax.diffusion import likelihood
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization

SHAPE = (64, 4, 4, 3)  # 3,072 data dimensions per timestep.
DECODER_LOG_LIKELIHOOD = jax.jit(likelihood.discretized_gaussian_log_likelihood)  # One compile, not one per op.


def float64_tables(name: str, num_timesteps: int) -> dict[str, np.ndarray]:
    """The schedule's closed forms recomputed in float64 from its betas."""
    b = sch.linear_betas(num_timesteps) if name == "linear" else sch.cosine_betas(num_timesteps)
    ab = np.cumprod(1.0 - b)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b * (1.0 - ab_prev) / (1.0 - ab)
    return {
        "b": b, "ab": ab, "post_var": post_var,
        "coef1": b * np.sqrt(ab_prev) / (1.0 - ab), "coef2": (1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab),
        # p's variance: fixed_small is the posterior variance, fixed_large is beta; both use post_var[1] at t=0.
        "fixed_small": np.append(post_var[1], post_var[1:]), "fixed_large": np.append(post_var[1], b[1:]),
    }


def expected_terms(tab: dict[str, np.ndarray], variance: str, x0: np.ndarray) -> tuple[np.ndarray, float]:
    """E[L_t | x_0] for t >= 1 (the expectation over the noise) and the prior term, nats per dimension.

    With the optimal denoiser, mu_q - mu_p = coef1 (x_0 - E[x_0 | x_t]) and E[x_0 | x_t] = MU + k (x_t - sqrt(ab) MU)
    with k = sqrt(ab) STD^2 / (ab STD^2 + 1 - ab), so its mean square over the noise is
    mean((x_0 - MU)^2) (1 - k sqrt(ab))^2 + k^2 (1 - ab). Conditioning on the drawn x_0 (not averaging over the data
    too) leaves only the noise's sampling error, which shrinks over the 1,000 independent timesteps.
    """
    ab, pv, c1, var_p = tab["ab"], tab["post_var"], tab["coef1"], tab[variance]
    k = np.sqrt(ab) * STD**2 / (ab * STD**2 + 1.0 - ab)
    sq_err = np.mean((x0 - MU) ** 2) * (1.0 - k * np.sqrt(ab)) ** 2 + k**2 * (1.0 - ab)
    t = np.arange(1, len(ab))
    kl = 0.5 * (np.log(var_p[t] / pv[t]) + pv[t] / var_p[t] - 1.0 + c1[t] ** 2 * sq_err[t] / var_p[t])
    prior = 0.5 * (-1.0 - np.log(1.0 - ab[-1]) + (1.0 - ab[-1]) + ab[-1] * np.mean(x0**2))
    return kl, prior


@functools.lru_cache
def bound_fn(schedule: str, num_timesteps: int, prediction: str):
    """The jitted bound of the optimal Gaussian denoiser, compiled once per test session."""
    s = sch.make_schedule(schedule, num_timesteps)
    param = Parameterization(s, prediction, clip_denoised=False)
    return jax.jit(lambda x, k: likelihood.bound_terms(gaussian_output(s, prediction), param, x, k))


def example_keys(n: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(7), jnp.arange(n))


def run_bound(schedule: str, x0: jnp.ndarray, prediction: str) -> dict[str, np.ndarray]:
    terms = bound_fn(schedule, 1000, prediction)(x0, example_keys(x0.shape[0]))
    return {k: np.asarray(v, np.float64) for k, v in terms.items()}


def gaussian_data(seed: int = 0) -> jnp.ndarray:
    return MU + STD * jax.random.normal(jax.random.PRNGKey(seed), SHAPE)


@pytest.mark.parametrize("schedule,prediction", [("linear", "eps"), ("cosine", "v")])
def test_bound_of_the_optimal_gaussian_denoiser_matches_closed_form(schedule, prediction):
    tab = float64_tables(schedule, 1000)
    x0 = gaussian_data()
    terms = run_bound(schedule, x0, prediction)
    dims = math.prod(SHAPE)
    for variance in likelihood.VARIANCES:
        kl, prior = expected_terms(tab, variance, np.asarray(x0, np.float64))
        got = terms[variance][1:].sum(axis=1) / dims  # Mean over examples and dimensions, per t >= 1.
        # One L_t averages 3,072 squared Gaussians (about 2.5% sampling error); 9 buckets of 111 steps are tighter.
        np.testing.assert_allclose(got.reshape(9, 111).sum(1), kl.reshape(9, 111).sum(1), rtol=0.01)
        np.testing.assert_allclose(got.sum(), kl.sum(), rtol=0.005)
        np.testing.assert_allclose(terms["prior"].sum() / dims, prior, rtol=1e-4, atol=1e-9)
    # fixed_large is the tighter bound here; fixed_small overestimates every early term's variance penalty.
    assert terms["fixed_large"][1:].sum() < terms["fixed_small"][1:].sum()


def test_each_term_matches_a_float64_recomputation_sample_by_sample():
    """Same x_0 and noise as the implementation; every KL, decoder and MSE recomputed with NumPy in float64."""
    T = 1000
    tab = float64_tables("linear", T)
    x0 = np.round((np.asarray(gaussian_data(1), np.float64) + 1) * 127.5).clip(0, 255) / 127.5 - 1  # uint8 grid
    terms = run_bound("linear", jnp.asarray(x0, jnp.float32), "eps")
    keys = example_keys(SHAPE[0])
    ab, c1, c2 = tab["ab"], tab["coef1"], tab["coef2"]
    for t in (0, 1, 5, 300, T - 1):
        noise = np.asarray(jax.vmap(lambda k, t=t: jax.random.normal(jax.random.fold_in(k, t), SHAPE[1:]))(keys),
                           np.float64)
        x_t = np.sqrt(ab[t]) * x0 + np.sqrt(1 - ab[t]) * noise
        eps = np.sqrt(1 - ab[t]) * (x_t - np.sqrt(ab[t]) * MU) / (ab[t] * STD**2 + 1 - ab[t])
        x0_hat = (x_t - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        mean_p, mean_q = c1[t] * x0_hat + c2[t] * x_t, c1[t] * x0 + c2[t] * x_t
        np.testing.assert_allclose(terms["mse"][t], ((eps - noise) ** 2).mean(axis=(1, 2, 3)), rtol=1e-4)
        for variance in likelihood.VARIANCES:
            var_p = tab[variance][t]
            if t == 0:
                expected = -np.log(discretized_probs_float64(x0, mean_p, math.sqrt(var_p))).sum(axis=(1, 2, 3))
            else:
                var_q = tab["post_var"][t]
                expected = 0.5 * (-1 + np.log(var_p / var_q) + var_q / var_p + (mean_q - mean_p) ** 2 / var_p)
                expected = expected.sum(axis=(1, 2, 3))
            np.testing.assert_allclose(terms[variance][t], expected, rtol=2e-3, err_msg=f"{variance} t={t}")


def discretized_probs_float64(x: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    """P(bin of x) under N(mean, std^2) with bins x +- 1/255 and open edge bins, via math.erf in float64."""
    cdf = np.vectorize(lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))))
    hi = np.where(x > 0.999, 1.0, cdf((x - mean + 1 / 255) / std))
    lo = np.where(x < -0.999, 0.0, cdf((x - mean - 1 / 255) / std))
    return hi - lo


def test_kl_of_identical_gaussians_is_zero_and_matches_the_formula():
    m, lv = jnp.array([0.3, -2.0, 5.0]), jnp.array([-9.0, 0.0, 2.0])
    np.testing.assert_allclose(likelihood.normal_kl(m, lv, m, lv), 0.0, atol=1e-7)
    kl = float(likelihood.normal_kl(1.0, math.log(0.5), 0.0, 0.0))  # N(1, 0.5) vs N(0, 1)
    assert kl == pytest.approx(0.5 * (0.5 + 1.0 - 1.0 - math.log(0.5)), rel=1e-6)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.01), (0.7, 0.3), (-0.98, 0.002), (3.0, 0.5), (0.2, 40.0)])
def test_discretized_decoder_is_a_distribution_over_the_256_levels(mean, scale):
    levels = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    log_p = DECODER_LOG_LIKELIHOOD(levels, jnp.full(256, mean), jnp.full(256, math.log(scale)))
    assert float(jnp.exp(log_p).sum()) == pytest.approx(1.0, abs=1e-4)
    expected = discretized_probs_float64(np.asarray(levels, np.float64), mean, scale)
    big = expected > 1e-6
    np.testing.assert_allclose(np.exp(np.asarray(log_p, np.float64))[big], expected[big], rtol=1e-3)


def test_a_perfect_decoder_costs_zero_bits_and_a_perfect_x0_model_costs_only_the_decoder_width():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, SHAPE), jnp.float32) / 127.5 - 1.0
    near_delta = DECODER_LOG_LIKELIHOOD(x, x, jnp.full(SHAPE, math.log(1e-4)))
    assert float(likelihood.bits_per_dim(-near_delta.sum() / SHAPE[0], math.prod(SHAPE[1:]))) < 1e-6

    # An oracle that predicts the true x_0: with fixed_small every KL term for t >= 1 vanishes, and the bound is the
    # prior plus the decoder, whose width (posterior std at t=1) spreads mass over neighbouring levels.
    s = sch.make_schedule("linear", 1000)
    oracle = jax.jit(lambda x, k: likelihood.bound_terms(lambda x_t, t: x, Parameterization(s, "x0", False), x, k,
                                                         variances=("fixed_small",)))
    terms = oracle(x, example_keys(SHAPE[0]))
    dims = math.prod(SHAPE[1:])
    np.testing.assert_allclose(np.asarray(terms["fixed_small"][1:]), 0.0, atol=1e-3 * dims)
    std = math.sqrt(float64_tables("linear", 1000)["post_var"][1])
    x64 = np.asarray(x, np.float64)
    decoder_bpd = -np.log2(discretized_probs_float64(x64, x64, std)).sum() / (SHAPE[0] * dims)
    got_bpd = float(likelihood.bits_per_dim(terms["fixed_small"][0].mean(), dims))
    assert got_bpd == pytest.approx(decoder_bpd, rel=1e-4)
    assert 1.0 < decoder_bpd < 1.4  # Interior levels: -log2(2 Phi(0.53) - 1) = 1.31 bits.


def test_p_variance_tables_and_bits_per_dim():
    s = sch.make_schedule("linear", 1000)
    small, large = (np.exp(np.asarray(likelihood.p_log_variance_table(s, v))) for v in likelihood.VARIANCES)
    np.testing.assert_allclose(small[1:], np.asarray(s.posterior_variance)[1:], rtol=1e-5)
    np.testing.assert_allclose(large[1:], np.asarray(s.betas)[1:], rtol=1e-5)
    assert small[0] == pytest.approx(float(s.posterior_variance[1]), rel=1e-5) == large[0]
    assert likelihood.bits_per_dim(3072 * math.log(2.0) * 3.7, 3072) == pytest.approx(3.7)
    with pytest.raises(ValueError, match="accepted: fixed_small, fixed_large"):
        likelihood.p_log_variance_table(s, "learned")
