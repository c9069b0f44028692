"""Parameters seen by a custom VJP under shard_map: marked varying like the activations they meet."""

from __future__ import annotations

import jax
from jax import lax


def varying_like(a: jax.Array, x: jax.Array) -> jax.Array:
    """`a` marked as varying over every shard_map axis x varies over (a no-op outside shard_map).

    Under shard_map, parameters are the same on every device and x is not: a custom VJP must see them varying like
    x, so that autodiff sums their per-device gradients (the transpose of this cast is a psum).
    """
    missing = tuple(sorted(jax.typeof(x).mat.varying - jax.typeof(a).mat.varying))
    return lax.pcast(a, missing, to="varying") if missing else a
