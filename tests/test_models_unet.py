"""The Flax UNet: shapes, the DDPM CIFAR-10 parameter count, zero-initialised output, attention placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturbed, tiny_config

from ddpm_jax import parallel, train_state
from ddpm_jax.models import unet


def _param_count(model, size):
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(variables)), variables["params"]


def test_ddpm_cifar10_unet_has_35_7m_parameters():
    count, params = _param_count(unet.UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                                           dropout=0.1), 32)
    assert abs(count - 35.7e6) / 35.7e6 < 0.01, count
    # Attention only at 16x16: level 1 on the way down (2 blocks) and on the way up (3 blocks), plus the middle.
    attn = sorted(k for k in params if "attn" in k)
    assert attn == ["down_1_attn_0", "down_1_attn_1", "mid_attn", "up_1_attn_0", "up_1_attn_1", "up_1_attn_2"]


def test_diffusers_tutorial_unet_size():
    count, _ = _param_count(unet.UNet(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(8,)), 128)
    assert abs(count - 113.7e6) / 113.7e6 < 0.01, count


@pytest.fixture(scope="module")
def tiny_params():
    """The `tiny` UNet and its initial parameters, made by the train state's init (a program the train tests share)."""
    config = tiny_config("", 8)
    model = unet.create_model(config)
    state = train_state.init_train_state(config, model, train_state.create_optimizer(config), parallel.make_mesh())
    return model, jax.device_get(state.params)


def test_output_shape_zero_init_and_time_conditioning(tiny_params):
    model, params = tiny_params
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    t = jnp.array([10, 99])
    moved = perturbed(params)
    dropped = model.clone(dropout=0.5)  # Same parameters, dropout on.

    @jax.jit
    def outputs(params, moved):
        fresh = model.apply({"params": params}, x, t)
        times = model.apply({"params": moved}, x[:1].repeat(2, 0), t)
        kwargs = {"train": True, "rngs": {"dropout": jax.random.PRNGKey(2)}}
        train, test = dropped.apply({"params": moved}, x, t, **kwargs), dropped.apply({"params": moved}, x, t)
        return fresh, times, train, test, model.apply({"params": moved}, x, t)

    fresh, times, train, test, plain = outputs(params, moved)
    assert fresh.shape == x.shape and fresh.dtype == jnp.float32
    # Residual branches and the output convolution start at zero, so an untrained model predicts zero.
    np.testing.assert_array_equal(fresh, 0.0)
    # Once the zero-initialised layers have moved, the prediction depends on t, and dropout acts in training only.
    assert not np.allclose(times[0], times[1], atol=1e-4)
    assert not np.allclose(train, test, atol=1e-4)
    np.testing.assert_allclose(test, plain, rtol=1e-5, atol=1e-6)


def _assert_same_loss_and_gradients(model, variant, params, train=False):
    """model and variant (the same parameters) give the same loss and every parameter's gradient within rounding, on
    moved parameters (the zero-initialised layers too, so that every path carries signal); with dropout's same key."""
    moved = perturbed(params)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    t = jnp.array([10, 99])

    def value_and_grad(m):
        def loss(p):
            return jnp.sum(m.apply({"params": p}, x, t, train=train, rngs={"dropout": jax.random.PRNGKey(4)}) ** 2)
        return jax.jit(jax.value_and_grad(loss))(moved)

    (loss, grads), (loss_ref, grads_ref) = value_and_grad(model), value_and_grad(variant)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = dict(jax.tree_util.tree_leaves_with_path(grads_ref))[path]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))) + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_folded_upsampling_is_the_unet_as_written(tiny_params):
    """The UNet with its upsampling convolutions folded (the default) against the same UNet computing them at the
    high resolution: outputs and every parameter's gradient agree within float rounding."""
    model, params = tiny_params
    _assert_same_loss_and_gradients(model, model.clone(fold_upsampling=False), params)


def test_fused_norm_conv_is_the_unet_as_flax_modules(tiny_params):
    """The UNet whose GroupNorm -> swish -> conv pairs are one op (the default) against the same UNet built from the
    two flax modules: with dropout on in training (the same mask), outputs and every parameter's gradient agree."""
    model, params = tiny_params
    fused = model.clone(dropout=0.3)
    _assert_same_loss_and_gradients(fused, fused.clone(fused_norm_conv=False), params, train=True)


def test_label_embedding_and_null_label(conditional_run):
    workdir, config = conditional_run
    model = unet.create_model(config)
    state = train_state.init_train_state(config, model, train_state.create_optimizer(config), parallel.make_mesh())
    params = perturbed(jax.device_get(state.params))
    assert params["label_embed"]["embedding"].shape == (4, 32)  # 3 classes + the null label, width 4 * ch
    x = jnp.tile(jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)), (4, 1, 1, 1))
    t = jnp.tile(jnp.array([10, 40]), 4)

    @jax.jit
    def both(params):  # The same two noisy images under labels 0, 1, 2 and 3 (the null label), and without labels.
        labelled = model.apply({"params": params}, x, t, labels=jnp.repeat(jnp.arange(4), 2))
        return labelled, model.apply({"params": params}, x, t)

    labelled, unlabelled = (np.asarray(o).reshape(4, 2, 8, 8, 3) for o in both(params))
    for a in range(4):
        for b in range(a):
            assert not np.allclose(labelled[a], labelled[b], atol=1e-4), (a, b)
        np.testing.assert_allclose(unlabelled[a], labelled[3], rtol=0, atol=1e-6)  # labels=None is the null label

    plain = unet.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
    plain_params = jax.eval_shape(plain.init, jax.random.PRNGKey(1), x, t)["params"]
    assert "label_embed" not in plain_params
    with pytest.raises(ValueError, match="unconditional UNet"):
        jax.eval_shape(lambda p: plain.apply({"params": p}, x, t, labels=jnp.zeros((2,), jnp.int32)), plain_params)


def test_timestep_embedding():
    emb = unet.timestep_embedding(jnp.array([0, 1, 500]), 16)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(emb[0, :8], 0.0)  # sin(0)
    np.testing.assert_allclose(emb[0, 8:], 1.0)  # cos(0)
    assert unet.timestep_embedding(jnp.array([3]), 7).shape == (1, 7)


def test_bfloat16_compute_keeps_float32_params_and_output():
    model = unet.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4, dtype=jnp.bfloat16)
    x, t = jnp.ones((2, 8, 8, 3)), jnp.array([1, 2])
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]  # Shapes and dtypes only.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert jax.eval_shape(model.apply, {"params": params}, x, t).dtype == jnp.float32
    # Inside, the convolutions run in bfloat16.
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t))(params)
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)
