"""--mode=eval end to end: train a tiny model on Fashion-MNIST, then its bound on the held-out t10k images."""

import ast
import json
import math
import sys

import ml_collections
import numpy as np
import pytest
from conftest import REPO
from test_images import _read_events
from test_input_pipeline import fashion_mnist_dir  # noqa: F401 (a fixture)
from test_main import TINY_FLAGS, run_main

from ddpm_jax import config_checks, evaluation


def quickstart_with_flags(flags: list[str]) -> ml_collections.ConfigDict:
    """configs/quickstart.py with --config.KEY=VALUE flags applied, as main would build it."""
    sys.path.insert(0, str(REPO))
    from configs import quickstart

    config = quickstart.get_config()
    for flag in flags:
        key, value = flag.removeprefix("--config.").split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value
    return config


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, fashion_mnist_dir):  # noqa: F811 (the imported fixture)
    """A tiny 8x8 model (T=50) trained 4 steps on Fashion-MNIST, then --mode=eval through main on 2 devices."""
    workdir = tmp_path_factory.mktemp("eval") / "run"
    flags = [f"--config.data.dataset={fashion_mnist_dir}", *TINY_FLAGS]
    # The same flags as test_main's first run, so the two share main's compilation cache for the train step.
    trained = run_main(workdir, *flags, "--config.training.num_train_steps=4")
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run_main(workdir, *flags, "--mode=eval", "--config.eval.num_examples=10", "--config.eval.batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    path = workdir / "eval" / "bpd_step_0000004_10img.json"
    return workdir, quickstart_with_flags(flags), result, path, json.loads(path.read_text())


def test_eval_through_main_writes_finite_bits_per_dim(evaluated):
    workdir, _, result, path, r = evaluated
    assert f"eval results: {path}" in result.stdout
    assert "(10 images of split 'test', step 4, fixed_large variance)" in result.stdout.split("bits/dim: ")[1]
    assert "eval: 8 images | bits/dim so far" in result.stderr  # Progress after the second of three calls.

    assert (r["step"], r["num_images"], r["split"], r["num_dims"], r["num_timesteps"]) == (4, 10, "test", 192, 50)
    parts = ("bits_per_dim", "prior_bpd", "decoder_bpd", "diffusion_bpd")
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in parts), r
    assert r["bits_per_dim"] == pytest.approx(r["prior_bpd"] + r["decoder_bpd"] + r["diffusion_bpd"])
    assert r["bits_per_dim"] == pytest.approx(r["prior_bpd"] + sum(r["bpd_per_t"]))
    assert r["by_variance"]["fixed_large"]["bits_per_dim"] == r["bits_per_dim"]
    assert math.isfinite(r["by_variance"]["fixed_small"]["bits_per_dim"])
    # After 4 steps the x0 predictions at small t are poor and p's variance there is tiny: a large but finite bound.
    assert r["bits_per_dim"] > 1.0
    assert [(b["t_first"], b["t_last"]) for b in r["buckets"]] == [(5 * i, 5 * i + 4) for i in range(10)]
    assert len(r["mse_per_t"]) == 50 and all(m > 0 for m in r["mse_per_t"])

    events = [e for f in (workdir / "tensorboard").iterdir() for e in _read_events(f)]
    scalars = {v.tag: v.simple_value for e in events if e.step == 4 for v in e.summary.value}
    assert scalars["eval/bits_per_dim"] == pytest.approx(r["bits_per_dim"], rel=1e-6)
    assert "eval/mse_t0045-0049" in scalars


def test_bound_does_not_depend_on_batch_size_or_device_count(evaluated):
    """Main ran on 2 devices in calls of 4 (the last one padded); here 8 devices take the same 10 images at once."""
    workdir, config, _, path, by_main = evaluated
    config = config.copy_and_resolve_references()
    config.eval.num_examples, config.eval.batch_size = 10, 16
    outputs = evaluation.evaluate_from_workdir(config, str(workdir))
    assert outputs["eval results"] == str(path)
    r = json.loads(path.read_text())
    assert r["num_images"] == 10
    np.testing.assert_allclose(r["bpd_per_t"], by_main["bpd_per_t"], rtol=1e-4, atol=1e-7)
    assert r["bits_per_dim"] == pytest.approx(by_main["bits_per_dim"], rel=1e-5)


def test_a_folder_without_a_held_out_split_fails_fast_with_one_line(tmp_path, butterflies_dir):
    result = run_main(tmp_path / "run", f"--config.data.dataset={butterflies_dir}", *TINY_FLAGS, "--mode=eval")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "no subfolder 'test'" in errors[0] and "--config.eval.split=train" in errors[0]
    assert not (tmp_path / "run").exists()  # Nothing was written.


@pytest.mark.parametrize("key,value,match", [
    ("variance", "learned", "accepted: fixed_small, fixed_large"),
    ("num_examples", -1, "0: the whole split"),
    ("batch_size", 0, "eval.batch_size=0 must be positive"),
    ("split", "", "must name a split"),
])
def test_eval_config_is_validated(tiny, key, value, match):
    tiny.eval[key] = value
    with pytest.raises(config_checks.ConfigError, match=match):
        config_checks.validate(tiny, num_devices=8)


def test_summary_buckets_and_parts():
    T, dims = 20, 12
    sums = {"count": np.float64(2), "prior": np.float64(2 * dims * math.log(2) * 0.5),
            "mse": np.linspace(2, 0, T) * 2, "fixed_small": np.full(T, 2 * dims * math.log(2) * 0.1),
            "fixed_large": np.full(T, 2 * dims * math.log(2) * 0.05)}
    s = evaluation.summarize(sums, dims, "fixed_small", num_buckets=4)
    assert s["prior_bpd"] == pytest.approx(0.5) and s["decoder_bpd"] == pytest.approx(0.1)
    assert s["diffusion_bpd"] == pytest.approx(1.9) and s["bits_per_dim"] == pytest.approx(2.5)
    assert s["by_variance"]["fixed_large"]["bits_per_dim"] == pytest.approx(0.5 + 20 * 0.05)
    assert [(b["t_first"], b["t_last"]) for b in s["buckets"]] == [(0, 4), (5, 9), (10, 14), (15, 19)]
    assert s["buckets"][0]["bpd"] == pytest.approx(0.5) and s["buckets"][0]["mse"] == pytest.approx(np.mean(
        np.linspace(2, 0, T)[:5]))
