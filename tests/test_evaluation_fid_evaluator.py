"""The FID pipeline with a small injected feature network: periodic FID in training, the reference cache, chunked
embedding of samples with uniform classes, and the features of a batch split over the devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from helpers import tiny_config, tiny_extractor

from ddpm_jax import data, metric_writers, parallel
from ddpm_jax.evaluation import fid, fid_evaluator


def test_fid_during_training_scores_and_caches_the_reference_once(trained_run):
    workdir, config, extractor, loads = trained_run
    for step in (20, 40):
        record = json.loads((workdir / "eval" / f"fid_step_{step:07d}_ddim5_eta0_8.json").read_text())
        assert record["num_samples"] == 8 and record["num_reference"] == 101 and record["step"] == step
        assert record["fid"] > 0 and np.isfinite(record["kid"]) and record["feature_extractor"] == "tiny16"
    logged = metric_writers.read_scalars(str(workdir))
    assert list(logged["fid_8"][0]) == [20, 40] and list(logged["kid_8"][0]) == [20, 40]
    assert len(loads) == 2  # Training's data, then the reference statistics once: the second FID reused them.
    cache = fid_evaluator.reference_cache_path(config, extractor)
    assert cache.endswith("_train_8px_tiny16.npz")
    reference = np.load(cache)
    images = data.create_source(config.data.dataset, 8).images  # The uint8 training images themselves.
    np.testing.assert_allclose(reference["mu"], extractor(images).astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    # The training images scored against their own statistics: a Frechet distance of zero.
    assert abs(fid.score(extractor(images), reference)["fid"]) < 1e-6
    # A new evaluator (as in a new process) reads the cache file instead of the data.
    evaluator = fid_evaluator.FidEvaluator(config, extractor)
    np.testing.assert_array_equal(evaluator.reference()["mu"], reference["mu"])
    assert len(loads) == 2


def test_features_of_a_split_batch_equal_one_device_at_a_time():
    images = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), np.uint8)
    eight = tiny_extractor()(images)  # Batches of 16 over 8 devices; the second padded.
    one = tiny_extractor(parallel.make_mesh(jax.devices()[:1]))(images)
    assert eight.shape == (30, 16) and eight.dtype == np.float32
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)


def test_samples_are_embedded_chunk_by_chunk_with_uniform_classes():
    calls = []

    def sample_fn(params, key, batch, labels=None):  # Stands in for sampler.make_sampler's compiled function.
        calls.append((batch, None if labels is None else np.asarray(labels)))
        return jnp.full((batch, 8, 8, 3), len(calls), jnp.uint8), jnp.zeros((0, batch, 8, 8, 3), jnp.uint8)

    extractor = tiny_extractor()
    features = fid_evaluator.sample_features(sample_fn, None, jax.random.PRNGKey(0), 30, 16, extractor, num_classes=3)
    assert features.shape == (30, 16) and [b for b, _ in calls] == [16, 16]  # One compiled batch size.
    np.testing.assert_allclose(features[:16], extractor(np.full((16, 8, 8, 3), 1, np.uint8)), atol=1e-6)
    labels = np.concatenate([c for _, c in calls])
    assert labels.dtype == np.int32 and set(labels.tolist()) == {0, 1, 2}
    calls.clear()
    fid_evaluator.sample_features(sample_fn, None, jax.random.PRNGKey(0), 5, 16, extractor)
    assert calls == [(8, None)]  # Unconditional: no labels; 5 samples round up to the 8 devices.


def test_reference_cache_names_data_split_size_and_network(tmp_path, butterflies_dir, monkeypatch):
    config = tiny_config(str(butterflies_dir), 8)
    config.eval.fid_cache_dir = str(tmp_path)
    extractor = tiny_extractor()
    path = fid_evaluator.reference_cache_path(config, extractor)
    monkeypatch.chdir(butterflies_dir.parent)
    config.data.dataset = butterflies_dir.name  # The same folder by a relative path: the same file.
    assert fid_evaluator.reference_cache_path(config, extractor) == path
    assert fid_evaluator.reference_cache_path(config, tiny_extractor(name="other")) != path
    config.data.image_size = 16
    assert fid_evaluator.reference_cache_path(config, extractor) != path


def test_reference_statistics_from_a_prepared_cache_equal_those_from_memory(tmp_path, butterflies_dir):
    extractor = tiny_extractor()
    config = tiny_config(str(butterflies_dir), 8)
    config.eval.fid_cache_dir = str(tmp_path / "memory")
    memory = fid_evaluator.reference_statistics(config, extractor)
    config.eval.fid_cache_dir = str(tmp_path / "streamed")
    config.data.cache_dir, config.data.in_memory_max_gib = str(tmp_path / "caches"), 0.0
    streamed = fid_evaluator.reference_statistics(config, extractor)
    assert any((tmp_path / "caches").iterdir())  # read from the cache that the call prepared
    np.testing.assert_allclose(streamed["mu"], memory["mu"], rtol=1e-12)
    np.testing.assert_allclose(streamed["sigma"], memory["sigma"], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(streamed["kid_features"], memory["kid_features"])
    assert int(streamed["num_images"]) == 101
