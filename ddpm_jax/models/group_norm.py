"""GroupNorm whose statistics and gradient sums are matrix products, the layout XLA:CPU reduces fastest.

Autodiff of a GroupNorm leaves XLA with column reductions: sums over the batch and spatial axes of an NHWC array,
keeping the minor (channel) axis, each fused with a recomputed swish. XLA:CPU emits those as scalar loops; on the
tiny32 UNet they were a quarter of the train step (README "Performance"). Here every per-channel sum over the H*W
positions is a batched product with a row of ones, (B, 1, HW) @ (B, HW, C), which XLA hands to its dot kernels, and
the backward pass is written in closed form: two such sums (of g and of g * x), arithmetic on (B, C) arrays, and one
elementwise pass for dx. Same function as flax.linen.GroupNorm (biased variance as E[x^2] - E[x]^2, clamped at 0;
statistics in float32), same parameters ("scale", "bias"), so checkpoints are interchangeable.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _sum_over_positions(x: jax.Array) -> jax.Array:
    """Sums (B, P, C) over P -> (B, C); on the CPU as a batched product with ones (a dot kernel, not a column
    reduction). Other backends reduce well and keep jnp.sum (the product form was only measured on CPUs)."""
    if jax.default_backend() != "cpu":
        return jnp.sum(x, axis=1)
    ones = jnp.ones((x.shape[0], 1, x.shape[1]), x.dtype)
    return lax.dot_general(ones, x, (((2,), (1,)), ((0,), (0,))), precision=lax.Precision.HIGHEST)[:, 0, :]


def group_statistics(x: jax.Array, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Per-group mean and reciprocal standard deviation of float32 x (B, P, C), each (B, num_groups)."""
    b, p, c = x.shape
    count = p * (c // num_groups)
    mean = _sum_over_positions(x).reshape(b, num_groups, -1).sum(-1) / count
    mean_of_squares = _sum_over_positions(x * x).reshape(b, num_groups, -1).sum(-1) / count
    return mean, lax.rsqrt(jnp.maximum(mean_of_squares - mean * mean, 0.0) + epsilon)


def _per_channel(a: jax.Array, channels: int) -> jax.Array:
    """(B, G) per-group values repeated to (B, C) per-channel values."""
    return jnp.repeat(a, channels // a.shape[1], axis=1)


def affine(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array,
           rstd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(y, gain): y = (x - mean) * rstd * scale + bias for float32 x (B, P, C), as x * gain + shift per (B, C)."""
    c = x.shape[-1]
    gain = scale.astype(jnp.float32) * _per_channel(rstd, c)
    shift = bias.astype(jnp.float32) - _per_channel(mean, c) * gain
    return x * gain[:, None, :] + shift[:, None, :], gain


def _forward(x, scale, bias, num_groups, epsilon, swish):
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h * w, c)
    mean, rstd = group_statistics(xf, num_groups, epsilon)
    y, _ = affine(xf, scale, bias, mean, rstd)
    if swish:
        y = y * jax.nn.sigmoid(y)
    # Only x and the (B, G) statistics are kept: the backward pass recomputes y (and the sigmoid) from them, which
    # costs less than writing them out here and reading them back.
    return y.reshape(x.shape).astype(x.dtype), (x, mean, rstd, scale, bias)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float = 1e-6,
               swish: bool = False) -> jax.Array:
    """GroupNorm of x (B, H, W, C) over H, W and each group of C // num_groups channels, then * scale + bias (C,),
    then (swish=True) y * sigmoid(y), in one pass.

    Returns x's shape and dtype; statistics, the swish and gradient sums are computed in float32.
    """
    # Under shard_map, parameters are the same on every device and x is not: a custom VJP must see them varying
    # like x, so that autodiff sums their per-device gradients (the transpose of this cast is a psum).
    return _group_norm(x, varying_like(scale, x), varying_like(bias, x), num_groups, epsilon, swish)


def varying_like(a: jax.Array, x: jax.Array) -> jax.Array:
    """`a` marked as varying over every shard_map axis x varies over (a no-op outside shard_map)."""
    missing = tuple(sorted(jax.typeof(x).mat.varying - jax.typeof(a).mat.varying))
    return lax.pcast(a, missing, to="varying") if missing else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, epsilon, swish):
    return _forward(x, scale, bias, num_groups, epsilon, swish)[0]


def group_norm_backward(num_groups: int, epsilon: float, swish: bool, residuals: tuple,
                        g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dx, dscale, dbias) of `group_norm` for the cotangent g, from its residuals (x, mean, rstd, scale, bias)."""
    # With xhat = (x - mean) * rstd and y = scale * xhat + bias, per group of n elements:
    #   dx = rstd * (scale * dy - sum(scale * dy) / n - xhat * sum(scale * dy * xhat) / n),
    # and sum(dy * xhat) over positions is rstd * (sum(dy * x) - mean * sum(dy)): two sums of dy over positions.
    del epsilon
    x, mean, rstd, scale, bias = residuals
    b, h, w, c = x.shape
    count = h * w * (c // num_groups)
    xf = x.astype(jnp.float32).reshape(b, h * w, c)
    dy = g.astype(jnp.float32).reshape(b, h * w, c)
    if swish:
        y, _ = affine(xf, scale, bias, mean, rstd)
        sig = jax.nn.sigmoid(y)
        dy = dy * sig * (1.0 + y * (1.0 - sig))
    sum_dy, sum_dy_x = _sum_over_positions(dy), _sum_over_positions(dy * xf)
    scale_f = scale.astype(jnp.float32)
    rstd_c, mean_c = _per_channel(rstd, c), _per_channel(mean, c)
    sum_dy_xhat = rstd_c * (sum_dy_x - mean_c * sum_dy)  # (B, C)
    group_dy = (scale_f * sum_dy).reshape(b, num_groups, -1).sum(-1)  # sum over the group of scale * dy
    group_dy_xhat = (scale_f * sum_dy_xhat).reshape(b, num_groups, -1).sum(-1)  # ... of scale * dy * xhat
    # dx = gain * dy + x_coef * x + offset, each coefficient per (B, C).
    x_coef = _per_channel(-rstd * rstd * group_dy_xhat / count, c)
    offset = _per_channel((rstd * rstd * mean * group_dy_xhat - rstd * group_dy) / count, c)
    gain = scale_f * rstd_c
    dx = dy * gain[:, None, :] + xf * x_coef[:, None, :] + offset[:, None, :]
    return (dx.reshape(x.shape).astype(x.dtype), sum_dy_xhat.sum(0).astype(scale.dtype),
            sum_dy.sum(0).astype(bias.dtype))


_group_norm.defvjp(_forward, group_norm_backward)


class GroupNorm(nn.Module):
    """Drop-in for flax.linen.GroupNorm on NHWC inputs (same parameters and function), with `group_norm` inside."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    swish: bool = False  # Apply swish to the output in the same pass (GroupNorm -> swish, as in every ResNet block).

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises x (B, H, W, C) (then swish); returns self.dtype (x's dtype when None)."""
        channels = x.shape[-1]
        if x.ndim != 4 or channels % self.num_groups:
            raise ValueError(f"GroupNorm needs (B, H, W, C) input with C divisible by num_groups={self.num_groups}; "
                             f"got shape {x.shape}")
        scale = self.param("scale", nn.initializers.ones_init(), (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.swish).astype(self.dtype or x.dtype)
