"""FID and KID of generated samples against the training data, on Inception pool3 features (`--mode=fid`).

The math (`gaussian_stats`, `frechet_distance`, `polynomial_mmd2`, `kernel_inception_distance`) is pure numpy in
float64. Features come from a `FeatureExtractor`: a jitted network over uint8 images, its batch split over the mesh.
The training data's statistics are computed once per dataset, split, resolution and feature network, and cached
as .npz under `eval.fid_cache_dir`. Every score is stored with its sample count: FID falls as the number of
samples grows, so only scores at the same count (FID@50k vs FID@5k) compare.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import config_checks, fileio, generation, inception, input_pipeline, metrics, parallel

# Binkowski et al. and clean-fid: the mean of 100 unbiased MMD^2 estimates on subsets of 1,000 features.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_REFERENCE_FEATURES = 10_000  # Reference features kept in the cache for KID (2048 floats each).


# --------------------------------------------------------------------------------------------------------------------
# The math: pure numpy, float64.


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
    mu, sigma = gaussian_stats(features)
    keep = np.random.default_rng(seed).permutation(len(features))[:KID_REFERENCE_FEATURES]
    return {"mu": mu, "sigma": sigma, "kid_features": np.asarray(features, np.float32)[np.sort(keep)],
            "num_images": np.asarray(len(features))}


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


# --------------------------------------------------------------------------------------------------------------------
# Feature extraction on the mesh.


@functools.lru_cache(maxsize=8)
def _jitted_apply(module: nn.Module, mesh: jax.sharding.Mesh) -> Any:
    # Cached per (module, mesh) so that every extractor of the same network shares one compiled function.
    return jax.jit(lambda variables, x: module.apply(variables, x).astype(jnp.float32),
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                   out_shardings=parallel.batch_sharded(mesh))


class FeatureExtractor:
    """A jitted network from uint8 images (N, H, W, 3) to float32 features (N, D), its batch split over the mesh.

    Every process must pass the same images; each feeds its share of every batch and gets all features back.
    `name` identifies the network and its weights in the names of cached reference statistics.
    """

    def __init__(self, module: nn.Module, variables: Any, mesh: jax.sharding.Mesh, *, batch_size: int, name: str):
        """Places the variables on every device; batch_size is rounded up to a multiple of the device count."""
        self.module, self.mesh, self.name = module, mesh, name
        self.batch_size = -(-batch_size // mesh.size) * mesh.size
        self._variables = jax.device_put(variables, parallel.replicated(mesh))
        self._apply = _jitted_apply(module, mesh)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of uint8 images (N, H, W, 3); the last batch is padded with black images and trimmed."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"features take uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        per_process = self.batch_size // jax.process_count()
        first = jax.process_index() * per_process
        out, in_flight = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
            batch[: len(chunk)] = chunk
            local = parallel.global_batch(self.mesh, batch[first : first + per_process])
            in_flight.append((self._apply(self._variables, local), len(chunk)))
            if len(in_flight) > 1:  # Fetch the previous batch while this one runs.
                features, n = in_flight.pop(0)
                out.append(parallel.fetch(features)[:n])
        out += [parallel.fetch(features)[:n] for features, n in in_flight]
        return np.concatenate(out)


def _weights_path(config: ml_collections.ConfigDict) -> str:
    return os.path.abspath(os.path.expanduser(config.eval.inception_weights or inception.DEFAULT_WEIGHTS))


@functools.lru_cache(maxsize=1)
def _load_inception(path: str, mtime_ns: int, batch_size: int, mesh: jax.sharding.Mesh) -> FeatureExtractor:
    del mtime_ns  # Only part of the cache key: a re-converted file is read again.
    name = f"inception-2015-12-05-{inception.file_digest(path)}"
    return FeatureExtractor(inception.InceptionV3(), inception.load_variables(path), mesh, batch_size=batch_size,
                            name=name)


def load_extractor(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> FeatureExtractor:
    """The FID Inception from eval.inception_weights (read once per process); ConfigError naming the URL if missing."""
    path = _weights_path(config)
    inception.check_weights_file(config.eval.inception_weights)
    return _load_inception(path, os.stat(path).st_mtime_ns, config.eval.fid_batch_size, mesh)


# --------------------------------------------------------------------------------------------------------------------
# Reference statistics of the training data, cached on disk.


def reference_cache_path(config: ml_collections.ConfigDict, extractor: FeatureExtractor) -> str:
    """`<fid_cache_dir>/<dataset>-<hash>_<split>_<size>px_<extractor name>.npz`: one file per data and network."""
    d = config.data
    spec = str(d.dataset).strip()
    local = os.path.expanduser(spec)
    if os.path.isdir(local):  # The same folder reached by two relative paths shares one cache file.
        spec = os.path.realpath(local)
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", os.path.basename(os.path.normpath(spec)) or spec).strip("_")[:40]
    key = hashlib.sha256(spec.encode()).hexdigest()[:8]
    name = f"{stem}-{key}_{d.split}_{d.image_size}px_{extractor.name}.npz"
    return os.path.join(os.path.expanduser(config.eval.fid_cache_dir), name)


_LAST_REFERENCE: dict[str, dict[str, Any]] = {}  # The last statistics used, so periodic FID reads them once.


def reference_statistics(config: ml_collections.ConfigDict, extractor: FeatureExtractor) -> dict[str, Any]:
    """mu, sigma, KID features and image count of config.data's uint8 images: read from the cache or computed once."""
    path = reference_cache_path(config, extractor)
    if path in _LAST_REFERENCE:
        return _LAST_REFERENCE[path]
    _LAST_REFERENCE.clear()
    _LAST_REFERENCE[path] = reference = _reference_statistics(config, extractor, path)
    return reference


def _reference_statistics(config: ml_collections.ConfigDict, extractor: FeatureExtractor, path: str) -> dict[str, Any]:
    if os.path.isfile(path):
        with np.load(path) as z:
            reference = {k: z[k] for k in z.files}
        logging.info("FID reference statistics of %d images from %s", int(reference["num_images"]), path)
        return {**reference, "path": path}
    d = config.data
    # Every process reads all images, so that all of them feed the same batches to the extractor.
    source = input_pipeline.create_source(d.dataset, d.image_size, split=d.split,
                                          tfds_data_dir=d.tfds_data_dir or None)
    n = len(source)
    if n < 2:
        raise input_pipeline.DataError(f"data.dataset {d.dataset} has {n} image; FID needs at least 2")
    logging.info("computing FID reference statistics of %d images of %s (%s, %dx%d), once", n, d.dataset, d.split,
                 d.image_size, d.image_size)
    step = extractor.batch_size * 8
    features = np.concatenate([extractor(source.get_batch(np.arange(i, min(i + step, n))))
                               for i in range(0, n, step)])
    reference = summarize_reference(features)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **reference, dataset=str(d.dataset), split=d.split, image_size=d.image_size,
                 extractor=extractor.name)
        os.replace(tmp, path)  # Never leave a half-written cache file under the final name.
        logging.info("cached FID reference statistics in %s", path)
    return {**reference, "path": path}


# --------------------------------------------------------------------------------------------------------------------
# Sampling and scoring.


def _sample_batches(sampler: generation.Sampler, params: Any, rng: jax.Array, num_samples: int, batch_size: int,
                    num_devices: int, num_classes: int) -> Iterator[np.ndarray]:
    # Always full chunks, so the sampler compiles once; the surplus of the last chunk is dropped.
    chunk = -(-min(batch_size, num_samples) // num_devices) * num_devices
    # Class-conditional models sample classes uniformly, as in the FID of conditional models on balanced data.
    classes = np.random.default_rng(0).integers(0, max(num_classes, 1), (-(-num_samples // chunk), chunk))
    done = 0
    for i in range(len(classes)):
        labels = classes[i].astype(np.int32) if num_classes > 0 else None
        samples, _ = generation.generate(sampler, params, jax.random.fold_in(rng, i), chunk, chunk, num_devices,
                                         labels=labels)
        take = min(chunk, num_samples - done)
        done += take
        if done * 10 // num_samples > (done - take) * 10 // num_samples:
            logging.info("FID: %d/%d samples", done, num_samples)
        yield samples[:take]


def sample_features(sampler: generation.Sampler, params: Any, rng: jax.Array, num_samples: int,
                    sample_batch_size: int, extractor: FeatureExtractor, num_classes: int = 0) -> np.ndarray:
    """Features of num_samples fresh uint8 samples, generated and embedded chunk by chunk (no image is kept).

    num_classes > 0: a class-conditional model, sampled with uniformly drawn class labels.
    """
    features, pending = [], np.zeros((0,), np.uint8)
    for samples in _sample_batches(sampler, params, rng, num_samples, sample_batch_size, extractor.mesh.size,
                                   num_classes):
        pending = samples if not pending.size else np.concatenate([pending, samples])
        full = len(pending) // extractor.batch_size * extractor.batch_size
        if full:  # Embed whole extractor batches as they fill; the remainder waits for the next chunk.
            features.append(extractor(pending[:full]))
            pending = pending[full:]
    if pending.size:
        features.append(extractor(pending))
    return np.concatenate(features)


def sampler_label(config: ml_collections.ConfigDict) -> str:
    """ddpm<T> or ddim<steps>_eta<eta> (with _w<guidance> for class-conditional models), as in sample file names."""
    s = config.sampling
    label = f"ddpm{config.diffusion.num_timesteps}" if s.method == "ddpm" else f"ddim{s.num_steps}_eta{s.eta:g}"
    return label + (f"_w{s.guidance_scale:g}" if config.model.num_classes > 0 else "")


def evaluate(config: ml_collections.ConfigDict, sampler: generation.Sampler, params: Any, step: int,
             num_samples: int, extractor: FeatureExtractor, workdir: str) -> dict[str, Any]:
    """Samples, scores against the cached reference and writes eval/fid_step_<N>_<sampler>_<count>.json."""
    reference = reference_statistics(config, extractor)
    rng = jax.random.PRNGKey(config.seed + 3)  # The same noise at every evaluation, so the curve is less noisy.
    features = sample_features(sampler, params, rng, num_samples, config.sampling.batch_size, extractor,
                               config.model.num_classes)
    if num_samples <= features.shape[1]:
        logging.warning("FID of %d samples of %d-d features: the covariance is singular and the score strongly "
                        "biased upwards; use 10,000 or more (50,000 is the standard)", num_samples, features.shape[1])
    scores = score(features, reference, seed=config.seed)
    d = config.data
    record = {
        "step": step, **scores, "sampler": sampler_label(config), "dataset": str(d.dataset), "split": d.split,
        "image_size": d.image_size, "feature_extractor": extractor.name, "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(KID_SUBSET_SIZE, num_samples, len(reference["kid_features"])),
        "reference_cache": reference["path"],
    }
    n = count_label(num_samples)
    path = os.path.join(workdir, "eval", f"fid_step_{step:07d}_{record['sampler']}_{n}.json")
    if jax.process_index() == 0:
        fileio.write_text(path, json.dumps(record, indent=2))
    logging.info("step %d: FID@%s %.4f, KID@%s %.5f +- %.5f (%d samples, %s, vs %d images of %s %s): %s", step, n,
                 scores["fid"], n, scores["kid"], scores["kid_std"], num_samples, record["sampler"],
                 scores["num_reference"], d.dataset, d.split, path)
    return {**record, "path": path}


def _tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    n = count_label(record["num_samples"])
    return {f"fid_{n}": record["fid"], f"kid_{n}": record["kid"]}  # TensorBoard tags take no '@'.


def evaluate_during_training(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                             sampler: generation.Sampler, ema_params: Any, step: int,
                             writer: metrics.MetricWriter) -> dict[str, Any]:
    """The training loop's hook: FID/KID of training.fid_num_samples samples, to eval/ and TensorBoard."""
    extractor = load_extractor(config, mesh)
    record = evaluate(config, sampler, ema_params, step, config.training.fid_num_samples, extractor,
                      fileio.resolve(workdir))
    writer.write_scalars(step, _tensorboard_scalars(record))
    return record


def fid_from_workdir(config: ml_collections.ConfigDict, workdir: str,
                     extractor: FeatureExtractor | None = None) -> dict[str, str]:
    """`--mode=fid`: FID and KID of eval.fid_num_samples samples from the EMA weights of the latest checkpoint.

    `extractor` replaces the Inception network (tests inject a small one). Returns {label: value} for the console.
    """
    from ddpm_jax import train  # Local import: train imports this module for its periodic FID.

    workdir = fileio.resolve(workdir)  # A local folder or a gs:// URL.
    mesh = parallel.make_mesh()
    config_checks.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    extractor = extractor or load_extractor(config, mesh)  # Missing weights fail here, before anything compiles.
    model, ema_params, step = generation.restore_ema_params(config, workdir, mesh)
    reference_statistics(config, extractor)  # Data problems surface before the long sampling.
    sampler = generation.make_sampler(config, model, train.create_schedule(config), mesh)
    record = evaluate(config, sampler, ema_params, step, config.eval.fid_num_samples, extractor, workdir)
    writer = metrics.MetricWriter(os.path.join(workdir, "tensorboard"))
    try:
        writer.write_scalars(step, _tensorboard_scalars(record))
    finally:
        writer.close()
    n = count_label(record["num_samples"])
    return {
        f"FID@{n}": f"{record['fid']:.4f}",
        f"KID@{n}": f"{record['kid']:.5f} +- {record['kid_std']:.5f}",
        "samples": f"{record['num_samples']} from the EMA weights at step {step} ({record['sampler']})",
        "reference": f"{record['num_reference']} images of {config.data.dataset} ({config.data.split}, "
                     f"{config.data.image_size}x{config.data.image_size}), cached in {record['reference_cache']}",
        "scores": record["path"],
    }
