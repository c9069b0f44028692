"""Closed forms and shapes of the noise schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion import schedule as sch


def test_linear_schedule_matches_ddpm_paper():
    s = sch.make_schedule("linear", 1000)
    assert s.num_timesteps == 1000
    assert s.betas.dtype == jnp.float32
    np.testing.assert_allclose(s.betas[0], 1e-4, rtol=1e-6)
    np.testing.assert_allclose(s.betas[-1], 0.02, rtol=1e-6)
    betas64 = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas64), rtol=1e-5)
    # The terminal signal level of the DDPM schedule is tiny: x_T is almost pure noise.
    assert float(s.alphas_cumprod[-1]) < 5e-5
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_cosine_schedule_closed_form():
    s = sch.make_schedule("cosine", 1000)
    t = np.arange(1, 1001) / 1000
    f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    # Equal until the beta clipping at 0.999 kicks in at the very end.
    np.testing.assert_allclose(s.alphas_cumprod[:990], f[:990], rtol=1e-4, atol=1e-7)
    assert float(s.betas.max()) <= 0.999 + 1e-6


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="accepted: linear, cosine"):
        sch.make_schedule("quadratic")


def test_q_sample_and_inversions_are_consistent():
    s = sch.make_schedule("linear", 1000)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 10, 500, 999])
    x_t = sch.q_sample(s, x0, t, eps)
    ab = np.asarray(s.alphas_cumprod)[np.asarray(t)][:, None, None, None]
    np.testing.assert_allclose(x_t, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sch.predict_x0_from_eps(s, x_t, t, eps), x0, atol=2e-3)
    np.testing.assert_allclose(sch.predict_eps_from_x0(s, x_t, t, x0), eps, atol=2e-3)
    v = sch.predict_v(s, x0, t, eps)
    np.testing.assert_allclose(sch.predict_x0_from_v(s, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(sch.predict_eps_from_v(s, x_t, t, v), eps, atol=1e-5)


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1}|x_t,x_0) from Bayes' rule on the two Gaussians, computed independently in float64."""
    s = sch.make_schedule("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    x0 = np.full((3, 2, 2, 1), 0.3)
    x_t = np.full((3, 2, 2, 1), -0.7)
    t = np.array([1, 100, 999])
    mean, var, log_var = sch.q_posterior(s, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
    for i, ti in enumerate(t):
        # Prior on x_{t-1} from x0: N(sqrt(ab_{t-1}) x0, 1-ab_{t-1}); likelihood x_t | x_{t-1}: N(sqrt(1-b_t) x, b_t).
        m0, v0 = np.sqrt(ab[ti - 1]) * 0.3, 1 - ab[ti - 1]
        a, vl = np.sqrt(1 - betas[ti]), betas[ti]
        post_var = 1 / (1 / v0 + a * a / vl)
        post_mean = post_var * (m0 / v0 + a * -0.7 / vl)
        np.testing.assert_allclose(var[i].ravel(), post_var, rtol=1e-4)
        np.testing.assert_allclose(mean[i].ravel(), post_mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(log_var[i].ravel(), np.log(post_var), rtol=1e-4)
    # At t=0 the posterior variance is 0; its log is clipped to the t=1 value so it stays finite.
    _, var0, log_var0 = sch.q_posterior(s, jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.array([0]))
    assert float(var0[0, 0]) == 0.0
    np.testing.assert_allclose(log_var0[0, 0], s.posterior_log_variance_clipped[1])
    assert np.isfinite(np.asarray(s.posterior_log_variance_clipped)).all()


def test_schedule_is_a_pytree_usable_under_jit():
    s = sch.make_schedule("cosine", 50)
    f = jax.jit(lambda s, x, t: sch.q_sample(s, x, t, jnp.ones_like(x)))
    out = f(s, jnp.zeros((2, 3)), jnp.array([0, 49]))
    assert out.shape == (2, 3)
