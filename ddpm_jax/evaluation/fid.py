"""The math of FID and KID, pure numpy in float64: Gaussian statistics, the Frechet distance, the unbiased MMD.

Features come from evaluation.fid_evaluator. Every score is stored with its sample count: FID falls as the number of
samples grows, so only scores at the same count (FID@50k vs FID@5k) compare.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

# Binkowski et al. and clean-fid: the mean of 100 unbiased MMD^2 estimates on subsets of 1,000 features.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_REFERENCE_FEATURES = 10_000  # Reference features kept in the cache for KID (2048 floats each).


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2, in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)): the Frechet distance of two Gaussians."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    # sigma1 sigma2 = A (A sigma2) with A = sigma1^(1/2) has the eigenvalues of A sigma2 A, which is symmetric PSD:
    # two symmetric eigendecompositions give tr((sigma1 sigma2)^(1/2)) without a general sqrtm, and stay exact
    # when the covariances are singular (fewer samples than feature dimensions).
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D) under the kernel k(a, b) = (a.b / D + 1)^3."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    if m < 2 or n < 2 or y.shape[1] != d:
        raise ValueError(f"need two sets of >= 2 features of equal dimension, got {x.shape} and {y.shape}")
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    # The unbiased estimate leaves out the k(a, a) terms of the within-set means.
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_inception_distance(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation of `polynomial_mmd2` over random subsets (without replacement) of each set."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(len(f1), len(f2), subset_size)
    rng = np.random.default_rng(seed)
    estimates = [
        polynomial_mmd2(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(estimates)), float(np.std(estimates))


def summarize_reference(features: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """What the cache keeps of the training data's features: mu, sigma, a KID subsample and the image count."""
    return summarize_reference_chunks([features], len(features), seed)


def summarize_reference_chunks(chunks: Iterable[np.ndarray], count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """summarize_reference over features that arrive in chunks (count rows in all), holding only O(D^2) at once.

    Sums are taken about the first chunk's mean in float64 (as accurate as np.cov); the KID subsample is the same
    rows summarize_reference would pick.
    """
    if count < 2:
        raise ValueError(f"need at least 2 feature rows, got {count}")
    keep = np.sort(np.random.default_rng(seed).permutation(count)[:KID_REFERENCE_FEATURES])
    shift = s1 = s2 = None
    kept, n = [], 0
    for chunk in chunks:
        f = np.asarray(chunk, np.float64)
        if shift is None:
            shift = f.mean(axis=0)
            s1, s2 = np.zeros_like(shift), np.zeros((len(shift), len(shift)))
        centred = f - shift
        s1 += centred.sum(axis=0)
        s2 += centred.T @ centred
        rows = keep[(keep >= n) & (keep < n + len(f))] - n
        kept.append(np.asarray(chunk, np.float32)[rows])
        n += len(f)
    if n != count:
        raise ValueError(f"expected {count} feature rows, got {n}")
    mu = shift + s1 / n
    sigma = (s2 - np.outer(s1, s1) / n) / (n - 1)
    return {"mu": mu, "sigma": sigma, "kid_features": np.concatenate(kept), "num_images": np.asarray(n)}


def score(features: np.ndarray, reference: dict[str, Any], seed: int = 0) -> dict[str, float | int]:
    """FID and KID (mean, std) of sample features against a reference from `summarize_reference`."""
    mu, sigma = gaussian_stats(features)
    fid = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    kid, kid_std = kernel_inception_distance(features, reference["kid_features"], seed=seed)
    return {"fid": fid, "kid": kid, "kid_std": kid_std, "num_samples": len(features),
            "num_reference": int(reference["num_images"])}


def count_label(n: int) -> str:
    """Short sample count for labels: 50000 -> '50k', 5000 -> '5k', 1234 -> '1234'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)
