"""The benchmark harness: presets describe diffusers' UNets exactly, ratios are computed right, bad setups fail fast."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import REPO

sys.path.insert(0, str(REPO))
from benchmarks import jax_bench, presets, run  # noqa: E402
from ddpm_jax.models import unet  # noqa: E402

# Parameter counts of diffusers 0.42.1 UNet2DModel(**presets.diffusers_unet_kwargs(preset)), printed by
# benchmarks/peer_bench.py: the same network has the same number of weights.
DIFFUSERS_PARAMS = {"tiny32": 1_113_955, "small64": 17_217_923, "tutorial": 113_673_219}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_PARAMS))
def test_preset_unet_has_the_peers_parameter_count(name):
    p = presets.get(name)
    model = unet.create_model(jax_bench.benchmark_config(p, "float32", 1))
    x = jnp.zeros((1, p.image_size, p.image_size, 3))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32))
    assert sum(s.size for s in jax.tree.leaves(shapes)) == DIFFUSERS_PARAMS[name]


def test_diffusers_arguments_put_attention_at_the_preset_resolution():
    kw = presets.diffusers_unet_kwargs(presets.get("tutorial"))
    # 128 -> 64 -> 32 -> 16 -> 8 -> 4: the fifth level is at 8x8, as in the diffusers tutorial.
    assert kw["down_block_types"] == ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
    assert kw["up_block_types"] == ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4
    assert kw["block_out_channels"] == (128, 128, 256, 256, 512, 512) and kw["layers_per_block"] == 2
    assert presets.get("tiny32").ch_mult == (1, 2, 2)
    with pytest.raises(ValueError, match="known presets: tutorial, small64, tiny32"):
        presets.get("huge")


def test_summary_ratios_and_fraction_of_ceiling():
    p = presets.get("tiny32")
    ceilings = {"matmul_f32": 50.0, "conv_f32_fwd_bwd": 40.0, "matmul_bf16": 30.0}
    ours = {"framework": "ddpm_jax", "params": 10, "train_img_s": 30.0, "train_step_s": 16 / 30, "compile_s": 20.0,
            "peak_rss_mib": 900.0, "flops_per_image": 1e9, "steps_per_dispatch": 1, "dtype": "float32",
            "loss": 1.0, "sample_s_per_step": 0.1}
    peer = {"framework": "diffusers", "train_img_s": 20.0, "sample_s_per_step": 0.2, "peak_rss_mib": 600.0}
    r = run.summarize(p, ceilings, {"batches_img_s": 3000.0, "decode_img_s": 500.0}, ours, peer, "float32")
    assert r["gflop_s"] == pytest.approx(30.0) and r["ceiling_gflop_s"] == 50.0
    assert r["fraction_of_ceiling"] == pytest.approx(0.6)
    assert r["train_speedup"] == pytest.approx(1.5) and r["sample_speedup"] == pytest.approx(2.0)
    assert r["memory_ratio"] == pytest.approx(1.5) and r["pipeline_over_train"] == pytest.approx(100.0)
    assert r["peer"]["gflop_s"] == pytest.approx(20.0)
    assert run.summarize(p, ceilings, None, ours, None, "bfloat16")["ceiling_gflop_s"] == 30.0


def test_peer_without_torch_fails_before_measuring_anything(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--preset=tiny32", "--peer",
                           f"--peer_python={fake_python}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "pip install torch==2.13.0 diffusers" in proc.stderr and "No module named torch" in proc.stderr
    assert "Traceback" not in proc.stderr
