"""The default XLA flags: merged without overriding the user's, and the UNet computes the same with and without."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from ddpm_jax import xla_flags


def test_merged_appends_missing_flags_and_keeps_the_users():
    defaults = {"xla_cpu_a": "x,y", "xla_cpu_b": "1"}
    assert xla_flags.merged("", defaults) == "--xla_cpu_a=x,y --xla_cpu_b=1"
    assert xla_flags.merged("--xla_force_host_platform_device_count=8", defaults) == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_a=x,y --xla_cpu_b=1")
    assert xla_flags.merged("--xla_cpu_a=z", defaults) == "--xla_cpu_a=z --xla_cpu_b=1"  # The user's value wins.
    once = xla_flags.merged("", defaults)
    assert xla_flags.merged(once, defaults) == once  # Applying twice adds nothing.


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
print(json.dumps({{"xla_flags": __import__("os").environ.get("XLA_FLAGS", ""), "options": options}}))
"""


def _run(tmp_path, name, defaults_on):
    path = str(tmp_path / f"{name}.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", DDPM_JAX_XLA_DEFAULTS="1" if defaults_on else "0")
    script = _FORWARD_AND_GRADIENT.format(repo=str(REPO), tests=str(REPO / "tests"), path=path)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["xla_flags"], report["options"], np.load(path)


@pytest.mark.skipif(not xla_flags.jaxlib_tested(),
                    reason="the default flags are only applied on the jaxlib releases they were measured on")
def test_the_unet_and_its_gradients_match_the_plain_xla_path(tmp_path):
    flags_on, options_on, fast = _run(tmp_path, "fast", True)
    flags_off, options_off, plain = _run(tmp_path, "plain", False)
    assert "ynn_fusion_type" in flags_on and "ynn_fusion_type" not in flags_off
    assert options_on == xla_flags.TRAIN_STEP_CPU_OPTIONS and options_off == {}
    assert set(fast.files) == set(plain.files) and len(fast.files) > 20
    largest = max(np.abs(plain[name]).max() for name in plain.files if name != "out")
    for name in plain.files:
        # Per-leaf scale, floored for leaves whose gradient is zero in exact arithmetic (the attention key's bias
        # cancels in the softmax) and so is rounding noise on both paths.
        scale = max(np.abs(plain[name]).max(), 1e-3 * largest)
        np.testing.assert_allclose(fast[name], plain[name], rtol=0, atol=2e-4 * scale, err_msg=name)
