"""The bound of a trained model on a split: per-term sums, their summary, and invariance to batch and devices."""

import math

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, data, parallel
from ddpm_jax.errors import DataError
from ddpm_jax.evaluation import bits_per_dim


def test_the_bound_does_not_depend_on_batch_size_or_device_count(trained_run, tmp_path):
    """10 images: 8 devices in calls of 8 (the second padded with weight-0 copies), and 1 device in one call; the
    same from the data's prepared cache."""
    workdir, config, _, _ = trained_run
    config = config.copy_and_resolve_references()
    config.eval.split, config.eval.num_examples, config.eval.batch_size = "train", 10, 8
    mesh = parallel.make_mesh()
    model, params, step = checkpointing.restore_ema_params(config, str(workdir), mesh)
    source = data.source_from_config(config)
    eight = bits_per_dim.evaluate_bound(config, model, params, mesh, source, step)
    config.eval.batch_size = 16
    one = bits_per_dim.evaluate_bound(config, model, jax.device_get(params), parallel.make_mesh(jax.devices()[:1]),
                                      source, step)
    assert eight["num_images"] == one["num_images"] == 10
    np.testing.assert_allclose(eight["bpd_per_t"], one["bpd_per_t"], rtol=1e-4, atol=1e-7)
    assert eight["bits_per_dim"] == pytest.approx(one["bits_per_dim"], rel=1e-5)
    parts = ("bits_per_dim", "prior_bpd", "decoder_bpd", "diffusion_bpd")
    assert all(math.isfinite(eight[k]) and eight[k] > 0 for k in parts), eight
    assert eight["bits_per_dim"] == pytest.approx(eight["prior_bpd"] + eight["decoder_bpd"] + eight["diffusion_bpd"])
    assert len(eight["mse_per_t"]) == 100 and all(m > 0 for m in eight["mse_per_t"])
    config.data.cache_dir, config.data.in_memory_max_gib = str(tmp_path), 0.0
    cached = data.source_from_config(config)
    assert isinstance(cached, data.CachedSource)
    streamed = bits_per_dim.evaluate_bound(config, model, jax.device_get(params), parallel.make_mesh(jax.devices()[:1]),
                                           cached, step)
    assert streamed["bits_per_dim"] == one["bits_per_dim"]
    np.testing.assert_array_equal(streamed["bpd_per_t"], one["bpd_per_t"])


def test_a_folder_without_a_held_out_split_names_the_options(tiny):
    with pytest.raises(DataError) as info:
        bits_per_dim.load_split(tiny)
    assert "no subfolder 'test'" in str(info.value) and "--config.eval.split=train" in str(info.value)


def test_summary_buckets_and_parts():
    T, dims = 20, 12
    sums = {"count": np.float64(2), "prior": np.float64(2 * dims * math.log(2) * 0.5),
            "mse": np.linspace(2, 0, T) * 2, "fixed_small": np.full(T, 2 * dims * math.log(2) * 0.1),
            "fixed_large": np.full(T, 2 * dims * math.log(2) * 0.05)}
    s = bits_per_dim.summarize(sums, dims, "fixed_small", num_buckets=4)
    assert s["prior_bpd"] == pytest.approx(0.5) and s["decoder_bpd"] == pytest.approx(0.1)
    assert s["diffusion_bpd"] == pytest.approx(1.9) and s["bits_per_dim"] == pytest.approx(2.5)
    assert s["by_variance"]["fixed_large"]["bits_per_dim"] == pytest.approx(0.5 + 20 * 0.05)
    assert [(b["t_first"], b["t_last"]) for b in s["buckets"]] == [(0, 4), (5, 9), (10, 14), (15, 19)]
    assert s["buckets"][0]["bpd"] == pytest.approx(0.5) and s["buckets"][0]["mse"] == pytest.approx(np.mean(
        np.linspace(2, 0, T)[:5]))
