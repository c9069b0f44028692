"""The scan samplers, driven by the exact optimal denoiser of a Gaussian data distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling
from ddpm_jax import schedule as sch

MU, STD = 0.3, 0.5  # Data distribution: every pixel i.i.d. N(MU, STD^2).


def gaussian_eps_denoiser(s: sch.Schedule):
    """E[eps | x_t] for x_0 ~ N(MU, STD^2): sqrt(1-ab) (x_t - sqrt(ab) MU) / (ab STD^2 + 1 - ab)."""
    def denoise(x, t):
        ab = sch.extract(s.alphas_cumprod, t, x.shape)
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * STD**2 + 1 - ab)
    return denoise


def gaussian_output(s: sch.Schedule, prediction: str):
    """The same optimal denoiser expressed as an x0 or v prediction."""
    eps_fn = gaussian_eps_denoiser(s)

    def denoise(x, t):
        eps = eps_fn(x, t)
        x0 = sch.predict_x0_from_eps(s, x, t, eps)
        return {"eps": eps, "x0": x0, "v": sch.predict_v(s, x0, t, eps)}[prediction]
    return denoise


@pytest.mark.parametrize(
    "method,num_steps,eta,prediction",
    [("ddpm", None, 0.0, "eps"), ("ddim", 50, 0.0, "eps"), ("ddim", 100, 0.0, "x0"), ("ddim", 500, 1.0, "v")],
)
def test_samples_match_gaussian_data_distribution(method, num_steps, eta, prediction):
    # Coarse steps shrink the spread (20 DDIM steps give std 0.43, 100 give 0.49): the step counts here are
    # chosen where the discretisation error is below the tolerance.
    s = sch.make_schedule("linear", 1000)
    run = jax.jit(lambda rng: sampling.sample(
        gaussian_output(s, prediction), s, rng, (256, 4, 4, 2), method=method, num_steps=num_steps, eta=eta,
        prediction=prediction, clip_denoised=False)[0])
    x = np.asarray(run(jax.random.PRNGKey(1)))
    assert x.shape == (256, 4, 4, 2)
    # 8192 draws: the standard error of the mean is 0.0055 and of the std about 0.004.
    assert abs(x.mean() - MU) < 0.025, x.mean()
    assert abs(x.std() - STD) < 0.025, x.std()


def test_ddim_with_eta_one_over_all_steps_equals_ddpm():
    s = sch.make_schedule("cosine", 100)
    kw = {"prediction": "eps", "clip_denoised": True}
    ddpm, _ = sampling.sample(gaussian_eps_denoiser(s), s, jax.random.PRNGKey(3), (8, 4, 4, 1), method="ddpm", **kw)
    ddim, _ = sampling.sample(
        gaussian_eps_denoiser(s), s, jax.random.PRNGKey(3), (8, 4, 4, 1), method="ddim", num_steps=100, eta=1.0, **kw)
    np.testing.assert_allclose(ddpm, ddim, atol=2e-4)


def test_intermediate_frames_run_from_noise_to_the_sample():
    s = sch.make_schedule("linear", 200)
    x, frames = sampling.sample(gaussian_eps_denoiser(s), s, jax.random.PRNGKey(0), (64, 4, 4, 1),
                                method="ddim", num_steps=40, num_intermediates=5, clip_denoised=False)
    assert frames.shape == (5, 64, 4, 4, 1)
    np.testing.assert_allclose(frames[-1], x)
    # The first recorded frame is still close to unit-variance noise; the last has the data's spread.
    assert float(frames[0].std()) > 0.9
    assert abs(float(frames[-1].std()) - STD) < 0.1


def test_ddim_timesteps_and_validation():
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 1000), np.arange(999, -1, -1))
    ts = sampling.ddim_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError, match="num_steps"):
        sampling.ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="accepted: ddpm, ddim"):
        sampling.sample(lambda x, t: x, sch.make_schedule(), jax.random.PRNGKey(0), (1, 2), method="euler")


def test_to_uint8():
    np.testing.assert_array_equal(sampling.to_uint8(jnp.array([-1.5, -1.0, 0.0, 1.0, 2.0])), [0, 0, 128, 255, 255])
