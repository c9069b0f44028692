"""Device meshes and batch placement for data parallelism over every device of every host."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over the given (default: all) devices, with Auto axes for plain data parallelism."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of arrays held whole on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of arrays split along their first (batch) axis over the 'data' axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: jax.sharding.Mesh, local_batch: np.ndarray) -> jax.Array:
    """Assembles the per-host batches of all processes into one global array split over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharded(mesh), local_batch)
