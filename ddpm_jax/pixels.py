"""Pixels between storage and the network: uint8 [0, 255] in files, batches and outputs; float [-1, 1] in the model."""

from __future__ import annotations

import jax.numpy as jnp


def to_model_range(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 images -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
    """Maps images in [-1, 1] to uint8 [0, 255] with rounding (values outside are clipped)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
