"""The default XLA flags: merged without overriding the user's, and the UNet computes the same with and without."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from benchmarks import presets
from ddpm_jax import config as default_config
from ddpm_jax import xla_flags
from ddpm_jax.config import load_config_file


def test_merged_appends_missing_flags_and_keeps_the_users():
    defaults = {"xla_cpu_a": "x,y", "xla_cpu_b": "1"}
    assert xla_flags.merged("", defaults) == "--xla_cpu_a=x,y --xla_cpu_b=1"
    assert xla_flags.merged("--xla_force_host_platform_device_count=8", defaults) == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_a=x,y --xla_cpu_b=1")
    assert xla_flags.merged("--xla_cpu_a=z", defaults) == "--xla_cpu_a=z --xla_cpu_b=1"  # The user's value wins.
    once = xla_flags.merged("", defaults)
    assert xla_flags.merged(once, defaults) == once  # Applying twice adds nothing.


def test_backend_options_are_merged_key_by_key_with_the_users():
    flag = xla_flags.BACKEND_OPTIONS_FLAG
    defaults = {flag: "xla_cpu_a,xla_cpu_b=2"}
    assert xla_flags.merged("", defaults) == f"--{flag}=xla_cpu_a,xla_cpu_b=2"
    # The user's own list keeps its entries and values and gains the default keys it lacks.
    assert xla_flags.merged(f"--xla_force_host_platform_device_count=8 --{flag}=xla_cpu_b=5,-fp-contract=off",
                            defaults) == (
        f"--xla_force_host_platform_device_count=8 --{flag}=xla_cpu_b=5,-fp-contract=off,xla_cpu_a")
    once = xla_flags.merged(f"--{flag}=xla_cpu_c", defaults)
    assert once == f"--{flag}=xla_cpu_c,xla_cpu_a,xla_cpu_b=2" and xla_flags.merged(once, defaults) == once
    assert xla_flags.merged_options("xla_cpu_a=0", "xla_cpu_a,xla_cpu_d") == "xla_cpu_a=0,xla_cpu_d"


def test_apply_defaults_respects_the_opt_out_and_untested_jaxlib(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "0")
    assert xla_flags.apply_defaults() == "--xla_force_host_platform_device_count=2"
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "1")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 9, 0))
    assert xla_flags.apply_defaults() == "--xla_force_host_platform_device_count=2"
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: xla_flags.TESTED_JAXLIB[0])
    flags = xla_flags.apply_defaults()
    assert all(f"--{name}=" in flags for name in xla_flags.CPU_DEFAULTS)


def test_loop_fusions_use_the_llvm_ir_emitter_for_unets_up_to_small64s_activations(monkeypatch):
    monkeypatch.delenv(xla_flags.LOOP_FUSION_ENV, raising=False)

    def size(name):
        p = presets.get(name)
        return p.image_size, p.channels[0]  # The full-resolution activation, as jax_bench passes it.

    assert xla_flags.legacy_loop_fusion_for(*size("tiny32")) and xla_flags.legacy_loop_fusion_for(*size("small64"))
    assert not xla_flags.legacy_loop_fusion_for(*size("tutorial"))  # Measured 0.84x training, 0.72x sampling.
    assert xla_flags.legacy_loop_fusion_for(16, 64) and not xla_flags.legacy_loop_fusion_for(64, 128)
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "1")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: xla_flags.TESTED_JAXLIB[0])
    option = f"--{xla_flags.BACKEND_OPTIONS_FLAG}={xla_flags.LEGACY_LOOP_FUSION_OPTION}"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert option in xla_flags.apply_defaults().split()
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_flags.BACKEND_OPTIONS_FLAG not in xla_flags.apply_defaults(legacy_loop_fusion=False)
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_flags.BACKEND_OPTIONS_FLAG}=xla_cpu_optimize_for_size")
    assert xla_flags.apply_defaults().split() == [
        f"--{xla_flags.BACKEND_OPTIONS_FLAG}=xla_cpu_optimize_for_size,{xla_flags.LEGACY_LOOP_FUSION_OPTION}",
        f"--{xla_flags.YNN_FUSION_FLAG}=dot"]
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(xla_flags.LOOP_FUSION_ENV, "0")  # The user's override, either way, wins over the size.
    assert xla_flags.BACKEND_OPTIONS_FLAG not in xla_flags.apply_defaults()
    assert not xla_flags.legacy_loop_fusion_for(*size("tiny32"))
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(xla_flags.LOOP_FUSION_ENV, "1")
    assert option in xla_flags.apply_defaults(legacy_loop_fusion=False).split()
    assert xla_flags.legacy_loop_fusion_for(*size("tutorial"))
    monkeypatch.delenv(xla_flags.LOOP_FUSION_ENV)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 9, 0))  # Untested jaxlib: no backend options.
    assert xla_flags.apply_defaults() == ""


def test_loop_fusion_emitter_is_chosen_from_the_configs_unet():
    butterflies = load_config_file(str(REPO / "configs" / "butterflies.py"))  # 128 x 128 x 128: the MLIR emitters.
    assert not xla_flags.legacy_loop_fusion_for_config(butterflies)
    tiny = default_config.get_config()
    tiny.data.image_size, tiny.model.ch, tiny.model.ch_mult = 16, 32, (1, 2)
    assert xla_flags.legacy_loop_fusion_for_config(tiny)
    tiny.model.ch_mult = ()  # Invalid: config_checks rejects it with its own message once the mode starts.
    assert xla_flags.legacy_loop_fusion_for_config(tiny)


def test_train_step_options_follow_the_defaults_and_yield_to_the_user(monkeypatch):
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: xla_flags.TESTED_JAXLIB[0])
    assert xla_flags.train_step_compiler_options("cpu") == xla_flags.TRAIN_STEP_CPU_OPTIONS
    assert xla_flags.train_step_compiler_options("gpu") == {} and xla_flags.train_step_compiler_options("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", xla_flags.apply_defaults())  # The default value, as a child process inherits it.
    assert xla_flags.train_step_compiler_options("cpu") == xla_flags.TRAIN_STEP_CPU_OPTIONS
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")  # The user's choice wins.
    assert xla_flags.train_step_compiler_options("cpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "off")
    assert xla_flags.train_step_compiler_options("cpu") == {}
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "1")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 9, 0))
    assert xla_flags.train_step_compiler_options("cpu") == {}


def test_sampling_modes_get_one_cpu_device_per_core_that_divides_the_batch():
    assert xla_flags.cpu_devices_for("sample", cores=2, batch_size=16) == 2
    assert all(xla_flags.cpu_devices_for(m, 2, 16) == 2 for m in ("fid", "inpaint", "edit"))
    assert xla_flags.cpu_devices_for("train", cores=2, batch_size=16) == 1  # Training keeps one device.
    assert xla_flags.cpu_devices_for("eval", cores=2, batch_size=16) == 1
    assert xla_flags.cpu_devices_for("sample", cores=6, batch_size=16) == 4  # The training batch must split evenly.
    assert xla_flags.cpu_devices_for("sample", cores=2, batch_size=3) == 1
    assert xla_flags.cpu_devices_for("sample", cores=64, batch_size=128) == xla_flags.MAX_CPU_DEVICES
    assert xla_flags.cpu_devices_for("sample", cores=1, batch_size=16) == 1
    assert xla_flags.cpu_devices_for("sample", cores=2, batch_size=16, distributed=True) == 1
    assert xla_flags.host_cores() >= 1


def test_only_training_runs_its_cpu_programs_inline_unless_the_defaults_are_off(monkeypatch):
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "1")
    assert xla_flags.inline_dispatch_for("train")
    assert not any(xla_flags.inline_dispatch_for(m) for m in ("sample", "fid", "inpaint", "edit", "eval", "prepare"))
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "0")
    assert not xla_flags.inline_dispatch_for("train")


def test_apply_defaults_adds_the_device_count_unless_the_user_set_one(monkeypatch):
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "1")
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 9, 0))  # Untested jaxlib: only the device count.
    assert xla_flags.apply_defaults(cpu_devices=2) == "--xla_force_host_platform_device_count=2"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_flags.apply_defaults(cpu_devices=1) == ""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert xla_flags.apply_defaults(cpu_devices=2) == "--xla_force_host_platform_device_count=8"  # The user's wins.
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "0")
    assert xla_flags.apply_defaults(cpu_devices=2) == ""


_FORWARD_AND_GRADIENT = """
import json, sys
sys.path.insert(0, {repo!r})
from ddpm_jax import xla_flags
xla_flags.apply_defaults()
import jax, jax.flatten_util, jax.numpy as jnp, numpy as np
from ddpm_jax.models import unet
model = unet.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, dropout=0.0)
x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
t = jnp.array([0, 10, 50, 99])
# Random parameters everywhere (no zero-initialised output layers), so every gradient is worth comparing; one draw
# for all of them, and everything compiled: eager UNet code or a draw per leaf costs minutes of XLA:CPU compiles.
shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), x, t)
flat, unravel = jax.flatten_util.ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
params = unravel(0.1 * jax.random.normal(jax.random.PRNGKey(2), flat.shape))
# The forward as the sampler compiles it; the gradient with the train step's own compile options.
out = jax.jit(model.apply)(params, x, t)
options = xla_flags.train_step_compiler_options("cpu")
grads = jax.jit(jax.grad(lambda q: jnp.mean((model.apply(q, x, t) - x) ** 2)), compiler_options=options)(params)
np.savez({path!r}, out=np.asarray(out), **{{"/".join(str(k.key) for k in path): np.asarray(g)
         for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}})
# XLA:CPU's MLIR fusion emitters wrap a lone reduce-window (a cumulative sum) in a fusion; its LLVM IR emitter does not.
cumsum = jax.jit(lambda v: jnp.cumsum(v, axis=0)).lower(jnp.ones((64, 64))).compile().as_text()
print(json.dumps({{"xla_flags": __import__("os").environ.get("XLA_FLAGS", ""), "options": options,
                  "mlir_loop_fusion": "wrapped_reduce-window" in cumsum}}))
"""


def _run(tmp_path, name, defaults_on):
    path = str(tmp_path / f"{name}.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", DDPM_JAX_XLA_DEFAULTS="1" if defaults_on else "0")
    script = _FORWARD_AND_GRADIENT.format(repo=str(REPO), tests=str(REPO / "tests"), path=path)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, np.load(path)


@pytest.mark.skipif(not xla_flags.jaxlib_tested(),
                    reason="the default flags are only applied on the jaxlib releases they were measured on")
def test_the_unet_and_its_gradients_match_the_plain_xla_path(tmp_path):
    on, fast = _run(tmp_path, "fast", True)
    off, plain = _run(tmp_path, "plain", False)
    assert "ynn_fusion_type" in on["xla_flags"] and "ynn_fusion_type" not in off["xla_flags"]
    assert on["options"] == xla_flags.TRAIN_STEP_CPU_OPTIONS and off["options"] == {}
    # The backend option reached the compiler: loop fusions came from the LLVM IR emitter only with the defaults.
    assert not on["mlir_loop_fusion"] and off["mlir_loop_fusion"]
    assert set(fast.files) == set(plain.files) and len(fast.files) > 20
    largest = max(np.abs(plain[name]).max() for name in plain.files if name != "out")
    for name in plain.files:
        # Per-leaf scale, floored for leaves whose gradient is zero in exact arithmetic (the attention key's bias
        # cancels in the softmax) and so is rounding noise on both paths.
        scale = max(np.abs(plain[name]).max(), 1e-3 * largest)
        np.testing.assert_allclose(fast[name], plain[name], rtol=0, atol=2e-4 * scale, err_msg=name)
