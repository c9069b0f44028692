"""DPM-Solver++ and UniPC: every step equals diffusers' schedulers on fixed inputs (tests/data/diffusers_multistep.npz,
made by tests/make_diffusers_fixture.py), and the solvers converge at their order on exact Gaussian data."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MU, STD, gaussian_eps_denoiser, gaussian_output

from ddpm_jax.diffusion import samplers
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization

FIXTURE = np.load(pathlib.Path(__file__).parent / "data" / "diffusers_multistep.npz")


@pytest.mark.parametrize("name,method,order", [("dpmpp2m", "dpm_solver++", 2), ("dpmpp3m", "dpm_solver++", 3),
                                               ("unipc", "unipc", 2)])
def test_each_step_equals_diffusers(name, method, order):
    """diffusers' scheduler was fed outputs[i] at step i; our solver gets the same outputs on the same timesteps."""
    ts, outputs = FIXTURE[f"{name}_timesteps"], jnp.asarray(FIXTURE["outputs"])
    param = Parameterization(sch.make_schedule("linear", 1000), "eps", clip_denoised=False)

    def network(x, t):  # The i-th fixed output at the i-th timestep.
        return outputs[jnp.argmax(jnp.asarray(ts) == t[0])]

    _, frames = samplers.descend(network, param, jax.random.PRNGKey(0), jnp.asarray(FIXTURE["x"]), ts, method=method,
                                 solver_order=order, num_intermediates=len(ts))
    expected = FIXTURE[f"{name}_samples"]
    for i in range(len(ts)):  # diffusers computes its schedule in float32, ddpm_jax in float64.
        np.testing.assert_allclose(frames[i], expected[i], rtol=1e-4, atol=1e-5, err_msg=f"{name} step {i}")


def _std_error(param, prediction, method, num_steps, spacing="karras", order=2):
    """|std of the samples - STD| for exact Gaussian data, with no sampling noise: the ODE solvers map x_T affinely,
    so the slope of the map at three starting points is the output's std per unit of the input's."""
    ts = samplers.method_timesteps(param, method, num_steps, spacing)
    abar = float(param.schedule.alphas_cumprod[ts[0]])
    z = jnp.array([-1.0, 0.0, 1.0]).reshape(3, 1, 1, 1)
    x_t = np.sqrt(abar) * MU + np.sqrt(abar * STD**2 + 1 - abar) * z  # x at ts[0] with z = -1, 0, 1 std.
    out = samplers.descend(gaussian_output(param.schedule, prediction), param, jax.random.PRNGKey(0), x_t, ts,
                           method=method, solver_order=order)[0]
    out = np.asarray(out, np.float64).ravel()
    assert abs(out[1] - MU) < 1e-5  # The mean path is exact for every method.
    return abs((out[2] - out[0]) / 2 - STD)


@pytest.mark.parametrize("method,order,ratio", [("ddim", 1, (1.8, 2.2)), ("heun", 2, (3.5, 8.0)),
                                                ("dpm_solver++", 2, (3.5, 8.0)), ("unipc", 2, (3.5, 20.0))])
def test_the_error_falls_at_the_solvers_order(method, order, ratio):
    """Doubling the steps divides the error by 2 for DDIM and by about 4 for second-order solvers (UniPC's corrector
    adds an order), measured from 20 to 80 karras-spaced steps on the linear schedule, above float32 noise."""
    param = Parameterization(sch.make_schedule("linear", 1000), "eps", clip_denoised=False)
    errors = [_std_error(param, "eps", method, n, order=order) for n in (20, 40, 80)]
    assert errors[-1] > 1e-5, errors  # Still above float32 rounding.
    for a, b in zip(errors, errors[1:], strict=False):
        assert ratio[0] < a / b < ratio[1], (method, errors)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_beats_ddim_at_10_and_20_steps(prediction):
    """On the quickstart's cosine schedule with diffusers' trailing spacing, for eps and v models."""
    param = Parameterization(sch.make_schedule("cosine", 1000), prediction, clip_denoised=False)
    for n in (10, 20):
        ddim = _std_error(param, prediction, "ddim", n, "trailing")
        dpm = _std_error(param, prediction, "dpm_solver++", n, "trailing")
        unipc = _std_error(param, prediction, "unipc", n, "trailing")
        assert dpm < 0.5 * ddim and unipc < 0.5 * ddim, (n, ddim, dpm, unipc)


def test_sampling_from_noise_draws_the_data_distribution():
    """Through samplers.sample from fresh noise: 8192 draws with the data's mean and spread."""
    s = sch.make_schedule("cosine", 100)
    param = Parameterization(s, "eps", clip_denoised=False)
    # Heun from the cosine schedule's sigma_{T-1} = 2e4 needs many steps; Karras' spacing starts it at sigma 80.
    for method, spacing in (("dpm_solver++", "trailing"), ("unipc", "trailing"), ("heun", "karras")):
        x = np.asarray(jax.jit(lambda k, m=method, sp=spacing: samplers.sample(
            gaussian_eps_denoiser(s), param, k, (256, 4, 4, 2), method=m, num_steps=20,
            timestep_spacing=sp)[0])(jax.random.PRNGKey(1)))
        assert abs(x.mean() - MU) < 0.025 and abs(x.std() - STD) < 0.025, (method, x.mean(), x.std())
