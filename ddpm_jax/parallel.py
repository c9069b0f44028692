"""Device meshes and batch placement for data parallelism over every device of every host."""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins the multi-process JAX runtime: explicit coordinator, or auto-detected (TPU VMs, SLURM) when all are None.

    Must run before anything touches the devices. On CPU the collectives between processes go through gloo.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together: give all three "
                         "(or none, to auto-detect the cluster on TPU VMs and SLURM)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


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


def fetch(array: jax.Array) -> np.ndarray:
    """The whole value of a global array on this host, gathering the shards other processes hold."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    if array.sharding.is_fully_replicated:  # Every host already holds all of it.
        return np.asarray(array.addressable_data(0))
    sync_processes("gather")
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


_barriers = itertools.count()


def sync_processes(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches this point (a no-op with one process).

    Uses the coordination service's barrier, not a device all-reduce: the first CPU collective between two processes
    gives up after 30 s, and a barrier is how peers that are still compiling get to catch up.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # The barrier has no public API; Orbax uses the same client call.

    distributed.global_state.client.wait_at_barrier(f"ddpm_jax:{name}:{next(_barriers)}", timeout_s * 1000)


def global_batch(mesh: jax.sharding.Mesh, local_batch: np.ndarray) -> jax.Array:
    """Assembles the per-host batches of all processes into one global array split over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharded(mesh), local_batch)


def global_stacked_batch(mesh: jax.sharding.Mesh, local_batch: np.ndarray) -> jax.Array:
    """Like global_batch for a stack of batches (steps, batch, ...): split over the mesh along axis 1, not axis 0."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(None, DATA_AXIS)), local_batch)
