"""GroupNorm -> swish -> (dropout) -> 3x3 conv as one op (models/norm_conv.py) against the two flax modules it
replaces: the same parameters, dropout mask, outputs and gradients (also in bfloat16 and under shard_map), and the
point of it: the compiled gradient's temporary buffers are smaller."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sharded_and_unsharded_grads

from benchmarks.conv_layers import conv_equations  # the convolutions of a jaxpr, nested ones included
from ddpm_jax.models import conv_weight_grad as cwg
from ddpm_jax.models.group_norm import GroupNorm
from ddpm_jax.models.norm_conv import norm_swish_conv, norm_swish_conv_layer

_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


class _Layer(nn.Module):
    """One GroupNorm -> swish -> dropout -> conv, fused (norm_swish_conv_layer) or as flax modules."""

    features: int
    groups: int
    fused: bool
    dropout: float = 0.0
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        if self.fused:
            return norm_swish_conv_layer(self, x, features=self.features, num_groups=self.groups, norm_name="norm",
                                         conv_name="conv", kernel_init=_INIT, dtype=self.dtype,
                                         dropout=self.dropout, deterministic=not train)
        h = GroupNorm(self.groups, dtype=self.dtype, swish=True, name="norm")(x)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Conv(self.features, (3, 3), dtype=self.dtype, kernel_init=_INIT, name="conv")(h)


class _Stack(nn.Module):
    """Four such layers of 32 channels, one after the other."""

    fused: bool

    @nn.compact
    def __call__(self, x):
        for _ in range(4):
            x = _Layer(32, 8, self.fused)(x)
        return x


def _setup(shape, features, groups, dropout=0.0, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 2 + 0.5)
    ours, theirs = (_Layer(features, groups, fused, dropout, dtype) for fused in (True, False))
    params = theirs.init(jax.random.PRNGKey(0), x)["params"]
    # Scales and biases moved off their initial values, so that every term of the backward pass carries signal.
    params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    w = jnp.asarray(rng.standard_normal((*shape[:3], features)).astype(np.float32))
    return x, params, w, ours, theirs


def _value_and_grads(layer, params, x, w, train=False):
    def loss(params, x):
        y = layer.apply({"params": params}, x, train, rngs={"dropout": jax.random.PRNGKey(5)})
        return jnp.sum(y.astype(jnp.float32) * w), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads


def _assert_close(got, want, tol, what):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        h = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        g, h = np.asarray(g, np.float32), np.asarray(h, np.float32)
        np.testing.assert_allclose(g, h, rtol=0, atol=tol * float(np.max(np.abs(h))) + 1e-7,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _kernel_gradient_form(layer, params, x, w):
    """Which form of the kernel gradient (models/conv_weight_grad.py) the layer's gradient traces: "swapped" if
    some convolution's input is the padded output gradient."""
    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x) * w)
    swapped_input = (x.shape[0], x.shape[1] + 2, x.shape[2] + 2, w.shape[-1])  # the padded output gradient
    inputs = [tuple(e.invars[0].aval.shape) for e in conv_equations(jax.make_jaxpr(jax.grad(loss))(params, x).jaxpr)]
    return "swapped" if swapped_input in inputs else "autodiff"


# Square and not, one pixel wide, channels changing up and down, one group and many; each with the kernel's gradient
# in both forms of models/conv_weight_grad.py.
@pytest.mark.parametrize("form", ["autodiff", "swapped"])
@pytest.mark.parametrize("shape,features,groups", [((2, 8, 8, 16), 8, 4), ((3, 5, 7, 8), 12, 8),
                                                   ((2, 1, 1, 4), 4, 1), ((1, 6, 4, 32), 32, 32)])
def test_outputs_and_gradients_match_groupnorm_then_flax_conv(shape, features, groups, form, monkeypatch):
    monkeypatch.setenv(cwg.OVERRIDE_ENV, form)
    x, params, w, ours, theirs = _setup(shape, features, groups)
    assert _kernel_gradient_form(ours, params, x, w) == form
    (y, grads), (y_ref, grads_ref) = _value_and_grads(ours, params, x, w), _value_and_grads(theirs, params, x, w)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    _assert_close(y, y_ref, 1e-5, "output")
    _assert_close(grads, grads_ref, 2e-5, "gradient")


def test_dropout_draws_flax_dropout_mask_and_acts_in_training_only():
    x, params, w, ours, theirs = _setup((2, 8, 8, 16), 16, 4, dropout=0.4)
    (y, grads), (y_ref, grads_ref) = (_value_and_grads(m, params, x, w, train=True) for m in (ours, theirs))
    # A different mask would move the output by about its own scale; the same one only by rounding.
    _assert_close(y, y_ref, 1e-5, "output")
    _assert_close(grads, grads_ref, 2e-5, "gradient")
    y_eval, _ = _value_and_grads(ours, params, x, w, train=False)
    assert not np.allclose(y, y_eval, atol=1e-3)
    _assert_close(y_eval, _value_and_grads(theirs, params, x, w, train=False)[0], 1e-5, "eval output")


def test_parameters_are_those_of_groupnorm_and_flax_conv():
    """Same names, shapes and initial values: checkpoints of either form restore into the other."""
    x = jnp.zeros((1, 4, 4, 8))
    ours = _Layer(6, 4, True).init(jax.random.PRNGKey(3), x)
    theirs = _Layer(6, 4, False).init(jax.random.PRNGKey(3), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_bfloat16_output_and_gradients():
    x, params, w, ours, theirs = _setup((2, 8, 8, 16), 8, 4, dtype=jnp.bfloat16)
    x16 = x.astype(jnp.bfloat16)
    (y, (dp, dx)), (y_ref, _) = _value_and_grads(ours, params, x16, w), _value_and_grads(theirs, params, x16, w)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dp["conv"]["kernel"].dtype == jnp.float32
    _assert_close(y, y_ref, 0.02, "bfloat16 output")
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in jax.tree.leaves((dp, dx)))


@pytest.mark.parametrize("form", ["autodiff", "swapped"])
def test_sharded_gradients_are_all_reduced(form, monkeypatch):
    """Inside shard_map, every parameter's gradient of the mean loss equals the unsharded one (8 devices)."""
    monkeypatch.setenv(cwg.OVERRIDE_ENV, form)
    n = jax.device_count()
    x, params, w, _, _ = _setup((2 * n, 4, 4, 8), 8, 4, seed=1)
    flat = {"scale": params["norm"]["scale"], "bias": params["norm"]["bias"],
            "kernel": params["conv"]["kernel"], "conv_bias": params["conv"]["bias"]}

    def loss(p, x, w):
        return jnp.mean(norm_swish_conv(x, p["scale"], p["bias"], p["kernel"], p["conv_bias"], 4) * w)

    got, want = sharded_and_unsharded_grads(loss, flat, x, w)
    for key in flat:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_gradient_keeps_fewer_temporary_buffers():
    """The reason for the op: XLA:CPU computed the activation, its layout copy for the weight gradient and the norm's
    sigmoid in the forward pass and held them for the backward pass. A stack of four layers' compiled gradient."""
    x = jnp.zeros((8, 32, 32, 32))

    def temp_bytes(fused):
        stack = _Stack(fused)
        params = stack.init(jax.random.PRNGKey(0), x)["params"]
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(stack.apply({"params": p}, x) ** 2), argnums=(0, 1)))
        return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes

    fused, plain = temp_bytes(True), temp_bytes(False)
    assert fused < 0.8 * plain, (fused, plain)


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match=r"divisible by num_groups=3 and a \(3, 3, C, O\) kernel"):
        norm_swish_conv(jnp.zeros((1, 4, 4, 8)), jnp.ones(8), jnp.zeros(8), jnp.zeros((3, 3, 8, 4)), jnp.zeros(4), 3)
    with pytest.raises(ValueError, match=r"\(3, 3, C, O\) kernel; got \(1, 4, 4, 8\) and \(3, 3, 4, 4\)"):
        norm_swish_conv(jnp.zeros((1, 4, 4, 8)), jnp.ones(8), jnp.zeros(8), jnp.zeros((3, 3, 4, 4)), jnp.zeros(4), 4)
