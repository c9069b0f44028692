"""FID and KID: the math against scipy and the direct sums; the pipeline end to end (periodic FID in training,
--mode=fid, the reference cache) with a small injected feature network; missing weights fail in one line."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from conftest import REPO, tiny_config

from ddpm_jax import config_checks, fid, inception, input_pipeline, parallel, train


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


class TinyFeatures(nn.Module):
    """A 16-d stand-in for the Inception: one strided convolution and a spatial mean."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(16, (3, 3), strides=2)(images.astype(jnp.float32) / 127.5 - 1.0)
        return jnp.mean(jnp.tanh(x), axis=(1, 2))


def _tiny_extractor(mesh, name="tiny16"):
    net = TinyFeatures()
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3), jnp.uint8))
    return fid.FeatureExtractor(net, variables, mesh, batch_size=12, name=name)


def test_fid_in_training_and_mode_fid_end_to_end(tiny, tmp_path, monkeypatch):
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    extractor = _tiny_extractor(mesh)
    monkeypatch.setattr(inception, "check_weights_file", lambda path: path)  # The injected net needs no file.
    monkeypatch.setattr(fid, "load_extractor", lambda config, mesh: extractor)
    loads = []
    create_source = input_pipeline.create_source
    monkeypatch.setattr(input_pipeline, "create_source", lambda *a, **k: loads.append(a) or create_source(*a, **k))
    config = tiny
    config.eval.fid_cache_dir = str(tmp_path / "cache")
    config.training.fid_every_steps = 3
    config.training.fid_num_samples = 20
    config.training.checkpoint_every_steps = 6  # One save, at the end: FID at step 3 needs no checkpoint.
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)

    for step in (3, 6):
        with open(os.path.join(workdir, "eval", f"fid_step_{step:07d}_ddim5_eta0_20.json")) as f:
            record = json.load(f)
        assert record["num_samples"] == 20 and record["num_reference"] == 101 and record["step"] == step
        assert record["fid"] > 0 and np.isfinite(record["kid"]) and record["feature_extractor"] == "tiny16"
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert sum('"fid_20"' in line for line in f) == 2
    assert len(loads) == 2  # Training's data, then the reference statistics once: the second FID reused them.
    (cache,) = os.listdir(tmp_path / "cache")
    assert cache.endswith("_train_8px_tiny16.npz")
    reference = np.load(tmp_path / "cache" / cache)
    images = create_source(config.data.dataset, 8).images  # The uint8 training images themselves.
    np.testing.assert_allclose(reference["mu"], extractor(images).astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)

    fid._LAST_REFERENCE.clear()  # As in a new process: the statistics must come from the cache file.
    config.eval.fid_num_samples = 24
    out = fid.fid_from_workdir(config, workdir, extractor=extractor)
    assert len(loads) == 2 and os.listdir(tmp_path / "cache") == [cache]
    assert float(out["FID@24"]) > 0 and "+-" in out["KID@24"]
    assert out["scores"] == os.path.join(workdir, "eval", "fid_step_0000006_ddim5_eta0_24.json")
    assert "101 images" in out["reference"] and "at step 6" in out["samples"]
    # The training images scored against their own statistics: a Frechet distance of zero.
    assert abs(fid.score(extractor(images), reference)["fid"]) < 1e-6


def test_samples_are_embedded_chunk_by_chunk_with_uniform_classes():
    calls = []

    def sampler(params, rng, batch, labels=None):  # Stands in for generation.make_sampler's compiled function.
        calls.append((batch, labels))
        return jnp.full((batch, 8, 8, 3), len(calls), jnp.uint8), jnp.zeros((0, batch, 8, 8, 3), jnp.uint8)

    extractor = _tiny_extractor(parallel.make_mesh())
    features = fid.sample_features(sampler, None, jax.random.PRNGKey(0), 30, 16, extractor, num_classes=3)
    assert features.shape == (30, 16) and [b for b, _ in calls] == [16, 16]  # One compiled batch size.
    np.testing.assert_allclose(features[:16], extractor(np.full((16, 8, 8, 3), 1, np.uint8)), atol=1e-6)
    labels = np.concatenate([np.asarray(c) for _, c in calls])
    assert labels.dtype == np.int32 and set(labels.tolist()) == {0, 1, 2}
    calls.clear()
    fid.sample_features(sampler, None, jax.random.PRNGKey(0), 5, 16, extractor)
    assert calls == [(8, None)]  # Unconditional: no labels; 5 samples round up to the 8 devices.


def test_reference_cache_names_data_split_size_and_network(tmp_path, butterflies_dir, monkeypatch):
    mesh = parallel.make_mesh()
    config = tiny_config(str(butterflies_dir), 8)
    config.eval.fid_cache_dir = str(tmp_path)
    path = fid.reference_cache_path(config, _tiny_extractor(mesh))
    monkeypatch.chdir(butterflies_dir.parent)
    config.data.dataset = butterflies_dir.name  # The same folder by a relative path: the same file.
    assert fid.reference_cache_path(config, _tiny_extractor(mesh)) == path
    assert fid.reference_cache_path(config, _tiny_extractor(mesh, "other")) != path
    config.data.image_size = 16
    assert fid.reference_cache_path(config, _tiny_extractor(mesh)) != path


def test_config_checks_for_fid(tmp_path):
    config = tiny_config("", 8)
    config.training.fid_every_steps = 10
    config.eval.inception_weights = str(tmp_path / "missing.npz")
    with pytest.raises(config_checks.ConfigError, match="no FID Inception weights") as e:
        config_checks.validate(config, num_devices=8)
    assert inception.FID_WEIGHTS_URL in str(e.value)
    config.training.fid_every_steps = 0  # Off: the weights are not needed.
    config_checks.validate(config, num_devices=8)
    config.eval.fid_num_samples = 1
    with pytest.raises(config_checks.ConfigError, match="eval.fid_num_samples=1 must be at least 2"):
        config_checks.validate(config, num_devices=8)


def test_mode_fid_without_weights_is_one_line_before_anything_runs(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "ddpm_jax.main", "--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}",
           "--mode=fid", f"--config.eval.inception_weights={tmp_path / 'none.npz'}"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: eval.inception_weights: no FID Inception weights at ") and \
        inception.FID_WEIGHTS_URL in last and "convert_inception_weights" in last
    assert not os.path.exists(tmp_path / "w")  # Nothing was written.
