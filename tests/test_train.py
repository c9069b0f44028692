"""The train step and the loop: 8 devices equal 1, exact resume (in process and after kill -9), the loss falls,
non-finite losses, bfloat16, several steps per call, flips, and the early errors that come before compiling."""

import json
import os
import re
import shutil
import subprocess
import sys

import fault_injection as fi
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REPO, assert_same_tree, conditional_config, tiny_config

sys.path.insert(0, str(REPO))
from benchmarks import train_options_ab  # noqa: E402  (counts a program's YNNPACK reductions)
from ddpm_jax import checkpointing, data, host_memory, metric_writers, parallel, train, train_state, xla_flags
from ddpm_jax.errors import CheckpointMismatchError, ConfigError, DataError, NonFiniteLossError
from ddpm_jax.models import unet


def _setup(config, mesh, state=None):
    """(model, compiled step, state): the state initialised on `mesh`, or a copy of the given one placed there (the
    step donates its state, so the caller's stays intact)."""
    model = unet.create_model(config)
    if state is None:
        state = train_state.init_train_state(config, model, train_state.create_optimizer(config), mesh)
    else:
        state = jax.device_put(jax.device_get(state), parallel.replicated(mesh))
    return model, train.make_train_step(config, model, mesh), state


def _batches(config, source, steps, start=0):
    """The loop's own batches for steps start.. start+steps-1 (a pure function of the seed and the step)."""
    it = data.train_batches(source, batch_size=config.training.batch_size, seed=config.seed, start_step=start,
                            with_labels=config.model.num_classes > 0)
    try:
        return [next(it) for _ in range(steps)]
    finally:
        it.close()


def _run(config, mesh, batches, state=None):
    """The state and scalars after the given batches, with the step compiled as the loop compiles it."""
    _, step_fn, state = _setup(config, mesh, state)
    global_batches = [jax.tree.map(lambda x: parallel.global_batch(mesh, x), b) for b in batches]
    step_fn = train.compile_train_step(step_fn, state, global_batches[0])
    scalars = []
    for b in global_batches:
        state, s = step_fn(state, b)
        scalars.append(jax.device_get(s))
    return jax.device_get(state), {k: np.array([s[k] for s in scalars]) for k in scalars[0]}


def _adam(opt_state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    return adam


@pytest.fixture(scope="module")
def conditional(class_tree):
    """The conditional run's config and data (3 classes): the train-step programs of conditional_run."""
    return conditional_config(str(class_tree)), data.create_source(str(class_tree), 8)


# --------------------------------------------------------------------------------------------------------------------
# The step.


def test_eight_devices_equal_one_device_for_a_conditional_model(conditional, conditional_run):
    """Noise, timesteps, flips and dropped labels depend on the global example, not on the device: 3 steps on 8
    devices and on 1 give the same losses and the same Adam moments (the averaged gradients), leaf by leaf."""
    config, source = conditional
    batches = _batches(config, source, 3)
    mesh8 = parallel.make_mesh()
    state8, scalars8 = _run(config, mesh8, batches)
    init = train_state.init_train_state(config, unet.create_model(config), train_state.create_optimizer(config),
                                        mesh8)
    state1, scalars1 = _run(config, parallel.make_mesh(jax.devices()[:1]), batches, state=init)
    np.testing.assert_allclose(scalars8["loss"], scalars1["loss"], rtol=1e-5)
    np.testing.assert_allclose(scalars8["grad_norm"], scalars1["grad_norm"], rtol=1e-4)
    mu8, mu1 = _adam(state8.opt_state).mu, _adam(state1.opt_state).mu
    for a, b in zip(jax.tree.leaves(mu8), jax.tree.leaves(mu1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7 * max(np.abs(b).max(), 1e-3))
    assert int(state8.step) == int(state1.step) == 3
    # The parameters moved, and the label embedding learnt from the labels.
    assert not np.allclose(state8.params["conv_out"]["kernel"], init.params["conv_out"]["kernel"])
    assert np.abs(mu8["label_embed"]["embedding"]).max() > 0


def test_random_flips_mirror_about_half_of_the_images_by_their_own_key():
    images = jnp.broadcast_to(jnp.arange(4.0)[None, None, :, None], (1000, 2, 4, 1))  # Ramps left to right.
    keys = jax.random.split(jax.random.PRNGKey(0), 1000)
    out = np.asarray(jax.jit(train.random_flips)(images, keys))
    mirrored = (out[:, 0, 0, 0] == 3.0)
    assert 0.45 < mirrored.mean() < 0.55
    np.testing.assert_array_equal(out[mirrored], np.asarray(images)[mirrored][:, :, ::-1])
    np.testing.assert_array_equal(out[~mirrored], np.asarray(images)[~mirrored])
    np.testing.assert_array_equal(jax.jit(train.random_flips)(images[:10], keys[:10]), out[:10])  # Per key.


def test_the_step_flips_only_when_data_random_flip_is_on(tiny):
    def reversals(config):
        model = unet.create_model(config)
        abstract = train_state.abstract_train_state(config, model, train_state.create_optimizer(config),
                                                    parallel.make_mesh())
        text = str(jax.make_jaxpr(train.make_train_step(config, model, parallel.make_mesh()))(
            abstract, train.batch_spec(config, parallel.make_mesh())))
        return len(re.findall(r"\brev\[", text))

    on = reversals(tiny)
    tiny.data.random_flip = False
    assert on == reversals(tiny) + 1  # One more reversal along the width than the gradients' own.


def test_bfloat16_compute_trains_like_float32_with_float32_state(tiny):
    """model.dtype=bfloat16 computes in bf16 but keeps params, EMA and Adam moments in float32; losses track fp32."""
    source = data.create_source(tiny.data.dataset, 8)
    batches = _batches(tiny, source, 20)
    mesh = parallel.make_mesh()
    fp32, fp32_scalars = _run(tiny, mesh, batches)
    init = train_state.init_train_state(tiny, unet.create_model(tiny), train_state.create_optimizer(tiny), mesh)
    tiny.model.dtype = "bfloat16"
    bf16, bf16_scalars = _run(tiny, mesh, batches, state=init)  # Same init: the parameters are float32 either way.
    assert all(x.dtype == np.float32 for x in jax.tree.leaves((bf16.params, bf16.ema_params))), "params stay fp32"
    assert all(x.dtype in (np.float32, np.int32) for x in jax.tree.leaves(bf16.opt_state))
    fp32_losses, bf16_losses = fp32_scalars["loss"], bf16_scalars["loss"]
    np.testing.assert_allclose(bf16_losses[0], fp32_losses[0], rtol=0.02)  # Same data, noise and init.
    late32, late16 = np.mean(fp32_losses[-5:]), np.mean(bf16_losses[-5:])
    assert abs(late16 - late32) < 0.1 * late32, (late32, late16)
    assert not np.array_equal(bf16.params["conv_out"]["kernel"], fp32.params["conv_out"]["kernel"])  # Really bf16.


# --------------------------------------------------------------------------------------------------------------------
# The loop.


def test_the_loop_logs_a_falling_loss_and_writes_its_files(trained_run):
    workdir, config, _, _ = trained_run
    logged = metric_writers.read_scalars(str(workdir))
    steps, loss = logged["loss"]
    assert list(steps) == [10, 20, 30, 40]
    assert loss[-1] < 0.75 * loss[0], loss  # Real images, 40 steps of the tiny UNet.
    for name in ("grad_norm", "learning_rate", "steps_per_sec", "images_per_sec"):
        assert list(logged[name][0]) == [10, 20, 30, 40] and np.isfinite(logged[name][1]).all(), name
    np.testing.assert_allclose(logged["images_per_sec"][1], 16 * logged["steps_per_sec"][1], rtol=1e-6)
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)))
    try:
        assert ckpt.all_steps() == [20, 40]
    finally:
        ckpt.close()
    assert json.loads((workdir / "config.json").read_text())["training"]["num_train_steps"] == 40
    grid = np.load(workdir / "samples" / "step_0000040.npz")["samples"]
    assert grid.shape == (8, 8, 8, 3) and grid.dtype == np.uint8 and grid.std() > 0
    assert (workdir / "samples" / "step_0000040_strip.png").is_file()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))


def test_training_resumes_exactly_from_a_checkpoint(trained_run, tmp_path):
    """The trained run's checkpoint at step 20, resumed to 40, gives bitwise the run that was never interrupted."""
    workdir, config, _, _ = trained_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir / "checkpoints" / "20", resumed / "checkpoints" / "20")
    config = config.copy_and_resolve_references()
    config.training.sample_every_steps = config.training.fid_every_steps = 0  # Neither touches the train state.
    events = []
    with pytest.MonkeyPatch.context() as mp:  # Every log window hands the freed heap back (keep_blocks_of keeps it).
        log_window, trim = train._log_window, host_memory.release_freed_heap
        mp.setattr(train, "_log_window", lambda *a: events.append("log") or log_window(*a))
        mp.setattr(host_memory, "release_freed_heap", lambda: events.append("trim") or trim())
        state = train.train_and_evaluate(config, str(resumed))
    assert events[-4:] == ["log", "trim", "log", "trim"]
    assert int(state.step) == 40
    straight = fi.load_state(workdir, config)
    assert_same_tree(jax.device_get(state), jax.device_get(straight))
    steps, _ = metric_writers.read_scalars(str(resumed))["loss"]
    assert list(steps) == [30, 40]  # Logging picks up where the checkpoint left off.
    # At num_train_steps there is nothing left to train.
    again = train.train_and_evaluate(config, str(resumed))
    assert int(again.step) == 40


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, butterflies_dir, reference_run_arrays):
    """Through main: killed after a checkpoint, rerun, and bitwise the reference run, which was never interrupted."""
    fi.scenario_sigkill_exact_resume(tmp_path, str(butterflies_dir), straight=reference_run_arrays[0])


def _poison(workdir, config, step):
    """Rewrites the checkpoint at `step` with a NaN in one parameter, as a diverged model would have."""
    directory = checkpointing.checkpoint_dir(str(workdir))
    ckpt = checkpointing.Checkpointer(directory)
    model, tx = unet.create_model(config), train_state.create_optimizer(config)
    state, cfg = ckpt.restore(step, train_state.abstract_train_state(config, model, tx, parallel.make_mesh()))
    ckpt.close()
    kernel = state.params["conv_out"]["kernel"]
    params = {**state.params, "conv_out": {**state.params["conv_out"], "kernel": kernel.at[0, 0, 0, 0].set(jnp.nan)}}
    shutil.rmtree(workdir / "checkpoints" / str(step))
    ckpt = checkpointing.Checkpointer(directory)  # A fresh manager: the old one still lists the removed step.
    assert ckpt.save(step, state.replace(params=params), cfg)
    ckpt.close()


def test_a_nonfinite_loss_stops_training_and_keeps_the_last_checkpoint(trained_run, tmp_path):
    workdir, config, _, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(workdir / "checkpoints" / "20", run / "checkpoints" / "20")
    _poison(run, config, 20)
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    config = config.copy_and_resolve_references()
    config.training.fid_every_steps = 0
    with pytest.raises(NonFiniteLossError, match="the loss became nan by step 30; the checkpoint at step 20 is kept"):
        train.train_and_evaluate(config, str(run))
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before  # Nothing saved after.


def test_nonfinite_updates_can_be_skipped_and_counted(conditional_run, tmp_path):
    """The conditional config skips non-finite updates: from a poisoned checkpoint, both updates are skipped."""
    workdir, config = conditional_run
    run = tmp_path / "run"
    shutil.copytree(workdir / "checkpoints" / "4", run / "checkpoints" / "4")
    _poison(run, config, 4)
    config = config.copy_and_resolve_references()
    config.training.num_train_steps = config.training.log_every_steps = config.training.checkpoint_every_steps = 6
    config.training.sample_every_steps = 0
    before = fi.load_state(run, config, 4)
    after = train.train_and_evaluate(config, str(run))
    assert int(after.step) == 6
    # Parameters, EMA and optimizer state are those of step 4.
    assert_same_tree(jax.device_get(before.replace(step=after.step)), jax.device_get(after))
    skipped = metric_writers.read_scalars(str(run))["skipped_updates"]
    assert list(skipped[0]) == [6] and list(skipped[1]) == [2.0]


# --------------------------------------------------------------------------------------------------------------------
# Several steps per call.


def test_the_loop_runs_two_steps_per_call(conditional, conditional_run, tmp_path):
    """A k=2 run (a lax.scan over two stacked batches of images and labels) logs and saves at the right steps, and
    ends where single steps on the same batches end."""
    config, source = conditional
    t = config.training
    t.num_train_steps, t.log_every_steps, t.checkpoint_every_steps, t.steps_per_dispatch = 4, 2, 4, 2
    workdir = str(tmp_path / "run")
    two = train.train_and_evaluate(config, workdir)
    assert int(two.step) == 4
    t.steps_per_dispatch = 1
    one, singles = _run(config, parallel.make_mesh(), _batches(config, source, 4))
    for x, y in zip(jax.tree.leaves(jax.device_get(two)), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    steps, loss = metric_writers.read_scalars(workdir)["loss"]
    assert list(steps) == [2, 4]
    np.testing.assert_allclose(loss, singles["loss"].reshape(2, 2).mean(axis=1), rtol=1e-5)  # Per-window means.

    # The last checkpoint is at step 4: a run of 3 steps per call cannot resume from it.
    t.steps_per_dispatch = 3
    t.num_train_steps = t.log_every_steps = t.checkpoint_every_steps = 6
    with pytest.raises(ConfigError, match=r"checkpoint is at step 4, not a multiple of training.steps_per_dispatch=3"):
        train.train_and_evaluate(config, workdir)


def test_cpu_steps_are_unrolled_not_looped(conditional, conditional_run):
    """On XLA:CPU a step inside a while loop gets naive gradient convolutions (15x slower): k steps are unrolled."""
    config, _ = conditional
    mesh = parallel.make_mesh()
    model = unet.create_model(config)
    abstract = train_state.abstract_train_state(config, model, train_state.create_optimizer(config), mesh)
    programs = {}
    for k in (1, 2):  # Compiled as the loop compiles them: the programs of the conditional runs, from the cache.
        config.training.steps_per_dispatch = k
        programs[k] = train.compile_train_step(train.make_train_step(config, model, mesh), abstract,
                                               train.batch_spec(config, mesh)).as_text()
    # Unrolled: the k=2 program holds each loop and convolution of one step twice, and no loop around the steps.
    loops, convolutions = ({k: len(re.findall(pattern, p)) for k, p in programs.items()}
                           for pattern in (r" while\(", r" convolution\("))
    assert convolutions[2] == 2 * convolutions[1] > 0
    assert loops[2] == 2 * loops[1]


def test_the_cpu_train_step_routes_its_reductions_through_ynnpack(conditional, conditional_run):
    """The train step's own compile option (xla_flags.train_step_compiler_options) reaches the program the loop
    compiles (train.compile_train_step): GroupNorm's reductions become YNNPACK fusions there, which the process-wide
    "dot" flag alone does not make."""
    if not xla_flags.train_step_compiler_options("cpu"):
        pytest.skip("the option is only passed on the jaxlib releases it was measured on, with the defaults on")
    config, _ = conditional
    config.training.steps_per_dispatch = 1
    mesh = parallel.make_mesh()
    model = unet.create_model(config)
    abstract = train_state.abstract_train_state(config, model, train_state.create_optimizer(config), mesh)
    program = train.compile_train_step(train.make_train_step(config, model, mesh), abstract,
                                       train.batch_spec(config, mesh))
    assert train_options_ab.ynn_reductions(program) > 0


# --------------------------------------------------------------------------------------------------------------------
# Errors before anything compiles, and memory.


def test_class_count_and_missing_labels_fail_before_compiling(class_tree, tmp_path):
    config = tiny_config(str(class_tree), 8)
    config.model.num_classes = 5
    with pytest.raises(ConfigError, match="model.num_classes=5 but data.dataset=.* has 3 classes"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    assert not (tmp_path / "a" / "checkpoints").exists()
    loose = tmp_path / "loose"
    loose.mkdir()
    for f in sorted(class_tree.glob("[!.]*/*.jpg"))[:3]:
        os.symlink(f, loose / f.name)
    config.data.dataset = str(loose)
    with pytest.raises(DataError, match="model.num_classes=5 needs class labels, but data.dataset=.* has none"):
        train.train_and_evaluate(config, str(tmp_path / "b"))
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_missing_fid_weights_fail_before_anything_is_written(tiny, tmp_path):
    tiny.training.fid_every_steps = 3
    tiny.eval.inception_weights = str(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="no FID Inception weights") as info:
        train.train_and_evaluate(tiny, str(tmp_path / "run"))
    assert "pt_inception-2015-12-05" in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_workdir_of_another_model_is_refused_and_left_alone(copy_run, trained_run):
    _, config, _, _ = trained_run
    before = sorted((p, p.stat().st_mtime_ns) for p in (copy_run / "checkpoints").rglob("*"))
    config = config.copy_and_resolve_references()
    config.model.ch, config.training.fid_every_steps = 16, 0
    with pytest.raises(CheckpointMismatchError, match="different shape.*new --workdir"):
        train.train_and_evaluate(config, str(copy_run))
    assert sorted((p, p.stat().st_mtime_ns) for p in (copy_run / "checkpoints").rglob("*")) == before


# A --mode=train process on one CPU device: main's XLA defaults (one-device programs inline), then the step compiled
# as the loop compiles it. tiny_config at 16x16 and batch 128 has 77 MiB of temporaries: more than glibc keeps by
# itself (32 MiB) and than a worker thread's heap holds (64 MiB). Without host_memory.keep_blocks_of, or run on JAX's
# dispatch threads, every step faulted all of them in again (about 20,000 faults against under 100).
_STEP_FAULTS = """
import json, resource, sys
sys.path.insert(0, "tests")
from ddpm_jax import xla_flags
xla_flags.apply_defaults(inline_dispatch=xla_flags.inline_dispatch_for("train"))
import jax, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
from helpers import tiny_config
from ddpm_jax import parallel, train, train_state
from ddpm_jax.models import unet
config = tiny_config("", 16)
config.training.batch_size = 128
mesh, model, tx = parallel.make_mesh(), unet.create_model(config), train_state.create_optimizer(config)
abstract = train_state.abstract_train_state(config, model, tx, mesh)
step = train.compile_train_step(train.make_train_step(config, model, mesh), abstract, train.batch_spec(config, mesh))
state = train_state.init_train_state(config, model, tx, mesh)
batch = {"image": parallel.global_batch(mesh, np.zeros((128, 16, 16, 3), np.uint8))}
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, scalars = step(state, batch)
    jax.block_until_ready(scalars["loss"])
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "temp": step.memory_analysis().temp_size_in_bytes, "devices": jax.device_count(),
                  "async": jax.config.values["jax_cpu_enable_async_dispatch"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults and sets glibc's malloc")
def test_a_one_device_cpu_train_step_reuses_its_temporaries_instead_of_faulting_them_in():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}
    out = subprocess.run([sys.executable, "-c", _STEP_FAULTS, os.environ["DDPM_JAX_COMPILATION_CACHE"]], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 1 and r["async"] is False, r
    pages = r["temp"] // 4096
    assert r["temp"] > 64 << 20, r  # Larger than a thread's heap holds, or the test shows nothing.
    assert max(r["faults"][2:]) < pages / 5, f"{r['faults']} page faults per step for {pages} pages of temporaries"
