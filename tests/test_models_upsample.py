"""The folded upsampling convolution against nearest 2x upsampling then flax.linen.Conv: the same parameters, outputs
and gradients (also in bfloat16 and under shard_map, where its custom backward pass must all-reduce the kernel's)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sharded_and_unsharded_grads

from ddpm_jax.models.upsample import UpsampleConv, folded_kernel, upsample_conv, upsample_nearest

# Square and not, one pixel wide, more or fewer output channels than input ones.
SHAPES = [((2, 4, 4, 8), 8), ((3, 5, 3, 4), 6), ((1, 1, 1, 3), 2), ((2, 8, 6, 16), 4)]


def _inputs(shape, features, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    params = {"kernel": jnp.asarray(rng.standard_normal((3, 3, shape[-1], features)).astype(np.float32) / 3),
              "bias": jnp.asarray(rng.standard_normal(features).astype(np.float32))}
    b, h, w, _ = shape
    cotangent = jnp.asarray(rng.standard_normal((b, 2 * h, 2 * w, features)).astype(np.float32))
    return x, params, cotangent


def _ours(features, dtype=None):
    return lambda x, params: UpsampleConv(features, dtype=dtype).apply({"params": params}, x)


def _flax(features, dtype=None):
    return lambda x, params: nn.Conv(features, (3, 3), dtype=dtype).apply({"params": params}, upsample_nearest(x))


def test_upsample_nearest_repeats_each_pixel_into_a_2x2_block():
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)
    want = np.kron(np.arange(6.0).reshape(2, 3), np.ones((2, 2)))
    np.testing.assert_array_equal(upsample_nearest(x)[0, ..., 0], want)


@pytest.mark.parametrize("shape,features", SHAPES)
def test_outputs_and_gradients_match_upsampling_then_flax_conv(shape, features):
    x, params, w = _inputs(shape, features)
    ours, theirs = _ours(features), _flax(features)
    want = theirs(x, params)
    assert ours(x, params).shape == want.shape == w.shape
    np.testing.assert_allclose(ours(x, params), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    grad = lambda f: jax.jit(jax.grad(lambda x, p: jnp.sum(f(x, p) * w), argnums=(0, 1)))(x, params)  # noqa: E731
    (dx, dp), (dx_ref, dp_ref) = grad(ours), grad(theirs)
    for name, got, want in [("x", dx, dx_ref), ("kernel", dp["kernel"], dp_ref["kernel"]),
                            ("bias", dp["bias"], dp_ref["bias"])]:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))), err_msg=name)


def test_each_folded_tap_is_the_sum_of_the_taps_it_replaces():
    """Phase (0, 0) reads input rows and columns (i-1, i) with taps (k0, k1 + k2); phase (1, 1) (i, i+1) with
    (k0 + k1, k2): the folded kernel's four corners of phase (r, c) add up to the whole 3x3 kernel."""
    k = jnp.arange(9.0).reshape(3, 3, 1, 1)
    folded = folded_kernel(k).reshape(2, 2, 4)  # (tap row, tap column, phase)
    np.testing.assert_array_equal(folded[..., 0], [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]])
    np.testing.assert_array_equal(folded[..., 3], [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]])
    np.testing.assert_array_equal(folded.sum(axis=(0, 1)), np.full(4, 36.0))


def test_parameters_are_those_of_flax_conv():
    """Same names, shapes and initial values: checkpoints of either UNet restore into the other."""
    x = jnp.zeros((1, 4, 4, 8))
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
    ours = UpsampleConv(8, kernel_init=init).init(jax.random.PRNGKey(0), x)
    theirs = nn.Conv(8, (3, 3), kernel_init=init).init(jax.random.PRNGKey(0), upsample_nearest(x))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_bfloat16_output_and_gradients():
    x, params, w = _inputs((2, 4, 4, 8), 8)
    x16 = x.astype(jnp.bfloat16)
    ours, theirs = _ours(8, jnp.bfloat16)(x16, params), _flax(8, jnp.bfloat16)(x16, params)
    assert ours.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(theirs.astype(jnp.float32))))
    np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), rtol=0, atol=0.02 * scale)
    dx, dp = jax.grad(lambda x, p: jnp.sum(_ours(8, jnp.bfloat16)(x, p).astype(jnp.float32) * w),
                      argnums=(0, 1))(x16, params)
    assert dx.dtype == jnp.bfloat16 and dp["kernel"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32))))


def test_sharded_gradients_are_all_reduced():
    """Inside shard_map, the kernel's and bias's gradients of the mean loss equal the unsharded ones (8 devices)."""
    n = jax.device_count()
    x, params, _ = _inputs((2 * n, 4, 4, 4), 4, seed=1)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((2 * n, 8, 8, 4)).astype(np.float32))

    def loss(params, x, w):
        return jnp.mean(upsample_conv(x, params["kernel"], params["bias"]) * w)

    got, want = sharded_and_unsharded_grads(loss, params, x, w)
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_kernel_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"a \(3, 3, C, O\) kernel"):
        upsample_conv(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 4, 8)), jnp.zeros(8))
