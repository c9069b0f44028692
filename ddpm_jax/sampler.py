"""The compiled, device-sharded sampler and its chunk loop: the UNet meets diffusion.samplers on a mesh.

Nothing here reads or writes files or checkpoints: `generate` returns uint8 arrays on the host, and the modes
(modes/sample.py, the training grids, FID) decide what to write.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import builders, parallel, pixels
from ddpm_jax.diffusion import guidance, samplers
from ddpm_jax.diffusion.parameterization import DenoiseFn
from ddpm_jax.parallel import DATA_AXIS

# (params, key, batch[, labels]) -> (uint8 samples (batch, S, S, 3), uint8 frames (F, batch, S, S, 3))
Sampler = Callable[..., tuple[jax.Array, jax.Array]]


def sharded_denoiser(
    model: nn.Module, params: Any, mesh: jax.sharding.Mesh, *, labels: jax.Array | None = None,
    guidance_scale: float = 0.0,
) -> DenoiseFn:
    """The UNet as a `denoise_fn(x_t, t)` whose batch stays split over the mesh, inside any jitted loop.

    Its input and output are constrained to the batch sharding, so the network runs on each device's share of the
    batch while the samplers themselves know nothing of devices. With labels (int32 (B,), class-conditional models)
    it predicts towards them with classifier-free guidance weight `guidance_scale`; without, a class-conditional
    model predicts with its null label, i.e. unconditionally.
    """
    sharding = parallel.batch_sharded(mesh)

    def constrain(v: jnp.ndarray) -> jnp.ndarray:
        return jax.lax.with_sharding_constraint(v, sharding)

    if labels is None:
        def network(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
            return model.apply({"params": params}, x, t, train=False)
    else:
        network = guidance.guided_denoise_fn(
            lambda x, t, c: model.apply({"params": params}, x, t, labels=c, train=False), constrain(labels),
            model.num_classes, guidance_scale,
        )
    return lambda x, t: constrain(network(constrain(x), t))


def make_sampler(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh) -> Sampler:
    """Compiled sampler (params, key, batch[, labels]) -> (uint8 samples, uint8 frames), batch split over devices.

    Samples with config.sampling's method, steps, spacing, order, eta, clipping and frames; labels (int32 (batch,),
    class-conditional models only) are sampled with sampling.guidance_scale.
    """
    s = config.sampling
    size = config.data.image_size
    param = builders.create_parameterization(config, s.clip_denoised)

    @functools.partial(jax.jit, static_argnums=(2,),
                       out_shardings=(parallel.batch_sharded(mesh), NamedSharding(mesh, P(None, DATA_AXIS))))
    def run(params: Any, key: jax.Array, batch: int, labels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        denoise = sharded_denoiser(model, params, mesh, labels=labels, guidance_scale=s.guidance_scale)
        x, frames = samplers.sample(denoise, param, key, (batch, size, size, 3), method=s.method,
                                    num_steps=s.num_steps, eta=s.eta, timestep_spacing=s.timestep_spacing,
                                    solver_order=s.solver_order, num_intermediates=s.num_intermediates)
        return pixels.to_uint8(x), pixels.to_uint8(frames)

    return run


def precompile(sample_fn: Sampler, params: Any, batch: int, labels: np.ndarray | None = None) -> Sampler:
    """The sampler with its program for `batch` samples (and labels of that shape) compiled now, ahead of its use.

    Same signature and results; other batch sizes still compile on first use. Training compiles its grid sampler
    this way before the first step, while no step's buffers are resident yet, and so lowers its peak memory.
    """
    key = jax.random.PRNGKey(0)
    extra = () if labels is None else (jnp.zeros((batch,), jnp.int32),)
    compiled = sample_fn.lower(params, key, batch, *extra).compile()

    def run(params: Any, key: jax.Array, size: int, *chunk_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        return compiled(params, key, *chunk_labels) if size == batch else sample_fn(params, key, size, *chunk_labels)

    return run


def chunk_size(batch_size: int, num_samples: int, num_devices: int) -> int:
    """Samples per compiled call: batch_size (at most num_samples), rounded up to a multiple of the device count."""
    return parallel.round_up(min(batch_size, num_samples), num_devices)


def generate(
    sampler: Sampler, params: Any, key: jax.Array, num_samples: int, batch_size: int, mesh: jax.sharding.Mesh,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples in chunks (a multiple of the device count); returns num_samples uint8 images and the frames.

    labels: the class of each sample (num_samples of them) for class-conditional models, or None. Chunk i draws its
    noise from fold_in(key, i). Only the first chunk's frames are kept: the denoising strip shows a few rows, and
    the frames of 50k samples would not fit in memory.
    """
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"got {len(labels)} labels for {num_samples} samples")
    chunk = chunk_size(batch_size, num_samples, mesh.size)
    first_frames: list[jax.Array] = []

    def call(i: int, *chunk_labels: jax.Array) -> tuple[jax.Array]:
        x, frames = sampler(params, jax.random.fold_in(key, i), chunk, *chunk_labels)
        if i == 0:
            first_frames.append(frames)
        return (x,)

    inputs = [] if labels is None else [np.asarray(labels, np.int32)]
    samples = np.concatenate([x for (x,) in parallel.map_chunks(call, inputs, num_samples, chunk, mesh)])
    return samples, parallel.fetch(first_frames[0])[:, :num_samples]


def grid_labels(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """The class of each sample of a grid: None if unconditional; one class repeated, or each class in turn.

    With sampling.class_label = -1 every class gets ceil(num_samples / K) samples, one grid row per class.
    """
    k, s = config.model.num_classes, config.sampling
    if k == 0:
        return None
    if s.class_label >= 0:
        return np.full(s.num_samples, s.class_label, np.int32)
    return np.repeat(np.arange(k, dtype=np.int32), -(-s.num_samples // k))
