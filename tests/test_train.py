"""The data-parallel train step: 8 devices equal 1 device, the loss falls on real images, EMA warm-up, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from ddpm_jax import input_pipeline, parallel, train
from ddpm_jax.models import unet


def _run_steps(config, mesh, batches, tx=None):
    model = unet.create_model(config)
    tx = tx or train.create_optimizer(config)
    state = train.init_train_state(config, model, tx, mesh)
    step = train.make_train_step(config, model, train.create_schedule(config), tx, mesh)
    losses = []
    for b in batches:
        state, scalars = step(state, parallel.global_batch(mesh, b))
        losses.append(float(scalars["loss"]))
    return jax.device_get(state), losses


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_eight_devices_equal_one_device_on_the_same_global_batch(tiny, optimizer):
    assert jax.device_count() == 8
    source = input_pipeline.create_source(tiny.data.dataset, 8)
    batches = [source.get_batch(input_pipeline.batch_indices(s, 16, len(source), 0)) for s in range(3)]
    # Plain SGD shows the averaged gradients directly; Adam divides by sqrt(v), which turns float-summation-order
    # differences in near-zero gradients into visible parameter differences, so only its losses are compared.
    tx = optax.sgd(0.05) if optimizer == "sgd" else None
    state8, losses8 = _run_steps(tiny, parallel.make_mesh(), batches, tx)
    state1, losses1 = _run_steps(tiny, parallel.make_mesh(jax.devices()[:1]), batches, tx)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
    assert int(state8.step) == int(state1.step) == 3
    if optimizer == "sgd":
        for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Parameters moved and every device got a different slice (a broadcast batch would not give these values).
    init = jax.device_get(train.init_train_state(tiny, unet.create_model(tiny), train.create_optimizer(tiny),
                                                 parallel.make_mesh()))
    assert not np.allclose(init.params["conv_out"]["kernel"], state8.params["conv_out"]["kernel"])


def test_loss_falls_on_real_images(butterflies_dir):
    config = tiny_config(str(butterflies_dir), 16)
    config.model.ch = 16
    config.model.attn_resolutions = (8,)
    config.optim.learning_rate = 3e-3
    source = input_pipeline.create_source(config.data.dataset, 16)
    batches = [source.get_batch(input_pipeline.batch_indices(s, 16, len(source), 0)) for s in range(120)]
    _, losses = _run_steps(config, parallel.make_mesh(), batches)
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < 0.6 * first, (first, last)


def test_ema_decay_warms_up():
    np.testing.assert_allclose(train.ema_decay_at(jnp.array(0), 0.9999), 0.1)
    np.testing.assert_allclose(train.ema_decay_at(jnp.array(90), 0.9999), 91 / 100)
    np.testing.assert_allclose(train.ema_decay_at(jnp.array(10**7), 0.9999), 0.9999)


def test_learning_rate_warmup_and_clipping(tiny):
    tiny.optim.learning_rate, tiny.optim.warmup_steps = 1e-3, 10
    lr = train.learning_rate_schedule(tiny)
    np.testing.assert_allclose([lr(0), lr(4), lr(9), lr(1000)], [1e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    tiny.optim.grad_clip_norm = 0.5
    tx = train.create_optimizer(tiny)
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
    assert isinstance(tx, optax.GradientTransformation) and np.all(np.asarray(updates["w"]) < 0)
    tiny.optim.optimizer = "sgd"
    with pytest.raises(ValueError, match="accepted: adam, adamw"):
        train.create_optimizer(tiny)


def test_training_resumes_exactly_from_a_checkpoint(tiny, tmp_path):
    """6 steps straight equal 3 steps, a restart from the checkpoint at step 3, and 3 more steps."""
    tiny.training.num_train_steps = 6
    straight = jax.device_get(train.train_and_evaluate(tiny, str(tmp_path / "straight")))
    tiny.training.num_train_steps = 3
    first = train.train_and_evaluate(tiny, str(tmp_path / "resumed"))
    assert int(first.step) == 3
    tiny.training.num_train_steps = 6
    resumed = jax.device_get(train.train_and_evaluate(tiny, str(tmp_path / "resumed")))
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_trains_like_float32_with_float32_state(butterflies_dir):
    """model.dtype=bfloat16 computes in bf16 but keeps params, EMA and Adam moments in float32; losses track fp32."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(str(butterflies_dir), 16)
        config.model.ch, config.model.attn_resolutions, config.model.dtype = 16, (8,), dtype
        config.optim.learning_rate = 3e-3
        source = input_pipeline.create_source(config.data.dataset, 16)
        batches = [source.get_batch(input_pipeline.batch_indices(s, 16, len(source), 0)) for s in range(30)]
        runs[dtype] = _run_steps(config, parallel.make_mesh(jax.devices()[:1]), batches)
    state, bf16_losses = runs["bfloat16"]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves((state.params, state.ema_params))), "params stay fp32"
    assert all(x.dtype in (np.float32, np.int32) for x in jax.tree.leaves(state.opt_state))
    fp32_losses = runs["float32"][1]
    np.testing.assert_allclose(bf16_losses[0], fp32_losses[0], rtol=0.02)  # Same data, noise and init.
    late32, late16 = np.mean(fp32_losses[-10:]), np.mean(bf16_losses[-10:])
    print(f"first loss fp32 {fp32_losses[0]:.4f} bf16 {bf16_losses[0]:.4f}; last-10 mean fp32 {late32:.4f} "
          f"bf16 {late16:.4f}")
    assert abs(late16 - late32) < 0.1 * late32, (late32, late16)
    assert late16 < 0.7 * np.mean(bf16_losses[:5])  # And it does learn.
