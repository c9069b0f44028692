"""RePaint inpainting and SDEdit: paths of timesteps, and the walk driven by exact Gaussian denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MU, STD, gaussian_eps_denoiser

from ddpm_jax.data import masks
from ddpm_jax.diffusion import editing, samplers
from ddpm_jax.diffusion import schedule as sch
from ddpm_jax.diffusion.parameterization import Parameterization

DOWN, UP = editing.DOWN, editing.UP


def positions(moves):
    """The step index after each move, checking that every move starts where the previous one ended."""
    k, out = int(moves[0, 0]), []
    for start, direction in moves:
        assert start == k
        k += direction
        out.append(k)
    return out


def test_jump_schedule_small_example():
    # K=6, j=2, r=2: jumps at indices 0 and 2, once each.
    expected = [(5, DOWN), (4, DOWN), (3, DOWN), (2, UP), (3, UP), (4, DOWN), (3, DOWN), (2, DOWN), (1, DOWN),
                (0, UP), (1, UP), (2, DOWN), (1, DOWN), (0, DOWN)]
    assert [tuple(m) for m in editing.jump_schedule(6, 2, 2).tolist()] == expected


@pytest.mark.parametrize("num_steps,j,r", [(250, 10, 10), (100, 10, 1), (50, 1, 5), (20, 3, 4), (7, 10, 3), (1, 1, 1)])
def test_jump_schedule_counts_and_ends(num_steps, j, r):
    moves = editing.jump_schedule(num_steps, j, r)
    assert moves.dtype == np.int32 and moves.shape[1] == 2
    ups = j * (r - 1) * len(range(0, num_steps - j, j))
    assert (moves[:, 1] == UP).sum() == ups
    assert (moves[:, 1] == DOWN).sum() == num_steps + ups
    assert tuple(moves[0]) == (num_steps - 1, DOWN) and tuple(moves[-1]) == (0, DOWN)
    path = positions(moves)
    assert path[-1] == -1 and min(path) == -1 and max(path) <= num_steps - 1


def test_plain_descent_without_jumps():
    moves = editing.jump_schedule(30, 1, 1)
    np.testing.assert_array_equal(moves[:, 0], np.arange(29, -1, -1))
    assert np.all(moves[:, 1] == DOWN)
    with pytest.raises(ValueError, match="jump_length"):
        editing.jump_schedule(10, 0, 2)


def test_timestep_moves_on_a_respaced_grid():
    grid = editing.step_grid(Parameterization(sch.make_schedule("linear", 1000)), "ddim", 10)
    np.testing.assert_array_equal(grid, [0, 111, 222, 333, 444, 555, 666, 777, 888, 999])
    moves = editing.timestep_moves(editing.jump_schedule(10, 2, 2), grid)
    assert tuple(moves[0]) == (999, 888) and tuple(moves[-1]) == (0, -1)
    assert set(moves[:, 0]) <= set(grid)
    assert {(a, b) for a, b in moves if b > a} <= {(b, a) for a, b in moves if b < a}  # Up moves undo down moves.
    np.testing.assert_array_equal(editing.descent_moves(500, grid), [[500, 444], [444, 333], [333, 222], [222, 111],
                                                                      [111, 0], [0, -1]])
    np.testing.assert_array_equal(editing.step_grid(Parameterization(sch.make_schedule("linear", 50)), "ddpm", None),
                                  np.arange(50))
    assert editing.descent_moves(-1, grid).shape == (0, 2)  # Already clean: nothing to do.


def test_the_walk_is_one_scan_whatever_its_length():
    s = sch.make_schedule("linear", 100)
    x0, keep = jnp.zeros((2, 4, 4, 1)), jnp.ones((2, 4, 4, 1))

    def program(j, r):
        return jax.make_jaxpr(lambda key: editing.inpaint(gaussian_eps_denoiser(s), Parameterization(s), key, x0, keep,
                                                          jump_length=j, resample_count=r))(jax.random.PRNGKey(0)).jaxpr

    short, long = program(1, 1), program(10, 10)  # 100 moves and 1,720 moves.
    assert len(short.eqns) == len(long.eqns)
    assert [e.primitive.name for e in long.eqns].count("scan") == 1


def correlated_denoiser(s: sch.Schedule, c_std: float, tau: float):
    """E[eps | x_t] for images x_0 = c + tau e (one value c ~ N(MU, c_std^2) per image, e ~ N(0, I) per pixel).

    The covariance c_std^2 11^T + tau^2 I has eigenvalue n c_std^2 + tau^2 along the all-ones direction and tau^2
    across it, so the optimal x_0 estimate shrinks the image-mean part and the rest of x_t separately.
    """
    def denoise(x, t):
        ab = sch.extract(s.alphas_cumprod, t, x.shape)
        r = x - jnp.sqrt(ab) * MU
        along = jnp.mean(r, axis=(1, 2, 3), keepdims=True) * jnp.ones_like(r)
        lam = x[0].size * c_std**2 + tau**2
        x0 = MU + jnp.sqrt(ab) * (lam / (ab * lam + 1 - ab) * along + tau**2 / (ab * tau**2 + 1 - ab) * (r - along))
        return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    return denoise


def test_inpainting_keeps_known_pixels_and_fills_with_the_data_distribution():
    s = sch.make_schedule("linear", 1000)
    x0 = jnp.asarray(np.random.default_rng(0).normal(MU, STD, (64, 8, 8, 1)), jnp.float32)
    keep = masks.make_masks("half", 64, 8, seed=0)[..., None]
    out = np.asarray(jax.jit(lambda rng: editing.inpaint(
        gaussian_eps_denoiser(s), Parameterization(s, clip_denoised=False), rng, x0, jnp.asarray(keep),
        method="ddpm", jump_length=10, resample_count=2))(jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(out[keep], np.asarray(x0)[keep])  # Exactly the original, not just to uint8.
    fill = out[~keep]
    assert np.isfinite(fill).all()
    # 2048 filled pixels: standard errors 0.011 (mean) and 0.008 (std).
    assert abs(fill.mean() - MU) < 0.04 and abs(fill.std() - STD) < 0.03, (fill.mean(), fill.std())


def test_inpainting_fill_agrees_with_the_kept_half_and_resampling_helps():
    """Images of one grey level each: the filled half must take the level of the kept half, which RePaint's
    resampling achieves with 20 DDIM steps where plain replacement of the kept pixels falls short."""
    s = sch.make_schedule("linear", 100)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(MU, 0.5, (64, 1, 1, 1)) + 0.05 * rng.normal(size=(64, 8, 8, 1)), jnp.float32)
    keep = masks.make_masks("half", 64, 8, seed=0)[..., None]

    def level_error(j, r):
        out = np.asarray(jax.jit(lambda key: editing.inpaint(
            correlated_denoiser(s, 0.5, 0.05), Parameterization(s, clip_denoised=False), key, x0, jnp.asarray(keep),
            method="ddim", num_steps=20, eta=1.0, jump_length=j, resample_count=r))(jax.random.PRNGKey(0)))
        fill = np.array([o[~k].mean() for o, k in zip(out, keep, strict=True)])
        kept = np.array([o[k].mean() for o, k in zip(np.asarray(x0), keep, strict=True)])
        return float(np.sqrt(np.mean((fill - kept) ** 2)))

    plain, resampled = level_error(1, 1), level_error(2, 5)
    # The levels spread with std 0.5 across images; measured here: 0.065 without and 0.026 with resampling.
    assert resampled < 0.045 and resampled < 0.7 * plain, (plain, resampled)


def test_sdedit_start_controls_how_much_of_the_input_survives():
    s = sch.make_schedule("cosine", 100)
    x0 = np.random.default_rng(2).normal(MU, STD, (2, 256, 4, 4, 1)).astype(np.float32)

    param = Parameterization(s, clip_denoised=False)

    def edit(x):
        return [editing.sdedit(gaussian_eps_denoiser(s), param, jax.random.PRNGKey(5), x, t, method="ddpm")[1]
                for t in (99, 30)]

    (full_a, mid_a), (full_b, _) = [np.asarray(o) for o in jax.jit(edit)(x0[0])], jax.jit(edit)(x0[1])
    assert np.abs(full_a - np.asarray(full_b)).max() < 1e-3  # From T-1 the input is forgotten.
    # Exact q(x_t) and an exact denoiser: the edits of data are data again, and mid-way edits stay near their input.
    for out in (full_a, mid_a):
        assert abs(out.mean() - MU) < 0.02 and abs(out.std() - STD) < 0.02, (out.mean(), out.std())
    # Ancestral steps from x_t sample p(x_0 | x_t): its correlation with x_0 is abar STD^2 / (abar STD^2 + 1 - abar).
    abar = float(s.alphas_cumprod[30])
    expected = abar * STD**2 / (abar * STD**2 + 1 - abar)
    assert abs(np.corrcoef(mid_a.ravel(), x0[0].ravel())[0, 1] - expected) < 0.06, expected
    assert abs(np.corrcoef(full_a.ravel(), x0[0].ravel())[0, 1]) < 0.06
    x_t, out = editing.sdedit(gaussian_eps_denoiser(s), param, jax.random.PRNGKey(5), jnp.asarray(x0[0]), -1)
    np.testing.assert_array_equal(out, x0[0])  # t_start = -1: nothing to undo.
    assert editing.start_timestep(0.0, 100) == -1 and editing.start_timestep(1.0, 100) == 99
    assert editing.start_timestep(0.5, 1000) == 499


def test_noise_sigma_maps_to_the_step_with_that_noise_level():
    s = sch.make_schedule("linear", 1000)
    sigmas = editing.noise_sigmas(np.asarray(s.alphas_cumprod))
    for sigma in (0.005, 0.02, 0.2, 1.0, 30.0):
        t = editing.timestep_for_sigma(np.asarray(s.alphas_cumprod), sigma)
        assert sigma <= sigmas[t] and (t == 0 or sigmas[t - 1] < sigma), (sigma, t)
    assert editing.timestep_for_sigma(np.asarray(s.alphas_cumprod), 0.005) == 0
    assert editing.timestep_for_sigma(np.asarray(s.alphas_cumprod), float(sigmas[300])) == 300
    with pytest.raises(ValueError, match="must be in"):
        editing.timestep_for_sigma(np.asarray(s.alphas_cumprod), 1e6)

    # y = x_0 + sigma z lands exactly on q(x_t | x_0): mean sqrt(abar_t) x_0 and std sqrt(1 - abar_t).
    sigma, x0 = 0.3, 0.4
    t = editing.timestep_for_sigma(np.asarray(s.alphas_cumprod), sigma)
    key_y, key_top = jax.random.split(jax.random.PRNGKey(0))
    y = x0 + sigma * jax.random.normal(key_y, (200_000,))
    x_t = np.asarray(editing.noisy_to_x_t(s, y, t, sigma, jax.random.normal(key_top, y.shape)))
    abar = float(s.alphas_cumprod[t])
    assert abs(x_t.mean() - np.sqrt(abar) * x0) < 0.005 and abs(x_t.std() - np.sqrt(1 - abar)) < 0.005


def test_denoising_known_noise_samples_the_posterior():
    s = sch.make_schedule("linear", 200)
    sigma = 0.3
    rng = np.random.default_rng(3)
    x0 = rng.normal(MU, STD, (256, 4, 4, 1)).astype(np.float32)
    y = jnp.asarray(x0 + sigma * rng.normal(size=x0.shape).astype(np.float32))
    t = editing.timestep_for_sigma(np.asarray(s.alphas_cumprod), sigma)

    def denoise(y, key):
        k1, k2 = jax.random.split(key)
        x_t = editing.noisy_to_x_t(s, y, t, sigma, jax.random.normal(k1, y.shape))
        return editing.denoise_from(gaussian_eps_denoiser(s), Parameterization(s, clip_denoised=False), k2, x_t, t,
                                    method="ddpm")

    out = np.asarray(jax.jit(denoise)(y, jax.random.PRNGKey(0)))
    # Ancestral steps draw from p(x_0 | y) = N(., STD^2 sigma^2 / (STD^2 + sigma^2)): a draw and the truth differ by
    # twice that variance, 0.132, against sigma^2 = 0.09 for the noisy input. A wrong t or scale would miss it.
    post_var = STD**2 * sigma**2 / (STD**2 + sigma**2)
    assert abs(np.mean((out - x0) ** 2) / (2 * post_var) - 1) < 0.1
    assert abs(out.std() - STD) < 0.03


def test_a_descent_from_pure_noise_is_the_sampler_itself():
    """One reverse step under both loops: with eta = 0 no noise is drawn, so walking down from x_T along the DDIM grid
    gives exactly what `samplers.sample` gives from the same x_T."""
    s = sch.make_schedule("cosine", 100)
    param = Parameterization(s, clip_denoised=True)
    key = jax.random.PRNGKey(4)
    shape = (8, 4, 4, 1)
    sampled, _ = samplers.sample(gaussian_eps_denoiser(s), param, key, shape, method="ddim", num_steps=10)
    x_T = jax.random.normal(jax.random.split(key)[0], shape)  # The sampler's own start.
    walked = editing.denoise_from(gaussian_eps_denoiser(s), param, jax.random.PRNGKey(9), x_T, 99, method="ddim",
                                  num_steps=10)
    np.testing.assert_allclose(walked, sampled, rtol=0, atol=1e-6)


def test_multistep_methods_denoise_but_cannot_walk_back_up():
    """SDEdit and denoising are a plain descent, which every method runs; RePaint's jumps need single steps."""
    s = sch.make_schedule("cosine", 100)
    param = Parameterization(s, clip_denoised=False)
    x0 = jnp.asarray(np.random.default_rng(4).normal(MU, STD, (256, 2, 2, 1)), jnp.float32)
    for method in ("dpm_solver++", "unipc", "heun"):
        _, out = jax.jit(lambda x, m=method: editing.sdedit(gaussian_eps_denoiser(s), param, jax.random.PRNGKey(5), x,
                                                           60, method=m, num_steps=20,
                                                           timestep_spacing="trailing"))(x0)
        out = np.asarray(out)
        assert abs(out.mean() - MU) < 0.03 and abs(out.std() - STD) < 0.03, (method, out.mean(), out.std())
    keep = jnp.ones((256, 2, 2, 1))
    with pytest.raises(ValueError, match="multistep and has no single step; the methods with one are ddpm, ddim, heun"):
        editing.inpaint(gaussian_eps_denoiser(s), param, jax.random.PRNGKey(0), x0, keep, method="unipc", num_steps=10)
    heun = np.asarray(editing.inpaint(gaussian_eps_denoiser(s), param, jax.random.PRNGKey(0), x0, keep * 0,
                                      method="heun", num_steps=10, jump_length=2, resample_count=2))
    assert np.isfinite(heun).all() and abs(heun.mean() - MU) < 0.05  # Heun walks up and down like DDIM.
