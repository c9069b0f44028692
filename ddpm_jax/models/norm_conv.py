"""GroupNorm -> swish -> (dropout) -> 3x3 convolution as one op whose backward pass keeps only the norm's input.

Autodiff of the two ops apart keeps what each backward reads: the convolution's input (the normalised, activated
array) and the norm's. XLA:CPU lays the convolution's input out for its weight gradient, (C, H, W, B), and computes
that copy, the sigmoid and the broadcast gain of the norm's backward as soon as their operands exist, in the forward
pass, so they stay live until the backward reaches them: four arrays of the block's size where one is needed
(small64's train step, XLA's buffer assignment at its liveness peak). Here the residuals are the norm's input x, its
(B, G) statistics and the parameters, and the backward pass makes them depend on the incoming cotangent (plus 0 times
one of its elements; XLA:CPU drops `lax.optimization_barrier`s), so everything recomputed from them (the activation,
its layout copy, the sigmoid) is scheduled in the backward pass, where it is used. The forward pass and every
gradient are the same functions as `GroupNorm(swish=True)` followed by `flax.linen.Conv`
(tests/test_models_norm_conv.py); the recomputation is one elementwise pass, which XLA fuses into the layout copy it
makes anyway. On the CPU, at 32 x 32 pixels and more, the kernel's gradient is computed with the convolution's
operands swapped, so that this copy moves whole vectors of channels (models/conv_weight_grad.py).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ddpm_jax.models import conv_weight_grad
from ddpm_jax.models import group_norm as gn

# The name flax gives a block's one nn.Dropout, which its key derives from; the fused op's mask uses it too.
DROPOUT_NAME = "Dropout_0"


def _activation(x, scale, bias, mean, rstd, keep, keep_prob, dtype):
    """swish(GroupNorm(x)) from the statistics, in `dtype`, then dropout (keep: bool mask or None)."""
    b, h, w, c = x.shape
    y, _ = gn.affine(x.astype(jnp.float32).reshape(b, h * w, c), scale, bias, mean, rstd)
    a = (y * jax.nn.sigmoid(y)).reshape(x.shape).astype(dtype)
    if keep is not None:
        a = lax.select(keep, a / jnp.asarray(keep_prob, a.dtype), jnp.zeros_like(a))
    return a


def _forward(x, scale, bias, kernel, conv_bias, keep, num_groups, epsilon, keep_prob, dtype):
    b, h, w, c = x.shape
    mean, rstd = gn.group_statistics(x.astype(jnp.float32).reshape(b, h * w, c), num_groups, epsilon)
    a = _activation(x, scale, bias, mean, rstd, keep, keep_prob, dtype)
    out = conv_weight_grad.conv3x3_same(a, kernel.astype(a.dtype)) + conv_bias.astype(a.dtype)
    return out, (x, mean, rstd, scale, bias, kernel, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _norm_swish_conv(x, scale, bias, kernel, conv_bias, keep, num_groups, epsilon, keep_prob, dtype):
    return _forward(x, scale, bias, kernel, conv_bias, keep, num_groups, epsilon, keep_prob, dtype)[0]


def _fwd(x, scale, bias, kernel, conv_bias, keep, num_groups, epsilon, keep_prob, dtype):
    out, residuals = _forward(x, scale, bias, kernel, conv_bias, keep, num_groups, epsilon, keep_prob, dtype)
    return out, (residuals, conv_bias)


def _bwd(num_groups, epsilon, keep_prob, dtype, saved, g):
    residuals, conv_bias = saved
    x, mean, rstd, scale, bias, kernel, keep = residuals
    # Nothing recomputed below may start before the cotangent exists, or XLA's scheduler computes it in the forward
    # pass and holds it. An optimization_barrier does not survive XLA:CPU's pipeline, a data dependency does: x, mean
    # and rstd plus 0 * one element of g (exact for finite g; a non-finite g makes every gradient non-finite anyway).
    zero = 0.0 * g.reshape(-1)[0].astype(jnp.float32)
    x, mean, rstd = x + zero.astype(x.dtype), mean + zero, rstd + zero
    a = _activation(x, scale, bias, mean, rstd, keep, keep_prob, dtype)
    # The input's pullback: its primal output is unused, so XLA drops that forward convolution.
    da = jax.vjp(lambda a: conv_weight_grad.conv3x3_same(a, kernel.astype(a.dtype)), a)[1](g)[0]
    dkernel = conv_weight_grad.kernel_gradient(a, kernel, g)
    dconv_bias = jnp.sum(g.astype(jnp.float32), axis=(0, 1, 2)).astype(conv_bias.dtype)
    if keep is not None:
        da = lax.select(keep, da / jnp.asarray(keep_prob, da.dtype), jnp.zeros_like(da))
    # The norm's backward reads x and the statistics only (it recomputes y and the sigmoid in float32).
    dx, dscale, dbias = gn.group_norm_backward(num_groups, epsilon, True, (x, mean, rstd, scale, bias), da)
    return dx, dscale, dbias, dkernel, dconv_bias, None


_norm_swish_conv.defvjp(_fwd, _bwd)


def norm_swish_conv(x: jax.Array, scale: jax.Array, bias: jax.Array, kernel: jax.Array, conv_bias: jax.Array,
                    num_groups: int, epsilon: float = 1e-6, keep: jax.Array | None = None,
                    keep_prob: float = 1.0, dtype: Any = None) -> jax.Array:
    """conv3x3(dropout(swish(GroupNorm(x)))) + conv_bias for x (B, H, W, C), kernel (3, 3, C, O).

    The norm's statistics and swish are computed in float32; its output, the dropout and the convolution in `dtype`
    (x's when None), which is also the result's. keep: dropout's boolean mask of x's shape (kept entries are divided
    by keep_prob), or None for no dropout.
    """
    if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]) or x.shape[-1] % num_groups:
        raise ValueError(f"norm_swish_conv needs x (B, H, W, C) with C divisible by num_groups={num_groups} and a "
                         f"(3, 3, C, O) kernel; got {x.shape} and {kernel.shape}")
    # Under shard_map the parameters are the same on every device and x is not: seen as varying like x, their
    # per-device gradients are summed by the transpose of that cast (as in group_norm).
    params = [gn.varying_like(p, x) for p in (scale, bias, kernel, conv_bias)]
    dtype = jnp.dtype(dtype or x.dtype)
    return _norm_swish_conv(x, *params, keep, num_groups, epsilon, keep_prob, dtype)


class _Parameters(nn.Module):
    """Only declares parameters, under this module's name: `declare(module, *args)` returns them."""

    declare: Any

    @nn.compact
    def __call__(self, *args: Any) -> Any:
        """The parameters `declare` creates (or finds) in this module's scope."""
        return self.declare(self, *args)


class _DropoutMask(nn.Module):
    """flax.linen.Dropout's keep mask for an input of `shape`: the same key (this module's name) and draw."""

    rate: float

    @nn.compact
    def __call__(self, shape: tuple[int, ...]) -> jax.Array:
        """Boolean (shape) mask, True where the input is kept."""
        return jax.random.bernoulli(self.make_rng("dropout"), p=1.0 - self.rate, shape=shape)


def norm_swish_conv_layer(module: nn.Module, x: jax.Array, *, features: int, num_groups: int, norm_name: str,
                          conv_name: str, kernel_init: Any, dtype: Any, dropout: float = 0.0,
                          deterministic: bool = True, param_dtype: Any = jnp.float32) -> jax.Array:
    """`GroupNorm(swish=True, name=norm_name)`, `nn.Dropout(dropout)`, `nn.Conv(features, (3, 3), name=conv_name)`
    applied in `module`'s compact method, as one `norm_swish_conv`: the same parameters (names, shapes, init), the
    same dropout mask, the same function."""
    channels = x.shape[-1]
    scale, bias = _Parameters(
        lambda m: (m.param("scale", nn.initializers.ones_init(), (channels,), param_dtype),
                   m.param("bias", nn.initializers.zeros_init(), (channels,), param_dtype)),
        name=norm_name, parent=module)()
    kernel, conv_bias = _Parameters(
        lambda m: (m.param("kernel", kernel_init, (3, 3, channels, features), param_dtype),
                   m.param("bias", nn.initializers.zeros_init(), (features,), param_dtype)),
        name=conv_name, parent=module)()
    keep = None
    if dropout > 0.0 and not deterministic:
        keep = _DropoutMask(dropout, name=DROPOUT_NAME, parent=module)(x.shape)
    return norm_swish_conv(x, scale, bias, kernel, conv_bias, num_groups, keep=keep, keep_prob=1.0 - dropout,
                           dtype=dtype or x.dtype)
