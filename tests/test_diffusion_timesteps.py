"""The timestep grids: diffusers' linspace, leading and trailing spacings, and Karras' rho = 7 ramp."""

import numpy as np
import pytest

from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion import timesteps


def test_diffusers_spacings():
    assert timesteps.linspace(1000, 10).tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timesteps.leading(1000, 10).tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timesteps.trailing(1000, 10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps.trailing(1000, 3).tolist() == [999, 666, 332]
    np.testing.assert_array_equal(timesteps.linspace(50, 50), np.arange(49, -1, -1))
    with pytest.raises(ValueError, match="sampling.num_steps=51 must be between 1 and diffusion.num_timesteps=50"):
        timesteps.trailing(50, 51)
    with pytest.raises(ValueError, match="accepted: linspace, leading, trailing, karras"):
        timesteps.grid(np.ones(10), 5, "uniform")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_karras_follows_the_rho_7_ramp_in_sigma(name):
    abar = np.asarray(sch.make_schedule(name, 1000).alphas_cumprod, np.float64)
    sigma = np.sqrt((1 - abar) / abar)
    t = timesteps.karras(abar, 10)
    assert len(t) == 10 and t[-1] == 0 and np.all(np.diff(t) < 0)
    # sigma^(1/7) falls linearly from min(sigma_max, 80) to sigma_min, up to rounding to whole timesteps.
    ramp = np.linspace(min(sigma[-1], 80.0) ** (1 / 7), sigma[0] ** (1 / 7), 10)
    assert np.abs(sigma[t] ** (1 / 7) - ramp).max() < 0.02 * ramp.max()
    for n in (1, 5, 100, 1000):  # Any count up to T gives that many distinct timesteps.
        grid = timesteps.karras(abar, n)
        assert len(np.unique(grid)) == n and np.all(np.diff(grid) < 0) and grid[0] < 1000
