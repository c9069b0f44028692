"""FID and KID: the Frechet distance against scipy's sqrtm, KID against the direct pairwise sums."""

import numpy as np
import scipy.linalg

from ddpm_jax.evaluation import fid


def _scipy_frechet(mu1, s1, mu2, s2):
    """pytorch-fid's formula: ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 24
    a = rng.normal(size=(300, d)) @ rng.normal(size=(d, d))
    b = rng.normal(0.3, 1.0, size=(300, d)) @ rng.normal(size=(d, d))
    stats_a, stats_b = fid.gaussian_stats(a), fid.gaussian_stats(b)
    np.testing.assert_allclose(fid.frechet_distance(*stats_a, *stats_b), _scipy_frechet(*stats_a, *stats_b),
                               rtol=1e-9)
    # Fewer samples than dimensions: singular covariances, as with a few hundred samples of 2048-d features.
    few_a, few_b = fid.gaussian_stats(a[:10]), fid.gaussian_stats(b[:10])
    np.testing.assert_allclose(fid.frechet_distance(*few_a, *few_b), _scipy_frechet(*few_a, *few_b), rtol=1e-6)
    assert abs(fid.frechet_distance(*stats_a, *stats_a)) < 1e-9 * np.trace(stats_a[1])
    # One dimension: the distance of N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    one = fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    np.testing.assert_allclose(one, 1.5**2 + (2.0 - 0.5) ** 2)


def _mmd2_direct(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, summed pair by pair."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731

    def within(z):
        return sum(k(z[i], z[j]) for i in range(len(z)) for j in range(len(z)) if i != j) / (len(z) * (len(z) - 1))

    across = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return within(x) + within(y) - 2 * across


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.5, 1.0, size=(9, 5))
    np.testing.assert_allclose(fid.polynomial_mmd2(x, y), _mmd2_direct(x, y), rtol=1e-10)
    # Subsets as large as the sets: every subset is a permutation of the whole set, so all estimates agree.
    mean, std = fid.kernel_inception_distance(x, y[:7], num_subsets=5, subset_size=100)
    np.testing.assert_allclose([mean, std], [_mmd2_direct(x, y[:7]), 0.0], atol=1e-10)
    # Same distribution: KID is unbiased, so about 0; a shifted one: clearly positive.
    a, b, c = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(0.5, 1.0, size=(400, 8))
    same, same_std = fid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = fid.kernel_inception_distance(a, c, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3 and shifted > 10 * abs(same)


def test_count_labels():
    assert [fid.count_label(n) for n in (50_000, 5_000, 1_234, 20)] == ["50k", "5k", "1234", "20"]
