"""The DDPM UNet of Ho et al. (2020) in Flax linen: time-conditioned ResNet blocks, GroupNorm, self-attention."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from ddpm_jax.models.group_norm import GroupNorm
from ddpm_jax.models.norm_conv import DROPOUT_NAME, norm_swish_conv_layer
from ddpm_jax.models.upsample import UpsampleConv

Dtype = Any


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal embedding of integer (or real) timesteps, shape (B,) -> (B, dim), as in Transformer/DDPM."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _zero_init() -> nn.initializers.Initializer:
    return nn.initializers.zeros_init()


# DDPM initialises every layer with variance-scaling(1, fan_avg, uniform); the last layer of a residual branch
# with zeros (here: scale 1e-10 in the original, zero in practice) so each block starts as the identity.
_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def _norm_swish_conv(module: nn.Module, x: jnp.ndarray, norm_name: str, conv_name: str, kernel_init: Any, *,
                     features: int, num_groups: int, dtype: Dtype, fused: bool, dropout: float = 0.0,
                     deterministic: bool = True) -> jnp.ndarray:
    """GroupNorm -> swish -> dropout -> 3x3 conv in `module`: one op (models/norm_conv.py) or the flax modules."""
    if fused:
        return norm_swish_conv_layer(module, x, features=features, num_groups=num_groups, norm_name=norm_name,
                                     conv_name=conv_name, kernel_init=kernel_init, dtype=dtype, dropout=dropout,
                                     deterministic=deterministic)
    h = GroupNorm(num_groups, dtype=dtype, swish=True, name=norm_name, parent=module)(x)
    if dropout > 0.0:  # One dropout per block, named as flax's auto-name did, so its key (and mask) stays the same.
        h = nn.Dropout(dropout, deterministic=deterministic, name=DROPOUT_NAME, parent=module)(h)
    return nn.Conv(features, (3, 3), dtype=dtype, kernel_init=kernel_init, name=conv_name, parent=module)(h)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv, plus the time embedding, GroupNorm -> swish -> dropout -> conv, residual."""

    out_ch: int
    dropout: float
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    fused_norm_conv: bool = True  # See UNet.fused_norm_conv.

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Applies the block to x (B,H,W,C) conditioned on temb (B,E)."""
        temb = nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=_default_init, name="temb_proj")(nn.swish(temb))
        layer = functools.partial(_norm_swish_conv, self, features=self.out_ch, num_groups=self.num_groups,
                                  dtype=self.dtype, fused=self.fused_norm_conv)
        h = layer(x, "norm1", "conv1", _default_init)
        h = layer(h + temb[:, None, None, :], "norm2", "conv2", _zero_init(), dropout=self.dropout,
                  deterministic=not train)
        if x.shape[-1] != self.out_ch:
            # A 1x1 "network-in-network" projection when the channel count changes.
            x = nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=_default_init, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Attends over all H*W positions of x (B,H,W,C)."""
        height, c = x.shape[1], x.shape[-1]
        h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        q, k, v = (
            rearrange(nn.Dense(c, dtype=self.dtype, kernel_init=_default_init, name=n)(h), "b h w c -> b (h w) c")
            for n in ("q", "k", "v")
        )
        # Softmax in float32 even when computing in bfloat16: the logits of large maps overflow otherwise.
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = rearrange(jnp.einsum("bqk,bkc->bqc", weights, v), "b (h w) c -> b h w c", h=height)
        h = nn.Dense(c, dtype=self.dtype, kernel_init=_zero_init(), name="proj_out")(h)
        return x + h


class UNet(nn.Module):
    """DDPM UNet: input (B,H,W,C) in [-1,1] and timesteps (B,) -> output of the same shape as the input.

    ch: base channel count; ch_mult: multiplier per resolution level (each level after the first halves H and W);
    num_res_blocks: ResNet blocks per level on the way down (one more on the way up); attn_resolutions: spatial
    sizes (e.g. 16 for 16x16) at which a self-attention block follows each ResNet block. num_classes > 0 adds a
    learned class embedding (num_classes + 1 rows; the last is the null label of classifier-free guidance) to the
    time embedding; 0 is unconditional, with exactly the parameters of a UNet without it.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    out_ch: int | None = None
    dtype: Dtype = jnp.float32
    num_classes: int = 0
    # False computes each upsampling convolution as written, at the high resolution: the same function, 2.25x its
    # FLOPs; the reference of tests/test_models_unet.py and the model FLOPs of benchmarks/jax_bench.py.
    fold_upsampling: bool = True
    # True computes each GroupNorm -> swish -> 3x3 conv pair as one op whose backward keeps only the norm's input
    # (models/norm_conv.py: less memory in training, the same function and gradients); False as two flax modules.
    fused_norm_conv: bool = True

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, t: jnp.ndarray, train: bool = False, *, labels: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """Predicts the network target (eps, x0 or v) for noisy images x at timesteps t.

        labels: int32 (B,) class ids in [0, num_classes], num_classes being the null label; None means the null label
        for every example (an unconditional prediction of a class-conditional model). Only for num_classes > 0.
        """
        out_ch = self.out_ch or x.shape[-1]
        block = {"dropout": self.dropout, "num_groups": self.num_groups, "dtype": self.dtype,
                 "fused_norm_conv": self.fused_norm_conv}
        temb = timestep_embedding(t, self.ch)
        temb = nn.Dense(self.ch * 4, dtype=self.dtype, kernel_init=_default_init, name="temb_dense0")(temb)
        temb = nn.Dense(self.ch * 4, dtype=self.dtype, kernel_init=_default_init, name="temb_dense1")(
            nn.swish(temb)
        )
        if self.num_classes > 0:
            if labels is None:
                labels = jnp.full(t.shape, self.num_classes, jnp.int32)
            # Added to the time embedding, which reaches every ResNet block (as in ADM, Dhariwal & Nichol 2021).
            temb = temb + nn.Embed(self.num_classes + 1, self.ch * 4, dtype=self.dtype, name="label_embed")(labels)
        elif labels is not None:
            raise ValueError("labels were given to an unconditional UNet (num_classes=0)")

        h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, kernel_init=_default_init, name="conv_in")(
            x.astype(self.dtype)
        )
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, name=f"down_{level}_block_{i}", **block)(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.num_groups, self.dtype, name=f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != len(self.ch_mult) - 1:
                h = nn.Conv(
                    h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype, kernel_init=_default_init,
                    name=f"down_{level}_downsample",
                )(h)
                skips.append(h)

        h = ResnetBlock(h.shape[-1], name="mid_block_1", **block)(h, temb, train)
        h = AttnBlock(self.num_groups, self.dtype, name="mid_attn")(h)
        h = ResnetBlock(h.shape[-1], name="mid_block_2", **block)(h, temb, train)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResnetBlock(self.ch * mult, name=f"up_{level}_block_{i}", **block)(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.num_groups, self.dtype, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                # Nearest-neighbour 2x upsampling then a 3x3 conv, computed on the low-resolution input.
                h = UpsampleConv(h.shape[-1], dtype=self.dtype, kernel_init=_default_init,
                                 folded=self.fold_upsampling, name=f"up_{level}_upsample")(h)
        assert not skips, "every skip connection must be consumed"

        h = _norm_swish_conv(self, h, "norm_out", "conv_out", _zero_init(), features=out_ch,
                             num_groups=self.num_groups, dtype=self.dtype, fused=self.fused_norm_conv)
        return h.astype(jnp.float32)


def create_model(config: Any) -> UNet:
    """Builds the UNet from a `config.model` ConfigDict."""
    m = config.model
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        num_groups=m.num_groups,
        dtype=jnp.dtype(m.dtype),
        num_classes=m.num_classes,
    )
