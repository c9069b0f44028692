"""This machine's measured ceilings for JAX: float32 matmul, float32 3x3 conv forward+backward, bf16 matmul.

Run by `benchmarks/run.py` in its own process (so its memory does not count against the train step); prints one
JSON object of GFLOP/s. The conv shape is DESIGN.md's: 128 channels, 32x32, batch 16.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import run_times  # noqa: E402
from ddpm_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # The same XLA flags as the train step: the ceiling of the code path we use.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def best_gflops(fn, args, flops: float, repeats: int = 7) -> float:
    """GFLOP/s of the fastest of `repeats` timed calls of the compiled fn (after one warm-up call)."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return flops / min(run_times(lambda: jax.block_until_ready(compiled(*args)), repeats)) / 1e9


def conv(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """3x3 'SAME' convolution in NHWC/HWIO, the layout of the UNet's convolutions."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main() -> None:
    """Prints {"matmul_f32", "conv_f32_fwd_bwd", "matmul_bf16"} in GFLOP/s."""
    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul_flops = 2.0 * n**3
    matmul_f32 = best_gflops(jnp.dot, (a, a), matmul_flops)
    a16 = a.astype(jnp.bfloat16)
    matmul_bf16 = best_gflops(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32), (a16, a16), matmul_flops)

    b, s, c = 16, 32, 128
    x = jax.random.normal(jax.random.PRNGKey(1), (b, s, s, c), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, c, c), jnp.float32) * 0.03
    conv_flops = 3 * 2.0 * b * s * s * c * c * 9  # forward, input gradient, weight gradient

    def fwd_bwd(x: jnp.ndarray, w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x, w)

    conv_f32 = best_gflops(fwd_bwd, (x, w), conv_flops)
    print(json.dumps({"matmul_f32": matmul_f32, "conv_f32_fwd_bwd": conv_f32, "matmul_bf16": matmul_bf16,
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}))


if __name__ == "__main__":
    main()
