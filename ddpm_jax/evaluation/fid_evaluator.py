"""FID and KID of EMA samples against the training data, on Inception pool3 features, as pytorch-fid and TTUR.

A `FeatureExtractor` is a jitted network over uint8 images, its batch split over the mesh. A `FidEvaluator` holds one
extractor and the training data's statistics: computed once per dataset, split, resolution and feature network, cached
as .npz under `eval.fid_cache_dir`, and kept in the evaluator so that periodic FID during training reads them once.
"""

from __future__ import annotations

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

from ddpm_jax import data, fileio, metric_writers, outputs, parallel, rng, sampler
from ddpm_jax.errors import DataError
from ddpm_jax.evaluation import fid, inception


class FeatureExtractor:
    """A jitted network from uint8 images (N, H, W, 3) to float32 features (N, D), its batch split over the mesh.

    Every process must pass the same images and gets all features back. `name` identifies the network and its
    weights in the names of cached reference statistics.
    """

    def __init__(self, module: nn.Module, variables: Any, mesh: jax.sharding.Mesh, *, batch_size: int, name: str):
        """Places the variables on every device; batch_size is rounded up to a multiple of the device count."""
        self.module, self.mesh, self.name = module, mesh, name
        self.batch_size = parallel.round_up(batch_size, mesh.size)
        self._variables = jax.device_put(variables, parallel.replicated(mesh))
        self._apply = jax.jit(lambda variables, x: module.apply(variables, x).astype(jnp.float32),
                              in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                              out_shardings=parallel.batch_sharded(mesh))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of uint8 images (N, H, W, 3), batch_size at a time (the last batch padded, then trimmed)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"features take uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        chunks = parallel.map_chunks(lambda i, x: (self._apply(self._variables, x),), [images], len(images),
                                     self.batch_size, self.mesh)
        return np.concatenate([features for (features,) in chunks])


def load_extractor(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> FeatureExtractor:
    """The FID Inception from eval.inception_weights; ConfigError naming the URL and the converter if unusable."""
    path = inception.check_weights_file(config.eval.inception_weights)
    name = f"inception-2015-12-05-{inception.file_digest(path)}"
    return FeatureExtractor(inception.InceptionV3(), inception.load_variables(path), mesh,
                            batch_size=config.eval.fid_batch_size, name=name)


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


def reference_statistics(config: ml_collections.ConfigDict, extractor: FeatureExtractor) -> dict[str, Any]:
    """mu, sigma, KID features and image count of config.data's uint8 images: read from the cache or computed."""
    path = reference_cache_path(config, extractor)
    if os.path.isfile(path):
        with np.load(path) as z:
            reference = {k: z[k] for k in z.files}
        logging.info("FID reference statistics of %d images from %s", int(reference["num_images"]), path)
        return {**reference, "path": path}
    d = config.data
    # Every process reads all images (all feed the same batches); process 0 writes a bucket's cache if one is needed.
    source = data.source_from_config(config, process_index=jax.process_index(), process_count=jax.process_count(),
                                     whole=True)
    n = len(source)
    if n < 2:
        raise DataError(f"data.dataset {d.dataset} has {n} image; FID needs at least 2")
    logging.info("computing FID reference statistics of %d images of %s (%s, %dx%d), once", n, d.dataset, d.split,
                 d.image_size, d.image_size)
    step = extractor.batch_size * 8
    # Chunk by chunk: a large dataset's features (2048 floats per image) never sit in memory whole.
    chunks = (extractor(source.get_batch(np.arange(i, min(i + step, n)))) for i in range(0, n, step))
    reference = fid.summarize_reference_chunks(chunks, n)
    if jax.process_index() == 0:
        fileio.write_npz(path, {**reference, "dataset": str(d.dataset), "split": d.split, "image_size": d.image_size,
                                "extractor": extractor.name}, compress=False)
        logging.info("cached FID reference statistics in %s", path)
    return {**reference, "path": path}


def _sample_batches(sample_fn: sampler.Sampler, params: Any, key: jax.Array, num_samples: int, batch_size: int,
                    mesh: jax.sharding.Mesh, num_classes: int) -> Iterator[np.ndarray]:
    # Always full chunks, so the sampler compiles once; the surplus of the last chunk is dropped.
    chunk = sampler.chunk_size(batch_size, num_samples, mesh.size)
    # Class-conditional models sample classes uniformly, as in the FID of conditional models on balanced data.
    classes = np.random.default_rng(0).integers(0, max(num_classes, 1), (-(-num_samples // chunk), chunk))
    done = 0
    for i in range(len(classes)):
        labels = classes[i].astype(np.int32) if num_classes > 0 else None
        samples, _ = sampler.generate(sample_fn, params, jax.random.fold_in(key, i), chunk, chunk, mesh,
                                      labels=labels)
        take = min(chunk, num_samples - done)
        done += take
        if done * 10 // num_samples > (done - take) * 10 // num_samples:
            logging.info("FID: %d/%d samples", done, num_samples)
        yield samples[:take]


def sample_features(sample_fn: sampler.Sampler, params: Any, key: jax.Array, num_samples: int,
                    sample_batch_size: int, extractor: FeatureExtractor, num_classes: int = 0) -> np.ndarray:
    """Features of num_samples fresh uint8 samples, generated and embedded chunk by chunk (no image is kept).

    num_classes > 0: a class-conditional model, sampled with uniformly drawn class labels.
    """
    features, pending = [], np.zeros((0,), np.uint8)
    for samples in _sample_batches(sample_fn, params, key, num_samples, sample_batch_size, extractor.mesh,
                                   num_classes):
        pending = samples if not pending.size else np.concatenate([pending, samples])
        full = len(pending) // extractor.batch_size * extractor.batch_size
        if full:  # Embed whole extractor batches as they fill; the remainder waits for the next chunk.
            features.append(extractor(pending[:full]))
            pending = pending[full:]
    if pending.size:
        features.append(extractor(pending))
    return np.concatenate(features)


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The FID and KID of a record as TensorBoard scalars fid_<count>, kid_<count> (tags take no '@')."""
    n = fid.count_label(record["num_samples"])
    return {f"fid_{n}": record["fid"], f"kid_{n}": record["kid"]}


class FidEvaluator:
    """Scores EMA samples of a config's model against its training data; holds the extractor and the reference."""

    def __init__(self, config: ml_collections.ConfigDict, extractor: FeatureExtractor):
        """Binds the config (data, sampling, eval keys) and the feature network; the reference is read on first use."""
        self.config, self.extractor = config, extractor
        self._reference: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> FidEvaluator:
        """With the Inception of eval.inception_weights (ConfigError, before anything compiles, if unusable)."""
        return cls(config, load_extractor(config, mesh))

    def reference(self) -> dict[str, Any]:
        """The training data's statistics: from this evaluator, else the cache file, else computed and cached."""
        if self._reference is None:
            self._reference = reference_statistics(self.config, self.extractor)
        return self._reference

    def evaluate(self, sample_fn: sampler.Sampler, params: Any, step: int, num_samples: int,
                 workdir: str) -> dict[str, Any]:
        """Samples, scores against the reference and writes eval/fid_step_<N>_<sampler>_<count>.json."""
        config = self.config
        reference = self.reference()
        features = sample_features(sample_fn, params, rng.fid_samples_key(config.seed), num_samples,
                                   config.sampling.batch_size, self.extractor, config.model.num_classes)
        if num_samples <= features.shape[1]:
            logging.warning("FID of %d samples of %d-d features: the covariance is singular and the score strongly "
                            "biased upwards; use 10,000 or more (50,000 is the standard)", num_samples,
                            features.shape[1])
        scores = fid.score(features, reference, seed=config.seed)
        d = config.data
        record = {
            "step": step, **scores, "sampler": outputs.sampler_label(config), "dataset": str(d.dataset),
            "split": d.split, "image_size": d.image_size, "feature_extractor": self.extractor.name,
            "kid_subsets": fid.KID_SUBSETS,
            "kid_subset_size": min(fid.KID_SUBSET_SIZE, num_samples, len(reference["kid_features"])),
            "reference_cache": reference["path"],
        }
        n = fid.count_label(num_samples)
        path = os.path.join(workdir, "eval", f"fid_step_{step:07d}_{record['sampler']}_{n}.json")
        if jax.process_index() == 0:
            fileio.write_text(path, json.dumps(record, indent=2))
        logging.info("step %d: FID@%s %.4f, KID@%s %.5f +- %.5f (%d samples, %s, vs %d images of %s %s): %s", step,
                     n, scores["fid"], n, scores["kid"], scores["kid_std"], num_samples, record["sampler"],
                     scores["num_reference"], d.dataset, d.split, path)
        return {**record, "path": path}

    def evaluate_during_training(self, sample_fn: sampler.Sampler, ema_params: Any, step: int, workdir: str,
                                 writer: metric_writers.MetricWriter) -> dict[str, Any]:
        """The training loop's hook: FID/KID of training.fid_num_samples samples, to eval/ and TensorBoard."""
        record = self.evaluate(sample_fn, ema_params, step, self.config.training.fid_num_samples, workdir)
        writer.write_scalars(step, tensorboard_scalars(record))
        return record
