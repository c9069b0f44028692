"""The Parameterization (what a network output means) and the training loss built on it, for eps, x0 and v."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import parameterization

from ddpm_jax import builders
from ddpm_jax.config import get_config
from ddpm_jax.diffusion import losses
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization


@pytest.fixture(scope="module")
def draws():
    """x0 in [-1, 1], noise and timesteps (B = 4) on the linear schedule, and the x_t they make."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([1, 10, 500, 999])
    s = sch.make_schedule("linear", 1000)
    return s, x0, eps, t, sch.q_sample(s, x0, t, eps)


def test_targets_are_the_closed_forms(draws):
    s, x0, eps, t, _ = draws
    ab = np.asarray(s.alphas_cumprod)[np.asarray(t)][:, None, None, None]
    np.testing.assert_array_equal(Parameterization(s, "eps").target(x0, t, eps), eps)
    np.testing.assert_array_equal(Parameterization(s, "x0").target(x0, t, eps), x0)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), checked against float64 NumPy.
    v = np.sqrt(ab) * np.asarray(eps, np.float64) - np.sqrt(1 - ab) * np.asarray(x0, np.float64)
    np.testing.assert_allclose(Parameterization(s, "v").target(x0, t, eps), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_output_implies_the_true_x0_and_eps(draws, prediction):
    s, x0, eps, t, x_t = draws
    param = Parameterization(s, prediction)
    x0_hat, eps_hat = param.x0_and_eps(x_t, t, param.target(x0, t, eps))
    # t = 999 divides by sqrt(abar) ~ 0.006 when recovering x0 from eps: float32 error grows there.
    np.testing.assert_allclose(x0_hat[:3], x0[:3], atol=2e-3)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-3)


def test_predict_clips_x0_and_keeps_eps_consistent(draws):
    s, x0, eps, t, x_t = draws
    def wild(x, tb):  # A network that predicts x0 = 3 everywhere.
        return 3.0 * jnp.ones_like(x)

    x0_hat, eps_hat = Parameterization(s, "x0", clip_denoised=True).predict(wild, x_t[:1], t[0])
    np.testing.assert_array_equal(x0_hat, 1.0)
    np.testing.assert_allclose(sch.q_sample(s, x0_hat, t[:1], eps_hat), x_t[:1], atol=1e-5)
    unclipped, _ = Parameterization(s, "x0", clip_denoised=False).predict(wild, x_t[:1], t[0])
    np.testing.assert_array_equal(unclipped, 3.0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_exact_target_and_not_for_another(draws, prediction):
    s, x0, eps, t, _ = draws
    param = Parameterization(s, prediction)
    exact = {"eps": eps, "x0": x0, "v": Parameterization(s, "v").target(x0, t, eps)}
    for name, output in exact.items():
        loss = float(losses.diffusion_loss(lambda x, tb, o=output: o, param, x0, t, eps))
        if name == prediction:
            assert loss < 1e-12, (name, loss)
        else:  # Training eps, x0 and v are different objectives.
            assert loss > 0.1, (name, loss)


def test_the_loss_sees_x_t_and_t(draws):
    s, x0, eps, t, x_t = draws
    seen = {}

    def network(x, tb):
        seen["x"], seen["t"] = x, tb
        return jnp.zeros_like(x)

    loss = losses.diffusion_loss(network, Parameterization(s, "eps"), x0, t, eps)
    np.testing.assert_array_equal(seen["x"], x_t)
    np.testing.assert_array_equal(seen["t"], t)
    np.testing.assert_allclose(loss, jnp.mean(eps**2), rtol=1e-6)


def test_unknown_prediction_is_rejected():
    with pytest.raises(ValueError, match="accepted: eps, x0, v"):
        parameterization(prediction="score")


def test_noise_and_timesteps_are_per_example_draws():
    keys = jax.random.split(jax.random.PRNGKey(0), 512)
    noise, t = losses.sample_noise_and_timesteps(keys, (2, 2, 1), 100)
    assert noise.shape == (512, 2, 2, 1) and t.shape == (512,) and t.dtype == jnp.int32
    assert int(t.min()) >= 0 and int(t.max()) <= 99 and len(np.unique(t)) > 90
    again, t_again = losses.sample_noise_and_timesteps(keys[:3], (2, 2, 1), 100)  # Keyed per example.
    np.testing.assert_array_equal(again, noise[:3])
    np.testing.assert_array_equal(t_again, t[:3])


def test_builders_bind_config_diffusion():
    config = get_config()
    config.diffusion.schedule, config.diffusion.num_timesteps, config.diffusion.prediction = "cosine", 50, "v"
    param = builders.create_parameterization(config, clip_denoised=False)
    assert (param.prediction, param.clip_denoised, param.num_timesteps) == ("v", False, 50)
    np.testing.assert_array_equal(param.schedule.betas, sch.make_schedule("cosine", 50).betas)
    assert jax.tree.leaves(param) == jax.tree.leaves(param.schedule)  # Only the tables are pytree leaves.


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_weights_are_the_papers_closed_forms(draws, prediction):
    s, x0, eps, t, _ = draws
    param = Parameterization(s, prediction)
    ab = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = ab / (1 - ab)
    np.testing.assert_allclose(losses.snr(s, t), snr, rtol=1e-5)
    # Min-SNR-gamma (Hang et al. 2023, eq. 8 and its table): min(SNR, 5) / SNR for eps, min(SNR, 5) for x0,
    # min(SNR, 5) / (SNR + 1) for v.
    min_snr = {"eps": np.minimum(snr, 5) / snr, "x0": np.minimum(snr, 5), "v": np.minimum(snr, 5) / (snr + 1)}
    np.testing.assert_allclose(losses.loss_weights(param, t, "min_snr", 5.0), min_snr[prediction], rtol=1e-5)
    # P2 (Choi et al. 2022), k = 1: 1 / (1 + SNR)^gamma on the eps error, carried to x0 and v by the same factors.
    p2 = 1 / (1 + snr) ** 0.5 * {"eps": 1.0, "x0": snr, "v": snr / (snr + 1)}[prediction]
    np.testing.assert_allclose(losses.loss_weights(param, t, "p2", 0.5), p2, rtol=1e-5)
    np.testing.assert_array_equal(losses.loss_weights(param, t, "none", 5.0), np.ones(4))


def test_weighted_losses_weigh_each_examples_mean_error(draws):
    s, x0, eps, t, _ = draws
    param = Parameterization(s, "eps")

    def network(x, tb):  # A fixed wrong output: a different error per example.
        return eps * jnp.arange(1.0, 5.0)[:, None, None, None]

    per_example = np.mean((np.asarray(eps) * np.arange(0.0, 4.0)[:, None, None, None]) ** 2, axis=(1, 2, 3))
    weights = np.asarray(losses.loss_weights(param, t, "min_snr", 5.0))
    np.testing.assert_allclose(losses.diffusion_loss(network, param, x0, t, eps, "min_snr", 5.0),
                               np.mean(weights * per_example), rtol=1e-5)
    # "none" is today's loss, bit for bit: one mean over the batch and all pixels.
    plain = jnp.mean(jnp.square(network(None, t) - eps))
    np.testing.assert_array_equal(losses.diffusion_loss(network, param, x0, t, eps), plain)
    np.testing.assert_array_equal(losses.diffusion_loss(network, param, x0, t, eps, "none", 5.0), plain)
    with pytest.raises(ValueError, match="accepted: none, min_snr, p2"):
        losses.diffusion_loss(network, param, x0, t, eps, "snr", 5.0)
