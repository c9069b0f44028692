"""The 3x3 SAME convolution's kernel gradient, with the operands' roles chosen for XLA:CPU by shape.

Autodiff's kernel gradient of a 3x3 convolution is itself a convolution: the activation (B, H, W, C) as its input,
with the images as features and the C channels as the batch, and the output gradient (B, H, W, D) as a kernel whose
window is the whole image. XLA:CPU copies the activation into (C, H, W, B) for it, which walks the array with a
stride of C, and runs one Eigen product of (9 C) x (H W B) by (H W B) x D. The same sum can be written the other way
round: the output gradient, padded by 1, as the input (D as the batch) and the activation as the kernel, so
the strided copy is the output gradient's, the activation's copy is (H, W, B, C) (vectors of C moved whole), and the
product is (9 D) x (H W B) by (H W B) x C. It is the same gradient up to float rounding.

Which is faster depends on the shape, and on what XLA fuses into the copies: in models/norm_conv.py the backward
pass recomputes GroupNorm + swish, which XLA fuses into the activation's copy, so with autodiff's form that
recomputation walks the array with a stride of C. Inside that op (GroupNorm -> swish -> conv, forward + backward,
Intel Xeon VM, 2026-12-08, PERFORMANCE_LOG), the swapped form took 0.56-0.96x the time at 32 x 32 pixels and more
(tiny32's and small64's), 0.38-0.57x at the output convolution (3 channels), and 0.88-1.69x at 16 x 16 and 8 x 8,
mostly slower: `swapped_is_faster` is that rule. The whole train step was 1.13x (tiny32) and 1.04x (small64) as fast
with it, faster in every round (and 1.06x on tutorial with an earlier form that padded both operands). Where nothing
is fused into the copy (the upsampling convolution's kernel gradient, on the upsampled input) the swapped form made
small64's step 0.92x as fast, so that one keeps autodiff's. Other backends keep autodiff's form: cuDNN and TPU
convolutions have their own kernel-gradient algorithms.
DDPM_JAX_KERNEL_GRADIENT=autodiff (or swapped) overrides the rule for every convolution traced after it is set, e.g.
to check it on another CPU (`benchmarks/train_options_ab.py --kernel_gradient autodiff`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax

from ddpm_jax.errors import ConfigError

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
OVERRIDE_ENV = "DDPM_JAX_KERNEL_GRADIENT"
FORMS = ("auto", "autodiff", "swapped")
# Up to this many output channels the swapped form is faster at any size (the UNet's output convolution); otherwise
# from this many pixels per image on.
FEW_OUTPUT_CHANNELS = 4
MIN_PIXELS = 32 * 32


def swapped_is_faster(height: int, width: int, out_channels: int, platform: str) -> bool:
    """Whether the kernel gradient of a 3x3 convolution of this shape runs faster with its operands' roles swapped
    (measured on XLA:CPU; False on other platforms)."""
    if platform != "cpu":
        return False
    return out_channels <= FEW_OUTPUT_CHANNELS or height * width >= MIN_PIXELS


def conv3x3_same(a: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 SAME convolution, stride 1, of a (B, H, W, C) by kernel (3, 3, C, D), as flax.linen.Conv computes it (no
    bias): the convolution whose kernel gradient this module computes."""
    return lax.conv_general_dilated(a, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS)


def autodiff_kernel_gradient(a: jax.Array, kernel: jax.Array, g: jax.Array) -> jax.Array:
    """(3, 3, C, D) gradient of sum(conv3x3_same(a, kernel) * g) with respect to the kernel, as autodiff writes it:
    computed in a's dtype, returned in the kernel's (whose values are not read)."""
    return jax.vjp(lambda k: conv3x3_same(a, k.astype(a.dtype)), kernel)[1](g)[0]


def swapped_kernel_gradient(a: jax.Array, g: jax.Array) -> jax.Array:
    """The gradient `autodiff_kernel_gradient` computes, in a's dtype, with g as the convolution's input and a as its
    kernel (see the module docstring)."""
    g_pad = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # out[d, 2 - i, 2 - j, c] = sum over b, u, v of g_pad[b, 2 - i + u, 2 - j + v, d] * a[b, u, v, c]
    #                         = sum over b, h, w of a[b, h + i - 1, w + j - 1, c] * g[b, h, w, d] (a zero outside).
    out = lax.conv_general_dilated(g_pad, a, (1, 1), "VALID", dimension_numbers=("CHWN", "IHWO", "NHWC"))
    return jnp.transpose(out[:, ::-1, ::-1, :], (1, 2, 3, 0))


def form_override() -> str:
    """DDPM_JAX_KERNEL_GRADIENT's value: "auto" (the default: by shape), "autodiff" or "swapped"; ConfigError for
    anything else (config_checks.validate asks before anything is compiled)."""
    value = os.environ.get(OVERRIDE_ENV, "").strip().lower() or "auto"
    if value not in FORMS:
        raise ConfigError(f"{OVERRIDE_ENV}={value!r} is not one of {', '.join(FORMS)}; unset it for the default (auto)")
    return value


def kernel_gradient(a: jax.Array, kernel: jax.Array, g: jax.Array) -> jax.Array:
    """Kernel gradient (3, 3, C, D) of a 3x3 SAME stride-1 convolution of a (B, H, W, C) by kernel with output
    gradient g (B, H, W, D), in the kernel's dtype, in whichever form `swapped_is_faster` picks for the shape and
    default backend (or DDPM_JAX_KERNEL_GRADIENT names). The kernel's values are not read; under shard_map it must
    vary over the axes a does (as the cotangent of a kernel made varying like a)."""
    form = form_override()
    if form == "auto":
        swapped = swapped_is_faster(a.shape[1], a.shape[2], g.shape[-1], jax.default_backend())
    else:
        swapped = form == "swapped"
    dkernel = swapped_kernel_gradient(a, g) if swapped else autodiff_kernel_gradient(a, kernel, g)
    return dkernel.astype(kernel.dtype)
