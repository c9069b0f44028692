"""The 3x3 convolution's kernel gradient with its operands' roles swapped (models/conv_weight_grad.py): the same
gradient as autodiff's at every shape, the form each shape gets, and DDPM_JAX_KERNEL_GRADIENT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.conv_layers import conv_equations  # the convolutions of a jaxpr, nested ones included
from ddpm_jax.errors import ConfigError
from ddpm_jax.models import conv_weight_grad as cwg


def _operands(batch, height, width, cin, cout, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((batch, height, width, cin)), dtype)
    g = jnp.asarray(rng.standard_normal((batch, height, width, cout)), dtype)
    return a, jnp.zeros((3, 3, cin, cout), jnp.float32), g


def _conv_lhs_shapes(fn, *args):
    """The input shapes of the convolutions in fn's jaxpr (autodiff's: the primal one and its transpose), traced
    afresh (make_jaxpr caches traces by function, and the form is chosen while tracing)."""
    return {tuple(e.invars[0].aval.shape) for e in conv_equations(jax.make_jaxpr(lambda *xs: fn(*xs))(*args).jaxpr)}


# Square and not, one pixel, fewer and more output channels, the UNet's 3-channel output convolution.
@pytest.mark.parametrize("shape", [(2, 8, 8, 16, 8), (3, 5, 7, 4, 12), (2, 1, 1, 4, 4), (1, 6, 4, 32, 3),
                                   (2, 16, 16, 32, 16)])
def test_swapped_form_is_autodiffs_gradient(shape):
    a, kernel, g = _operands(*shape)
    want = jax.jit(cwg.autodiff_kernel_gradient)(a, kernel, g)
    got = jax.jit(cwg.swapped_kernel_gradient)(a, g)
    assert got.shape == want.shape == kernel.shape and got.dtype == jnp.float32
    # A tap or channel out of place would be off by the gradient's own scale; float rounding by about 1e-6 of it.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want))))


def test_swapped_form_in_bfloat16(monkeypatch):
    monkeypatch.setenv(cwg.OVERRIDE_ENV, "swapped")
    a, kernel, g = _operands(2, 8, 8, 16, 8, dtype=jnp.bfloat16)
    assert _conv_lhs_shapes(cwg.kernel_gradient, a, kernel, g) == {(2, 10, 10, 8)}  # the swapped form ran
    got = jax.jit(lambda *xs: cwg.kernel_gradient(*xs))(a, kernel, g)  # traced afresh, under the override
    want = jax.jit(cwg.autodiff_kernel_gradient)(a, kernel, g)
    assert got.dtype == want.dtype == jnp.float32  # computed in bfloat16, returned in the kernel's dtype
    exact = cwg.autodiff_kernel_gradient(a.astype(jnp.float32), kernel, g.astype(jnp.float32))
    scale = float(jnp.max(jnp.abs(exact)))
    assert float(jnp.max(jnp.abs(got - exact))) < 0.02 * scale
    assert float(jnp.max(jnp.abs(want - exact))) < 0.02 * scale


def test_rule_by_shape_on_the_cpu_and_autodiff_elsewhere():
    assert cwg.swapped_is_faster(32, 32, 32, "cpu")  # tiny32's convolutions at full resolution
    assert cwg.swapped_is_faster(64, 16, 256, "cpu")  # as many pixels, any channels
    assert cwg.swapped_is_faster(8, 8, 3, "cpu")  # the output convolution at any size
    assert not cwg.swapped_is_faster(16, 16, 64, "cpu")  # fewer pixels
    assert not cwg.swapped_is_faster(31, 32, 32, "cpu")
    for platform in ("gpu", "tpu"):
        assert not cwg.swapped_is_faster(32, 32, 3, platform)


def test_kernel_gradient_takes_the_rules_form_unless_overridden(monkeypatch):
    monkeypatch.delenv(cwg.OVERRIDE_ENV, raising=False)
    large, small = _operands(1, 32, 32, 8, 8), _operands(2, 16, 16, 8, 8)

    def conv_input(form, a, g):  # of the one convolution: g padded by 1 (swapped) or a (autodiff's two)
        return (a.shape[0], a.shape[1] + 2, a.shape[2] + 2, g.shape[-1]) if form == "swapped" else a.shape

    on_cpu = jax.default_backend() == "cpu"
    for (a, kernel, g), form in ((large, "swapped" if on_cpu else "autodiff"), (small, "autodiff")):
        assert _conv_lhs_shapes(cwg.kernel_gradient, a, kernel, g) == {conv_input(form, a, g)}
    for form in ("swapped", "autodiff"):
        monkeypatch.setenv(cwg.OVERRIDE_ENV, form.upper())
        for a, kernel, g in (large, small):
            assert _conv_lhs_shapes(cwg.kernel_gradient, a, kernel, g) == {conv_input(form, a, g)}


def test_a_wrong_override_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv(cwg.OVERRIDE_ENV, "fast")
    a, kernel, g = _operands(1, 4, 4, 4, 4)
    with pytest.raises(ConfigError, match=r"DDPM_JAX_KERNEL_GRADIENT='fast' is not one of auto, autodiff, swapped"):
        cwg.kernel_gradient(a, kernel, g)
