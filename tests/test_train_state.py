"""The train state's update rule (optimizer step, clipping, EMA with warm-up), the optimizer, and the abstract state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config

from ddpm_jax import parallel, rng, train_state, xla_flags
from ddpm_jax.models import unet
from ddpm_jax.train_state import TrainState


def _state(config, params):
    return TrainState.create(params, train_state.create_optimizer(config))


def test_one_update_moves_the_params_by_the_optimizer_and_the_ema_by_its_warm_up():
    config = tiny_config()
    config.optim.grad_clip_norm = 0.0  # Plain Adam, so the update is known in closed form.
    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5, 0.0]), "b": jnp.array([3.0, -1.0])}
    state = _state(config, params).apply_gradients(grads, ema_decay=0.9999)
    assert int(state.step) == 1
    # Adam's first step is lr * g / (|g| + eps): a step of lr (the warm-up's first value) against the gradient's sign.
    lr = float(train_state.learning_rate_schedule(config)(0))
    for name in params:
        g = np.asarray(grads[name])
        np.testing.assert_allclose(state.params[name], np.asarray(params[name]) - lr * g / (np.abs(g) + 1e-8),
                                   rtol=1e-5, atol=1e-8)
        # EMA warm-up: decay min(0.9999, 1/10) = 0.1 at step 0, so the EMA is 0.1 old + 0.9 new.
        np.testing.assert_allclose(state.ema_params[name],
                                   0.1 * np.asarray(params[name]) + 0.9 * np.asarray(state.params[name]), rtol=1e-6)
    again = state.apply_gradients(grads, ema_decay=0.9999)  # Step 1: decay 2/11.
    np.testing.assert_allclose(again.ema_params["w"],
                               2 / 11 * state.ema_params["w"] + 9 / 11 * again.params["w"], rtol=1e-6)


def test_gradients_are_clipped_to_the_global_norm_before_adam():
    """Adam's first moment after one step is (1 - b1) times the gradient it saw: the clipped one."""
    config = tiny_config()
    config.optim.grad_clip_norm = 0.5
    params = {"w": jnp.zeros(4), "b": jnp.zeros(3)}
    grads = {"w": jnp.full(4, 3.0), "b": jnp.full(3, -4.0)}  # Global norm sqrt(36 + 48) = 9.17.
    norm = float(optax.tree_utils.tree_norm(grads))
    state = _state(config, params).apply_gradients(grads, ema_decay=0.99)
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
    seen = {k: np.asarray(v) / (1 - config.optim.b1) for k, v in adam.mu.items()}
    for name in grads:
        np.testing.assert_allclose(seen[name], np.asarray(grads[name]) * 0.5 / norm, rtol=1e-5)
    assert float(optax.tree_utils.tree_norm(seen)) == pytest.approx(0.5, rel=1e-5)
    config.optim.grad_clip_norm = 0.0  # Off: Adam sees the raw gradient.
    raw = _state(config, params).apply_gradients(grads, ema_decay=0.99)
    np.testing.assert_allclose(raw.opt_state[0].mu["w"] / (1 - config.optim.b1), grads["w"], rtol=1e-6)


def test_ema_decay_warms_up():
    np.testing.assert_allclose(train_state.ema_decay_at(jnp.array(0), 0.9999), 0.1)
    np.testing.assert_allclose(train_state.ema_decay_at(jnp.array(90), 0.9999), 91 / 100)
    np.testing.assert_allclose(train_state.ema_decay_at(jnp.array(10**7), 0.9999), 0.9999)


def test_learning_rate_warmup_and_optimizers():
    config = tiny_config()
    config.optim.learning_rate, config.optim.warmup_steps = 1e-3, 10
    lr = train_state.learning_rate_schedule(config)
    np.testing.assert_allclose([lr(0), lr(4), lr(9), lr(1000)], [1e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    config.optim.warmup_steps = 0
    np.testing.assert_allclose(train_state.learning_rate_schedule(config)(0), 1e-3)
    config.optim.optimizer, config.optim.weight_decay, config.optim.grad_clip_norm = "adamw", 0.5, 0.0
    params = {"w": jnp.ones(2)}
    decayed = _state(config, params).apply_gradients({"w": jnp.zeros(2)}, ema_decay=0.9)
    np.testing.assert_allclose(decayed.params["w"], 1.0 - 1e-3 * 0.5, rtol=1e-6)  # Zero gradient: only the decay.
    config.optim.optimizer = "sgd"
    with pytest.raises(ValueError, match="accepted: adam, adamw"):
        train_state.create_optimizer(config)


def test_abstract_state_is_a_replicated_train_state_of_the_model():
    config = tiny_config("", 8)
    mesh = parallel.make_mesh()
    abstract = train_state.abstract_train_state(config, unet.create_model(config),
                                                train_state.create_optimizer(config), mesh)
    assert isinstance(abstract, TrainState) and mesh.size == 8
    assert (abstract.step.shape, abstract.step.dtype) == ((), np.int32)
    assert jax.tree.structure(abstract.ema_params) == jax.tree.structure(abstract.params)
    assert abstract.params["conv_in"]["kernel"].shape == (3, 3, 3, 8)
    for leaf in jax.tree.leaves(abstract):
        assert isinstance(leaf, jax.ShapeDtypeStruct)
        assert leaf.sharding == parallel.replicated(mesh) and len(leaf.sharding.device_set) == 8
    # The optimizer is static: it is not a leaf, so checkpoints hold step, params, EMA and optimizer moments only.
    params_bytes = sum(x.size * 4 for x in jax.tree.leaves(abstract.params))
    # step, params, EMA, mu, nu, and the two step counts of Adam and of its learning-rate schedule.
    assert train_state.state_bytes(abstract) == 4 + 4 * params_bytes + 4 + 4


def test_the_init_compiled_for_compile_time_gives_bitwise_the_state_of_the_plain_compile(monkeypatch, tmp_path):
    config = tiny_config("", 8)
    # One level and no attention: fewer parameters, so the -O3 compile takes seconds instead of most of a minute.
    config.model.ch_mult, config.model.attn_resolutions = (1,), ()
    model, tx, mesh = unet.create_model(config), train_state.create_optimizer(config), parallel.make_mesh()
    # The options reach the init's compile (a dump appears where they say) along with the -O0 of the defaults.
    monkeypatch.setattr(xla_flags, "state_init_compiler_options",
                        lambda platform: {**xla_flags.STATE_INIT_CPU_OPTIONS, "xla_dump_to": str(tmp_path)})
    state = train_state.init_train_state(config, model, tx, mesh)
    assert list(tmp_path.glob("*_init*.txt"))
    # The suite's in-process XLA_FLAGS compile at -O0 too (conftest.py): the plain compile asks for XLA's default, -O3.
    key = rng.init_key(config.seed)
    plain = jax.jit(train_state._init_fn(config, model, tx), out_shardings=parallel.replicated(mesh)).lower(
        key).compile(compiler_options={"xla_backend_optimization_level": 3})(key)
    assert jax.tree.structure(state) == jax.tree.structure(plain)
    for ours, theirs in zip(jax.tree.leaves(state), jax.tree.leaves(plain), strict=True):
        assert ours.sharding == theirs.sharding
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_init_is_compiled_at_o0_on_cpus_only_and_only_with_the_defaults(monkeypatch):
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "1")
    assert xla_flags.state_init_compiler_options("cpu") == {"xla_backend_optimization_level": 0}
    assert xla_flags.state_init_compiler_options("gpu") == {} and xla_flags.state_init_compiler_options("tpu") == {}
    monkeypatch.setenv("DDPM_JAX_XLA_DEFAULTS", "0")
    assert xla_flags.state_init_compiler_options("cpu") == {}
