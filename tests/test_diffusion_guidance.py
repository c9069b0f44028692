"""Classifier-free guidance: label dropout keyed per example, and the guided output in one batched call."""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import guidance
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization


def test_label_dropout_rate_and_per_example_determinism():
    rng = jax.random.PRNGKey(7)
    ids = jnp.arange(20000)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 5, 20000), jnp.int32)
    dropped = np.asarray(guidance.drop_labels(rng, ids, labels, 0.1, 5))
    nulls = dropped == 5
    assert abs(nulls.mean() - 0.1) < 0.01  # 3 standard deviations of a binomial(20000, 0.1) fraction are 0.0064
    assert np.array_equal(dropped[~nulls], np.asarray(labels)[~nulls])
    # An example's draw depends only on its global index: a device holding examples 700..799 agrees.
    part = guidance.drop_labels(rng, ids[700:800], labels[700:800], 0.1, 5)
    np.testing.assert_array_equal(part, dropped[700:800])
    assert not np.array_equal(guidance.drop_labels(jax.random.PRNGKey(8), ids, labels, 0.1, 5), dropped)
    np.testing.assert_array_equal(guidance.drop_labels(rng, ids, labels, 0.0, 5), labels)


def test_guidance_formula_and_one_batched_call():
    calls = []

    def model_fn(x, t, c):  # an analytic "network" whose output depends on the label
        calls.append(x.shape[0])
        return jnp.sin(x) * (c[:, None, None, None] + 1.0) + t[:, None, None, None] / 100.0

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 3))
    t = jnp.array([5, 50, 500])
    labels = jnp.array([0, 1, 2])
    plain = guidance.guided_denoise_fn(model_fn, labels, 3, 0.0)(x, t)
    np.testing.assert_array_equal(plain, model_fn(x, t, labels))
    assert calls == [3, 3]  # w = 0: one conditional call, no unconditional one
    calls.clear()
    for w in (1.0, 3.0):
        guided = guidance.guided_denoise_fn(model_fn, labels, 3, w)(x, t)
        expected = (1 + w) * model_fn(x, t, labels) - w * model_fn(x, t, jnp.full((3,), 3))
        np.testing.assert_allclose(guided, expected, rtol=1e-6, atol=1e-6)
    assert calls == [6, 3, 3, 6, 3, 3]  # conditional and unconditional in one call of 2B

    # Guiding the x0 or v output is the same guidance as guiding eps: the conversions are affine in the output.
    sched = sch.make_schedule("cosine", 1000)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    cond, uncond = (jax.random.normal(k, x.shape) for k in keys)
    for prediction in ("x0", "v"):
        param = Parameterization(sched, prediction)
        x0_c, eps_c = param.x0_and_eps(x, t, cond)
        x0_u, eps_u = param.x0_and_eps(x, t, uncond)
        x0_g, eps_g = param.x0_and_eps(x, t, guidance.guide(cond, uncond, 2.0))
        np.testing.assert_allclose(eps_g, guidance.guide(eps_c, eps_u, 2.0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(x0_g, guidance.guide(x0_c, x0_u, 2.0), rtol=1e-4, atol=1e-4)
