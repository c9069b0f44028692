"""The reverse steps and the scan sampler, driven by the exact optimal denoiser of a Gaussian data distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MU, STD, gaussian_eps_denoiser, gaussian_output

from ddpm_jax import pixels
from ddpm_jax.diffusion import samplers
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization


@pytest.mark.parametrize(
    "method,num_steps,eta,prediction",
    [("ddpm", None, 0.0, "eps"), ("ddim", 50, 0.0, "eps"), ("ddim", 100, 0.0, "x0"), ("ddim", 500, 1.0, "v")],
)
def test_samples_match_gaussian_data_distribution(method, num_steps, eta, prediction):
    # Coarse steps shrink the spread (20 DDIM steps give std 0.43, 100 give 0.49): the step counts here are
    # chosen where the discretisation error is below the tolerance.
    s = sch.make_schedule("linear", 1000)
    param = Parameterization(s, prediction, clip_denoised=False)
    run = jax.jit(lambda rng: samplers.sample(
        gaussian_output(s, prediction), param, rng, (256, 4, 4, 2), method=method, num_steps=num_steps, eta=eta)[0])
    x = np.asarray(run(jax.random.PRNGKey(1)))
    assert x.shape == (256, 4, 4, 2)
    # 8192 draws: the standard error of the mean is 0.0055 and of the std about 0.004.
    assert abs(x.mean() - MU) < 0.025, x.mean()
    assert abs(x.std() - STD) < 0.025, x.std()


def test_ddim_with_eta_one_over_all_steps_equals_ddpm():
    s = sch.make_schedule("cosine", 100)
    param = Parameterization(s, "eps", clip_denoised=True)
    ddpm, _ = samplers.sample(gaussian_eps_denoiser(s), param, jax.random.PRNGKey(3), (8, 4, 4, 1), method="ddpm")
    ddim, _ = samplers.sample(
        gaussian_eps_denoiser(s), param, jax.random.PRNGKey(3), (8, 4, 4, 1), method="ddim", num_steps=100, eta=1.0)
    np.testing.assert_allclose(ddpm, ddim, atol=2e-4)


def test_intermediate_frames_run_from_noise_to_the_sample():
    s = sch.make_schedule("linear", 200)
    x, frames = samplers.sample(gaussian_eps_denoiser(s), Parameterization(s, clip_denoised=False),
                                jax.random.PRNGKey(0), (64, 4, 4, 1), method="ddim", num_steps=40, num_intermediates=5)
    assert frames.shape == (5, 64, 4, 4, 1)
    np.testing.assert_allclose(frames[-1], x)
    # The first recorded frame is still close to unit-variance noise; the last has the data's spread.
    assert float(frames[0].std()) > 0.9
    assert abs(float(frames[-1].std()) - STD) < 0.1


def test_timesteps_of_each_method_and_validation():
    np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 1000), np.arange(999, -1, -1))
    param = Parameterization(sch.make_schedule("linear", 1000))
    np.testing.assert_array_equal(samplers.method_timesteps(param, "ddpm"), np.arange(999, -1, -1))
    ts = samplers.method_timesteps(param, "ddim", 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(ts, samplers.ddim_timesteps(1000, 10))
    with pytest.raises(ValueError, match="num_steps"):
        samplers.ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError, match=r"accepted: ddpm, ddim, heun, dpm_solver\+\+, unipc"):
        samplers.sample(lambda x, t: x, Parameterization(sch.make_schedule()), jax.random.PRNGKey(0), (1, 2),
                        method="euler")


def test_ddim_step_with_eta_zero_moves_to_the_predicted_x0_on_the_noise_it_implies():
    """x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps: deterministic, and at t_next = -1 it is x0 itself."""
    s = sch.make_schedule("linear", 100)
    param = Parameterization(s, clip_denoised=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
    denoise = gaussian_eps_denoiser(s)
    x0, eps = param.predict(denoise, x, jnp.int32(60))
    step = samplers.reverse_step("ddim", 0.0)
    noise = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    moved = step(param, denoise, x, jnp.int32(60), jnp.int32(20), noise)
    ab = float(s.alphas_cumprod[20])
    np.testing.assert_allclose(moved, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step(param, denoise, x, jnp.int32(60), jnp.int32(-1), noise), x0, atol=1e-6)


def test_ddpm_step_adds_the_posterior_noise_except_at_the_last_step():
    s = sch.make_schedule("linear", 100)
    param = Parameterization(s, clip_denoised=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 1))
    denoise = gaussian_eps_denoiser(s)
    noise = jnp.ones_like(x)
    for t in (50, 0):
        x0, _ = param.predict(denoise, x, jnp.int32(t))
        mean, var, _ = sch.q_posterior(s, x0, x, jnp.full((2,), t))
        got = samplers.ddpm_step(param, denoise, x, jnp.int32(t), jnp.int32(t - 1), noise)
        expected = mean + (np.sqrt(np.asarray(var)) if t > 0 else 0.0) * noise
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_to_uint8_and_back():
    np.testing.assert_array_equal(pixels.to_uint8(jnp.array([-1.5, -1.0, 0.0, 1.0, 2.0])), [0, 0, 128, 255, 255])
    levels = jnp.arange(256, dtype=jnp.uint8)
    np.testing.assert_array_equal(pixels.to_uint8(pixels.to_model_range(levels)), levels)
