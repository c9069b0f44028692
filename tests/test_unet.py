"""The Flax UNet: shapes, the DDPM CIFAR-10 parameter count, zero-initialised output, attention placement."""

import jax
import jax.numpy as jnp
import numpy as np

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


def test_output_shape_zero_init_and_time_conditioning():
    model = unet.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, dropout=0.1)
    apply = jax.jit(model.apply, static_argnames="train")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    t = jnp.array([10, 999])
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x, t)["params"]
    out = apply({"params": params}, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # Residual branches and the output convolution start at zero, so an untrained model predicts zero.
    np.testing.assert_array_equal(out, 0.0)
    # Once the zero-initialised layers have moved, the prediction depends on t, and dropout acts in training.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = treedef.unflatten([v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)])
    a = apply({"params": params}, x[:1].repeat(2, 0), t)
    assert not np.allclose(a[0], a[1], atol=1e-4)
    b = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(b, apply({"params": params}, x, t), atol=1e-4)


def test_timestep_embedding():
    emb = unet.timestep_embedding(jnp.array([0, 1, 500]), 16)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(emb[0, :8], 0.0)  # sin(0)
    np.testing.assert_allclose(emb[0, 8:], 1.0)  # cos(0)
    assert unet.timestep_embedding(jnp.array([3]), 7).shape == (1, 7)


def test_bfloat16_compute_keeps_float32_params():
    model = unet.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4, dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x, jnp.array([1, 2]))["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert jax.jit(model.apply)({"params": params}, x, jnp.array([1, 2])).dtype == jnp.float32
