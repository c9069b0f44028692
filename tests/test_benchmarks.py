"""The benchmark harness: presets describe diffusers' UNets exactly, ratios are computed right, bad setups fail fast."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import REPO, tiny_config

sys.path.insert(0, str(REPO))
from benchmarks import (  # noqa: E402
    conv_layers,
    flag_sweep,
    gpu_check,
    jax_bench,
    op_profile,
    presets,
    profile_ops,
    quality,
    run,
    train_memory,
    train_options_ab,
)
from ddpm_jax import data, xla_flags  # noqa: E402
from ddpm_jax.models import conv_weight_grad as cwg  # noqa: E402
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


def test_sampling_is_measured_on_the_devices_of_the_sample_mode(monkeypatch):
    monkeypatch.setattr(jax_bench.xla_flags, "host_cores", lambda: 2)
    assert jax_bench.cpu_devices_for_argv(["--preset=tiny32", "--sampling_only"]) == 2
    assert jax_bench.cpu_devices_for_argv(["--preset=tiny32"]) == 1  # Training: one device, as --mode=train.
    assert jax_bench.cpu_devices_for_argv(["--preset=tiny32", "--sampling_only", "--batch_size=3"]) == 1
    train = {"train_img_s": 30.0, "peak_rss_mib": 900.0, "sample_devices": 1}
    sampling = {"sample_s_per_step": 0.05, "sample_devices": 2, "sample_compile_s": 3.0, "peak_rss_mib": 700.0}
    merged = run.merge_sampling(train, sampling)
    assert merged["sample_s_per_step"] == 0.05 and merged["sample_devices"] == 2 and merged["train_img_s"] == 30.0
    assert merged["peak_rss_mib"] == 900.0 and merged["sample_peak_rss_mib"] == 700.0
    assert run.merge_sampling({**train, "peak_rss_mib": 500.0}, sampling)["peak_rss_mib"] == 700.0


def test_benchmarks_compile_loop_fusions_as_main_would_for_the_preset():
    assert jax_bench.legacy_loop_fusion_for_argv(["--preset=tiny32", "--sampling_only"])
    assert jax_bench.legacy_loop_fusion_for_argv(["--preset", "small64"])
    assert not jax_bench.legacy_loop_fusion_for_argv(["--preset=tutorial", "--skip_sampling"])
    assert jax_bench.legacy_loop_fusion_for_argv(["-q", "tests"])  # No preset (pytest's argv): the tiny UNets' way.
    assert presets.from_argv(["--rounds", "2", "--preset=small64"]) is presets.get("small64")


def test_sampling_only_run_times_the_sampler_on_one_device_per_core():
    # No device count in XLA_FLAGS: the benchmark picks it as --mode=sample does.
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0",
               DDPM_JAX_BENCH_CACHE=os.environ["DDPM_JAX_COMPILATION_CACHE"])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "jax_bench.py"), "--preset=tiny32",
                           "--sampling_only", "--batch_size=2", "--sample_steps=2"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["sample_devices"] == xla_flags.cpu_devices_for("sample", xla_flags.host_cores(), 2)
    assert r["sample_s_per_step"] > 0 and r["sample_compile_s"] > 0 and r["peak_rss_mib"] > 0
    assert r["params"] == DIFFUSERS_PARAMS["tiny32"] and "train_img_s" not in r


def test_rounds_are_merged_into_medians_with_the_largest_peak_and_per_round_ratios():
    ours = [{"framework": "ddpm_jax", "train_img_s": x, "sample_s_per_step": s, "peak_rss_mib": m, "sample_devices": 2,
             "train_peak_rss_mib": m, "dtype": "float32"}
            for x, s, m in [(70.0, 0.05, 1100.0), (60.0, 0.07, 1130.0), (80.0, 0.06, 1120.0)]]
    peer = [{"framework": "diffusers", "train_img_s": x, "sample_s_per_step": s, "peak_rss_mib": 550.0, "threads": 2}
            for x, s in [(70.0, 0.10), (50.0, 0.07), (64.0, 0.09)]]
    merged = run.median_of_rounds(ours)
    assert merged["train_img_s"] == 70.0 and merged["sample_s_per_step"] == 0.06
    assert merged["peak_rss_mib"] == 1130.0 and merged["train_peak_rss_mib"] == 1130.0  # The largest, not the median.
    assert merged["sample_devices"] == 2 and merged["framework"] == "ddpm_jax" and merged["dtype"] == "float32"
    assert run.median_of_rounds(peer)["train_img_s"] == 64.0
    two = run.median_of_rounds(ours[:2])
    assert two["train_img_s"] == 65.0 and two["sample_devices"] == 2 and isinstance(two["sample_devices"], int)
    ratios = run.round_ratios(ours, peer)
    assert ratios["train"] == pytest.approx([1.0, 1.2, 1.25])
    assert ratios["sample"] == pytest.approx([2.0, 1.0, 1.5])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--preset=tiny32", "--rounds=0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--rounds must be >= 1, got 0" in proc.stderr


def test_peer_without_torch_fails_before_measuring_anything(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--preset=tiny32", "--peer",
                           f"--peer_python={fake_python}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "pip install torch==2.13.0 diffusers" in proc.stderr and "No module named torch" in proc.stderr
    assert "Traceback" not in proc.stderr


def _conv_sgd_step(w, x):
    def loss(w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.silu(y) ** 2)

    value, grad = jax.value_and_grad(loss)(w)
    return w - 0.1 * grad, value


def test_profile_of_a_conv_step_is_split_into_passes_and_categories():
    w, x = jnp.full((3, 3, 4, 8), 0.1), jnp.ones((2, 16, 16, 4))
    compiled = jax.jit(_conv_sgd_step).lower(w, x).compile()
    text = compiled.as_text()
    instructions, computations = op_profile.parse_hlo(text)
    times, count = profile_ops.trace_op_times(lambda: jax.block_until_ready(compiled(w, x)), 2,
                                              profile_ops._module_name(text))
    assert count >= 2 * len(times)  # Every executed instruction, in each of the 2 calls.
    rows = op_profile.xla_rows(instructions, computations, times, per=2)
    by = {(r["pass"], r["category"]) for r in rows}
    # The forward conv (3x3 window) and the weight gradient (a conv whose window is the 16x16 activation) are told
    # apart; the SGD update sits outside jvp, so it is the update pass.
    assert ("forward", "convolution") in by and ("backward", "conv weight grad") in by
    assert any(r["pass"] == "update" and r["shape"] == "f32[3,3,4,8]" for r in rows)
    assert all(r["ms"] > 0 for r in rows)
    sampled = op_profile.xla_rows(instructions, computations, times, per=2, sample=True)
    assert {r["pass"] for r in sampled} == {"sample"}


def test_torch_ops_get_the_same_categories():
    assert op_profile.torch_category("aten::mkldnn_convolution") == "convolution"
    assert op_profile.torch_category("aten::convolution_backward") == "convolution"
    assert op_profile.torch_category("aten::addmm") == "matmul"
    assert op_profile.torch_category("aten::native_group_norm_backward") == "reduction"
    assert op_profile.torch_category("aten::cat") == "data movement"
    assert op_profile.torch_category("aten::t") == "data movement"
    assert op_profile.torch_category("aten::silu_backward") == "elementwise"  # Not "t" inside "silu_backward".
    assert op_profile.torch_category("Optimizer.step#AdamW.step") == "other"


def test_comparison_table_adds_our_weight_grads_to_backward_convolutions():
    ours = [{"name": "a", "category": "convolution", "pass": "backward", "label": "", "shape": "", "ms": 2.0},
            {"name": "b", "category": "conv weight grad", "pass": "backward", "label": "", "shape": "", "ms": 4.0},
            {"name": "c", "category": "elementwise", "pass": "update", "label": "", "shape": "", "ms": 1.0}]
    peer = [{"name": "x", "category": "convolution", "pass": "backward", "label": "", "shape": "", "ms": 3.0},
            {"name": "y", "category": "elementwise", "pass": "update", "label": "", "shape": "", "ms": 2.0}]
    table = op_profile.format_comparison(ours, peer)
    assert "| backward | convolution | 6.0 | 3.0 | 2.00 |" in table
    assert "| update | elementwise | 1.0 | 2.0 | 0.50 |" in table
    assert "conv weight grad" not in table
    walled = op_profile.format_comparison(ours, peer, (10.0, 8.0)).splitlines()
    assert walled[-2:] == ["| all | wall | 10.0 | 8.0 | 1.25 |",
                           "| all | not in any op (wall - op time) | 3.0 | 3.0 | 1.00 |"]
    top = op_profile.format_top("t", ours, 2)
    assert top.splitlines()[4].startswith("| 4.00 | 57.1% | backward | conv weight grad | b |")


def test_gpu_check_dry_run_prints_every_part_and_the_quickstart_grid(tmp_path, fashion_mnist_dir):
    # One device: the dry run's batch of 2 does not split over the suite's 8 fake ones.
    env = dict(os.environ, DDPM_JAX_PYTHON=sys.executable, XLA_FLAGS="--xla_backend_optimization_level=0",
               DDPM_JAX_BENCH_CACHE=os.environ["DDPM_JAX_COMPILATION_CACHE"])
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry_run", f"--out={tmp_path}",
                           f"--quickstart_data={fashion_mnist_dir}"], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["label"] for p in report["parts"]] == [p[0] for p in gpu_check.PARTS]
    assert all(p["train_img_s"] > 0 and p["compile_s"] > 0 for p in report["parts"])
    assert report["parts"][0]["dtype"] == "bfloat16" and report["parts"][0]["sample_s_per_step"] > 0
    assert "sample_s_per_step" not in report["parts"][1]
    assert report["parts"][0]["mfu"] is None  # No peak is known for a CPU.
    assert pathlib.Path(report["quickstart"]["grid"]).is_file()
    assert "| tutorial b64 bf16 | 2 |" in proc.stdout and "sample grid: " in proc.stdout


def test_gpu_check_without_a_gpu_stops_in_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, XLA_FLAGS=""))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: the GPU check needs a GPU and jax sees 'cpu" in proc.stderr


def test_peak_flops_by_device_kind():
    assert jax_bench.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756.0e12
    assert jax_bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert jax_bench.peak_flops("NVIDIA H200", "float32") == 494.7e12
    assert jax_bench.peak_flops("cpu", "float32") is None


def test_train_options_ab_times_both_programs_and_shows_the_options_reached_the_compiler():
    # The GPU check's dry run's flags: its smoke train step is the product program here, read from the cache.
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0",
               DDPM_JAX_BENCH_CACHE=os.environ["DDPM_JAX_COMPILATION_CACHE"])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_options_ab.py"), "--preset=smoke",
                           "--rounds=1", "--steps=1"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(r["img_s"]["product"]) == len(r["img_s"]["variant"]) == 1 and r["speed_ratio"] > 0
    assert r["variant_options"] == {xla_flags.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT"}
    assert r["ynn_reductions"]["variant"] == 0
    if r["product_options"]:  # The tested jaxlib releases: the train step's own option makes YNNPACK reductions.
        assert r["ynn_reductions"]["product"] > 0
    assert train_options_ab.parse_options(["a=b", "c=d,e"]) == {"a": "b", "c": "d,e"}
    with pytest.raises(SystemExit, match="is not KEY=VALUE"):
        train_options_ab.parse_options(["novalue"])
    assert train_options_ab.parse_model_fields(["fused_norm_conv=false", "num_groups=8"]) == {
        "fused_norm_conv": False, "num_groups": 8}
    with pytest.raises(SystemExit, match="is not FIELD=VALUE"):
        train_options_ab.parse_model_fields(["fused_norm_conv"])


def test_train_options_ab_traces_its_variant_with_the_kernel_gradient_form_asked_for(monkeypatch):
    monkeypatch.setenv(cwg.OVERRIDE_ENV, "auto")
    for form in ("autodiff", "swapped"):
        with train_options_ab.kernel_gradient_form(form):
            assert cwg.form_override() == form
        assert cwg.form_override() == "auto"
    monkeypatch.delenv(cwg.OVERRIDE_ENV)
    with train_options_ab.kernel_gradient_form(""):  # the product's own: the environment as it is
        assert cwg.OVERRIDE_ENV not in os.environ
    with pytest.raises(RuntimeError), train_options_ab.kernel_gradient_form("swapped"):
        raise RuntimeError
    assert cwg.OVERRIDE_ENV not in os.environ


def test_conv_layers_reads_every_convolution_of_the_unet_and_times_its_three_kernels():
    p = presets.get("smoke")
    convs = conv_layers.unet_convolutions(p, "float32")
    model = unet.create_model(jax_bench.benchmark_config(p, "float32", 1))
    x = jnp.zeros((1, p.image_size, p.image_size, 3))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32))
    # Unfolded, each convolution layer (a 4-d HWIO kernel) runs once per forward pass.
    assert sum(c["count"] for c in convs) == sum(leaf.ndim == 4 for leaf in jax.tree.leaves(params))
    assert all(c["nhwc"] and c["rhs"][:2] == [3, 3] for c in convs)
    down = [c for c in convs if c["strides"] == [2, 2]]
    assert len(down) == 1 and down[0]["lhs"] == [2, 16, 16, 32]
    plain = next(c for c in convs if c["lhs"] == [2, 16, 16, 32] and c["strides"] == [1, 1] and c["rhs"][3] == 32)
    assert plain["padding"] == [[1, 1], [1, 1]]
    assert conv_layers.flops(plain) == 2.0 * 2 * 16 * 16 * 9 * 32 * 32
    assert conv_layers.flops(down[0]) == conv_layers.flops(plain) / 4  # An 8x8 output.
    times = conv_layers.time_ours(plain, repeats=1)
    assert set(times) == set(conv_layers.KERNELS) and all(ms > 0 for ms in times.values())
    # The totals count each convolution as often as it occurs, over the convolutions both frameworks have times for.
    two = [dict(plain, count=3), dict(down[0], count=1)]
    ours = [{"forward": 1.0, "input grad": 2.0, "weight grad": 4.0}] * 2
    peer = [{"forward": 2.0, "input grad": 2.0, "weight grad": 2.0}, None]
    table = conv_layers.report(two, ours, peer)
    assert "weight grad: ddpm_jax 12.0, peer 6.0 (peer/ours 0.50x)" in table
    assert "all: ddpm_jax 21.0, peer 18.0 (peer/ours 0.86x)" in table
    assert "| 2x16x16x32 -> 32, 3x3 stride 2 | 1 | forward | 1.00 |" in table and "- | - | - |" in table
    assert "weight grad: ddpm_jax 12.0" in conv_layers.report(two[:1], ours[:1], None)


def test_train_memory_reports_the_buffers_live_at_the_train_steps_peak(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_memory.py"), "--preset=smoke", "--top=5",
                           f"--json={out}"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLA_FLAGS=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["temp_mib"] > 0 and r["state_mib"] > 0 and len(r["top"]) == 5
    # The peak holds the state (the step's parameters), the forward's activations kept for the backward pass, and
    # the groups add up to what is live there.
    passes = {g["pass"] for g in r["groups"]}
    assert {"state", "forward (kept)"} <= passes, passes
    assert abs(sum(g["mib"] for g in r["groups"]) - r["live_mib"]) < 1e-6
    assert [t["mib"] for t in r["top"]] == sorted((t["mib"] for t in r["top"]), reverse=True)
    assert "smoke train step" in proc.stdout and "| MiB | pass | made by |" in proc.stdout
    with pytest.raises(SystemExit, match="no 'Live ranges at N"):
        train_memory.liveness_peak("HloLiveRange (max 3):\n")


def test_flag_sweep_ratios_are_medians_against_the_defaults():
    def r(img_s, sample_s):
        return {"train_img_s": img_s, "sample_s_per_step": sample_s, "compile_s": 10.0, "peak_rss_mib": 900.0}

    rows = flag_sweep.summarize({flag_sweep.DEFAULTS: [r(10, 0.2), r(12, 0.2), r(11, 0.3)],
                                 "--x=1": [r(22, 0.1), r(20, 0.1), r(0.5, 0.1)]})
    assert rows[0]["train_ratio"] == 1.0 and rows[1]["train_img_s"] == 20
    assert rows[1]["train_ratio"] == pytest.approx(20 / 11) and rows[1]["sample_ratio"] == pytest.approx(2.0)
    assert "| `--x=1` | 20.0 | 1.82x | 0.1000 | 2.00x | 10.0 | 900 |" in flag_sweep.format_table(rows)


def test_quality_scorer_trains_caches_and_separates_real_images_from_noise(tmp_path, monkeypatch, fashion_mnist_dir):
    # A tenth of each split and three epochs instead of six keep it short; the cache, the floor and the ceiling are the
    # benchmark's own code.
    train_once, load = quality.train_classifier, quality.data.create_source
    loaded = []

    def tenth(dataset, image_size, **kwargs):
        full = load(dataset, image_size, **kwargs)
        loaded.append(len(full.images))
        return data.ArraySource(full.images[::10], full.labels[::10], full.class_names)

    monkeypatch.setattr(quality, "CACHE", tmp_path)
    monkeypatch.setattr(quality.data, "create_source", tenth)
    monkeypatch.setattr(quality, "train_classifier", lambda train, test: train_once(train, test, epochs=3))
    config = tiny_config(dataset=str(fashion_mnist_dir), image_size=16)
    scorer = quality.Scorer(config, num_images=500)
    assert loaded == [60000, 10000], "the scorer no longer reads its splits through data.create_source"
    assert scorer.test_accuracy > 0.6 and len(list(tmp_path.glob("classifier_*.npz"))) == 1
    assert scorer.floor["fd"] < 0.1 * scorer.ceiling["fd"] and scorer.floor["classes"] == 10
    assert scorer.floor["top_prob"] > scorer.ceiling["top_prob"]

    def no_training(*_):
        raise AssertionError("the cached classifier was not used")

    monkeypatch.setattr(quality, "train_classifier", no_training)
    again = quality.Scorer(config, num_images=500)
    assert again.floor == scorer.floor and again.test_accuracy == scorer.test_accuracy


def test_quality_tables_list_every_sampler_and_run():
    rows = [{"method": "ddpm", "spacing": "linspace", "solver_order": 2, "num_steps": 1000, "fd": 30.0, "seconds": 600}]
    rows += [{"method": m, "spacing": sp, "solver_order": o, "num_steps": n, "fd": 100.0 / n, "seconds": n}
             for m, sp, o in quality.SAMPLERS for n in quality.STEP_COUNTS]
    table = quality.markdown_table({"report_kind": "steps", "report": {"rows": rows}})
    assert "| dpm_solver++ 3M (trailing) | 20.0 (5 s) | 10.0 (10 s) | 5.0 (20 s) | 2.0 (50 s) | 1.0 (100 s) |" in table
    assert "| ddpm, all 1000 steps: 30.0 (600 s) |" in table and len(table.splitlines()) == 3 + len(quality.SAMPLERS)
    budget = {"report_kind": "budget", "report": {"runs": {
        "none": {"rows": [{"train_step": 500, "fd": 9.0}, {"train_step": 1000, "fd": 5.0}]},
        "min_snr": {"rows": [{"train_step": 1000, "fd": 4.0}]}}}}
    assert quality.markdown_table(budget).splitlines()[2:] == ["| 500 | 9.0 |  |", "| 1000 | 5.0 | 4.0 |"]
