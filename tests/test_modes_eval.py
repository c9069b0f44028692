"""--mode=eval: bits/dim of a trained workdir's EMA weights on a held-out split, to eval/ JSON and TensorBoard."""

import json
import math

import pytest
from helpers import read_events

from ddpm_jax.modes import eval as eval_mode


def test_eval_writes_finite_bits_per_dim_on_held_out_images(copy_run, trained_run, fashion_mnist_dir):
    """The butterfly model on Fashion-MNIST's t10k images (IDX, split test): any 8x8 images will do for the bound."""
    _, config, _, _ = trained_run
    config = config.copy_and_resolve_references()
    config.data.dataset, config.eval.split = str(fashion_mnist_dir), "test"
    config.eval.num_examples, config.eval.batch_size = 10, 8
    out = eval_mode.run(config, str(copy_run))
    path = copy_run / "eval" / "bpd_step_0000040_10img.json"
    assert out["eval results"] == str(path)
    assert "(10 images of split 'test', step 40, fixed_large variance)" in out["bits/dim"]
    r = json.loads(path.read_text())
    assert (r["step"], r["num_images"], r["split"], r["num_dims"], r["num_timesteps"]) == (40, 10, "test", 192, 100)
    parts = ("bits_per_dim", "prior_bpd", "decoder_bpd", "diffusion_bpd")
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in parts), r
    assert r["bits_per_dim"] == pytest.approx(r["prior_bpd"] + sum(r["bpd_per_t"]))
    assert r["by_variance"]["fixed_large"]["bits_per_dim"] == r["bits_per_dim"]
    assert math.isfinite(r["by_variance"]["fixed_small"]["bits_per_dim"])
    assert [(b["t_first"], b["t_last"]) for b in r["buckets"]] == [(10 * i, 10 * i + 9) for i in range(10)]

    events = [e for f in (copy_run / "tensorboard").iterdir() for e in read_events(f)]
    scalars = {v.tag: v.simple_value for e in events if e.step == 40 for v in e.summary.value}
    assert scalars["eval/bits_per_dim"] == pytest.approx(r["bits_per_dim"], rel=1e-6)
    assert "eval/mse_t0090-0099" in scalars
