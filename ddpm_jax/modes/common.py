"""The start-up every mode shares: the workdir resolved, the device mesh, the config checked before anything runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import config_checks, fileio, parallel


def start(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, jax.sharding.Mesh]:
    """The resolved workdir (absolute, or a gs:// URL) and the mesh over all devices, after checking the config."""
    mesh = parallel.make_mesh()
    config_checks.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    return fileio.resolve(workdir), mesh


def reverse_steps(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sampler settings --mode=inpaint and --mode=edit share with --mode=sample: method, steps, eta, spacing."""
    s = config.sampling
    return {"method": s.method, "num_steps": s.num_steps, "eta": s.eta, "timestep_spacing": s.timestep_spacing}


def run_on_images(
    fn: Callable[..., Sequence[jax.Array]], params: Any, key: jax.Array, arrays: list[np.ndarray],
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
) -> list[np.ndarray]:
    """fn(params, fold_in(key, i), *chunk_i) over the input images, split over the mesh; outputs on the host.

    Chunks hold sampling.batch_size images (rounded up to the device count); the outputs of all chunks are
    concatenated.
    """
    n = len(arrays[0])
    chunk = parallel.round_up(min(config.sampling.batch_size, n), mesh.size)
    results = parallel.map_chunks(lambda i, *parts: fn(params, jax.random.fold_in(key, i), *parts), arrays, n, chunk,
                                  mesh)
    return [np.concatenate(group) for group in zip(*results, strict=True)]
