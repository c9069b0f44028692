"""ddpm_jax's GroupNorm against flax.linen.GroupNorm: the same parameters, outputs and gradients (also under
shard_map, where its custom backward pass must still all-reduce the parameters' gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sharded_and_unsharded_grads

from ddpm_jax.models.group_norm import GroupNorm, group_norm

SHAPES = [((4, 8, 8, 32), 8), ((2, 4, 4, 96), 32), ((3, 16, 16, 16), 4), ((2, 5, 3, 12), 12)]


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1.5  # An offset mean: E[x^2] - E[x]^2 must stay exact.
    c = shape[-1]
    params = {"scale": (1 + 0.3 * rng.standard_normal(c)).astype(np.float32),
              "bias": (0.2 * rng.standard_normal(c)).astype(np.float32)}
    cotangent = rng.standard_normal(shape).astype(np.float32)
    return jnp.asarray(x), jax.tree.map(jnp.asarray, params), jnp.asarray(cotangent)


def _ours(groups, swish):
    return lambda x, params: GroupNorm(groups, swish=swish).apply({"params": params}, x)


def _flax(groups, swish):
    def apply(x, params):
        y = nn.GroupNorm(groups).apply({"params": params}, x)
        return nn.swish(y) if swish else y
    return apply


@pytest.mark.parametrize("swish", [False, True], ids=["norm", "norm+swish"])
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_outputs_and_gradients_match_flax(shape, groups, swish):
    x, params, w = _inputs(shape)
    ours, theirs = _ours(groups, swish), _flax(groups, swish)
    np.testing.assert_allclose(ours(x, params), theirs(x, params), rtol=1e-5, atol=2e-5)
    # A random cotangent, and swish after the plain norm as in the UNet's attention input: every term of the
    # closed-form backward pass is exercised.
    grad = lambda f: jax.jit(jax.grad(lambda x, p: jnp.sum(nn.swish(f(x, p)) * w), argnums=(0, 1)))(x, params)  # noqa: E731
    (dx, dp), (dx_ref, dp_ref) = grad(ours), grad(theirs)
    for name, got, want in [("x", dx, dx_ref), ("scale", dp["scale"], dp_ref["scale"]),
                            ("bias", dp["bias"], dp_ref["bias"])]:
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=name)


def test_parameters_are_those_of_flax():
    """Same names, shapes and initial values: checkpoints of either UNet restore into the other."""
    x = jnp.zeros((1, 4, 4, 16))
    ours = GroupNorm(4).init(jax.random.PRNGKey(0), x)
    theirs = nn.GroupNorm(4).init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(np.asarray, ours).keys() == theirs.keys()
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_bfloat16_computes_statistics_in_float32():
    x, params, _ = _inputs((2, 8, 8, 32))
    x16 = x.astype(jnp.bfloat16)
    ours = GroupNorm(8, dtype=jnp.bfloat16).apply({"params": params}, x16)
    theirs = nn.GroupNorm(8, dtype=jnp.bfloat16).apply({"params": params}, x16)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), atol=0.05)
    dx = jax.grad(lambda x: jnp.sum(GroupNorm(8, dtype=jnp.bfloat16).apply({"params": params}, x)))(x16)
    assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx.astype(np.float32))))


def test_constant_input_normalises_to_the_bias():
    """Zero variance: the clamp and epsilon keep it finite, as flax's does."""
    x = jnp.full((2, 4, 4, 8), 3.0)
    params = {"scale": jnp.full((8,), 2.0), "bias": jnp.arange(8.0)}
    out = GroupNorm(4).apply({"params": params}, x)
    np.testing.assert_allclose(out, jnp.broadcast_to(jnp.arange(8.0), x.shape), atol=1e-5)


def test_sharded_gradients_are_all_reduced():
    """Inside shard_map, the parameters' gradients of the mean loss equal the unsharded ones (8 devices)."""
    n = jax.device_count()
    x, params, w = _inputs((2 * n, 4, 4, 16), seed=1)

    def loss(params, x, w):
        return jnp.mean(group_norm(x, params["scale"], params["bias"], 4, swish=True) * w)

    got, want = sharded_and_unsharded_grads(loss, params, x, w)
    for key in ("scale", "bias"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_channels_not_divisible_by_groups_is_refused():
    with pytest.raises(ValueError, match="C divisible by num_groups=32"):
        GroupNorm(32).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 48)))
