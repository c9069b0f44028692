"""training.steps_per_dispatch: k steps in one compiled call (a lax.scan) equal k calls of one step."""

import itertools
import os
import re

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, input_pipeline, metrics, parallel, train
from ddpm_jax.models import unet


def _single_steps(config, mesh, batches):
    """The state after one compiled call per batch (steps_per_dispatch=1) from the initial state, and the scalars."""
    model, tx = unet.create_model(config), train.create_optimizer(config)
    state = train.init_train_state(config, model, tx, mesh)
    step = train.make_train_step(config, model, train.create_schedule(config), tx, mesh)
    scalars = []
    for b in batches:
        state, s = step(state, jax.tree.map(lambda x: parallel.global_batch(mesh, x), b))
        scalars.append(jax.device_get(s))
    return jax.device_get(state), {name: np.array([s[name] for s in scalars]) for name in scalars[0]}


def _assert_states_close(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_one_call_of_three_steps_equals_three_calls_of_one(tiny):
    """Class-conditional, so the (images, labels) batch goes through the scan too; test 2 covers images alone."""
    tiny.model.num_classes = 3
    mesh = parallel.make_mesh()
    source = input_pipeline.create_source(tiny.data.dataset, 8)
    images = [source.get_batch(input_pipeline.batch_indices(s, 16, len(source), 0)) for s in range(3)]
    labels = [np.random.default_rng(s).integers(0, 3, 16).astype(np.int32) for s in range(3)]
    single, singles = _single_steps(tiny, mesh, list(zip(images, labels, strict=True)))

    tiny.training.steps_per_dispatch = 3
    model, tx = unet.create_model(tiny), train.create_optimizer(tiny)
    scanned = train.init_train_state(tiny, model, tx, mesh)
    batch = tuple(parallel.global_stacked_batch(mesh, np.stack(x)) for x in (images, labels))
    assert batch[0].shape == (3, 16, 8, 8, 3) and batch[0].sharding.spec == jax.sharding.PartitionSpec(None, "data")
    step = train.make_train_step(tiny, model, train.create_schedule(tiny), tx, mesh)
    scanned, stacked = step(scanned, batch)

    assert int(scanned.step) == int(single.step) == 3
    for name in ("loss", "grad_norm", "learning_rate"):
        assert stacked[name].shape == (3,)
        np.testing.assert_allclose(stacked[name], singles[name], rtol=1e-5, err_msg=name)
    _assert_states_close(scanned, single)


def test_train_and_evaluate_two_steps_per_dispatch(tiny, tmp_path):
    """A k=2 run logs and saves at the right steps and ends where single steps on the same batches end."""
    t = tiny.training
    t.num_train_steps, t.log_every_steps, t.checkpoint_every_steps, t.steps_per_dispatch = 6, 2, 4, 2
    workdir = str(tmp_path / "run")
    two = train.train_and_evaluate(tiny, workdir)
    assert int(two.step) == 6

    source = input_pipeline.create_source(tiny.data.dataset, 8)
    batches = input_pipeline.train_batches(source, batch_size=16, seed=tiny.seed, start_step=0)
    try:
        first_six = list(itertools.islice(batches, 6))
    finally:
        batches.close()
    t.steps_per_dispatch = 1
    one, singles = _single_steps(tiny, parallel.make_mesh(), first_six)
    _assert_states_close(two, one)

    logged = metrics.read_scalars(workdir)
    steps, loss = logged["loss"]
    assert list(steps) == [2, 4, 6] and list(logged["steps_per_sec"][0]) == [2, 4, 6]
    np.testing.assert_allclose(loss, singles["loss"].reshape(3, 2).mean(axis=1), rtol=1e-5)  # Per-window means.
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        assert ckpt.all_steps() == [4, 6]
    finally:
        ckpt.close()

    # The last checkpoint is at step 6: a run of 4 steps per call cannot resume from it.
    t.steps_per_dispatch = 4
    t.num_train_steps = t.log_every_steps = t.checkpoint_every_steps = 8
    with pytest.raises(ValueError, match=r"checkpoint is at step 6, not a multiple of training.steps_per_dispatch=4"):
        train.train_and_evaluate(tiny, workdir)


def test_cpu_steps_are_unrolled_not_looped(tiny):
    """On XLA:CPU a step inside a while loop gets naive gradient convolutions (15x slower): k steps are unrolled."""
    mesh = parallel.make_mesh()
    model, tx = unet.create_model(tiny), train.create_optimizer(tiny)
    state = train.init_train_state(tiny, model, tx, mesh)
    programs = {}
    for k in (1, 2):
        tiny.training.steps_per_dispatch = k
        images = np.zeros((k, 16, 8, 8, 3) if k > 1 else (16, 8, 8, 3), np.uint8)
        batch = parallel.global_stacked_batch(mesh, images) if k > 1 else parallel.global_batch(mesh, images)
        step = train.make_train_step(tiny, model, train.create_schedule(tiny), tx, mesh)
        programs[k] = step.lower(state, batch).compile().as_text()
    # Unrolled: the k=2 program holds each loop and convolution of one step twice, and no loop around the steps.
    loops, convolutions = ({k: len(re.findall(pattern, p)) for k, p in programs.items()}
                           for pattern in (r" while\(", r" convolution\("))
    assert convolutions[2] == 2 * convolutions[1] > 0
    assert loops[2] == 2 * loops[1]
