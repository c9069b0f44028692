"""Nearest-neighbour 2x upsampling then a 3x3 convolution, computed on the low-resolution input.

Along each axis, output row 2i of "repeat every row twice, then convolve with taps (k0, k1, k2)" reads input rows
i-1, i, i with those taps, i.e. rows (i-1, i) with taps (k0, k1 + k2), and output row 2i+1 reads rows (i, i+1) with
taps (k0 + k1, k2). So the four output phases are 2x2 convolutions of the input with folded kernels: one 2x2
convolution with 4x the output channels, on the input padded by one, and an interleave. Per input pixel and pair of
channels that is 16 multiply-adds instead of 36 (2.25x fewer; 2x at 16x16 inputs, counting the padded border), the
same function up to float rounding, and the same parameters as `flax.linen.Conv` (checkpoints are interchangeable).

Only the forward pass and the input gradient use the folded form. XLA:CPU computes the weight gradient of the 2x2
convolution (a window the size of the input) with a naive kernel (forward + backward took 16x the 3x3 one's, README
"Performance"), so the kernel's gradient is that of the plain 3x3 convolution of the upsampled input, which is the
same gradient because the folded kernel is a linear function of the 3x3 one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def upsample_nearest(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), every pixel repeated into a 2x2 block."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _fold_axis(kernel: jax.Array, axis: int) -> jax.Array:
    """Three taps along `axis` -> the two taps of each output phase, stacked on a new leading phase axis."""
    k0, k1, k2 = (lax.index_in_dim(kernel, i, axis, keepdims=False) for i in range(3))
    return jnp.stack([jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)])


def folded_kernel(kernel: jax.Array) -> jax.Array:
    """A 3x3 HWIO kernel (3, 3, I, O) -> the 2x2 kernel (2, 2, I, 4 * O) of its four phases, in (row, column) order."""
    rows = _fold_axis(kernel, 0)  # (row phase, 2, 3, I, O)
    both = _fold_axis(rows, 2)  # (column phase, row phase, 2, 2, I, O)
    i, o = kernel.shape[2:]
    return jnp.transpose(both, (2, 3, 4, 1, 0, 5)).reshape(2, 2, i, 4 * o)


def _folded_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv3x3(upsample_nearest(x), kernel) without the bias, from the folded 2x2 kernel on x itself."""
    b, h, w, _ = x.shape
    o = kernel.shape[-1]
    z = lax.conv_general_dilated(x, folded_kernel(kernel).astype(x.dtype), (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=_DIMENSIONS)
    z = z.reshape(b, h + 1, w + 1, 2, 2, o)
    # Output pixel (2i + r, 2j + c) is phase (r, c) of the window whose top-left input pixel is (i + r - 1, j + c - 1).
    rows = [jnp.stack([z[:, r:r + h, c:c + w, r, c] for c in range(2)], axis=3) for r in range(2)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o)


def _plain_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv3x3(upsample_nearest(x), kernel) without the bias, as written."""
    return lax.conv_general_dilated(upsample_nearest(x), kernel.astype(x.dtype), (1, 1), "SAME",
                                    dimension_numbers=_DIMENSIONS)


def upsample_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, folded: bool = True) -> jax.Array:
    """A 3x3 SAME convolution (HWIO kernel, bias (O,)) of x (B, H, W, I) upsampled 2x by nearest neighbour.

    Returns (B, 2H, 2W, O) in x's dtype; the kernel is folded in its own dtype and then cast to x's. folded=False
    computes it as written (the reference; model FLOP counts).
    """
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"upsample_conv needs x (B, H, W, C) and a (3, 3, C, O) kernel; got {x.shape} and "
                         f"{kernel.shape}")
    conv = _upsample_conv if folded else _plain_conv
    return conv(x, kernel) + bias.astype(x.dtype)


@jax.custom_vjp
def _upsample_conv(x, kernel):
    return _folded_conv(x, kernel)


def _upsample_conv_fwd(x, kernel):
    return _folded_conv(x, kernel), (x, kernel)


def _upsample_conv_bwd(residuals, g):
    x, kernel = residuals
    # Each pullback's primal output is unused, so XLA drops those forward convolutions. They are JAX's own, so
    # under shard_map the kernel's pullback sums the per-device gradients itself (x varies, the kernel does not).
    dx = jax.vjp(lambda x: _folded_conv(x, kernel), x)[1](g)[0]
    dkernel = jax.vjp(lambda k: _plain_conv(x, k), kernel)[1](g)[0]
    return dx, dkernel


_upsample_conv.defvjp(_upsample_conv_fwd, _upsample_conv_bwd)


class UpsampleConv(nn.Module):
    """Drop-in for nearest 2x upsampling then `flax.linen.Conv(features, (3, 3))`: same parameters and function."""

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    folded: bool = True  # False: upsample, then the 3x3 convolution as written (the reference; model FLOP counts).

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Upsamples x (B, H, W, C) to (B, 2H, 2W, features); returns self.dtype (x's promoted with the params' when
        None, as flax's Conv)."""
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
        return upsample_conv(x.astype(dtype), kernel, bias, self.folded)
