"""Device meshes and batch placement for data parallelism over every device of every host."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax._src import distributed  # The barrier has no public API; Orbax uses the same client call.
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax.errors import ConfigError

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins the multi-process JAX runtime: explicit coordinator, or auto-detected (TPU VMs, SLURM) when all are None.

    Must run before anything touches the devices. On CPU the collectives between processes go through gloo.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("--coordinator_address, --num_processes and --process_id go together: give all three "
                         "(or none, to auto-detect the cluster on TPU VMs and SLURM)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
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
    distributed.global_state.client.wait_at_barrier(f"ddpm_jax:{name}:{next(_barriers)}", timeout_s * 1000)


def global_batch(mesh: jax.sharding.Mesh, local_batch: np.ndarray) -> jax.Array:
    """Assembles the per-host batches of all processes into one global array split over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharded(mesh), local_batch)


def global_stacked_batch(mesh: jax.sharding.Mesh, local_batch: np.ndarray) -> jax.Array:
    """Like global_batch for a stack of batches (steps, batch, ...): split over the mesh along axis 1, not axis 0."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(None, DATA_AXIS)), local_batch)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n (batch sizes that split evenly over devices)."""
    return -(-n // multiple) * multiple


def shard_host_array(mesh: jax.sharding.Mesh, array: np.ndarray) -> jax.Array:
    """A host array that every process holds whole, as a global array split over the mesh along axis 0."""
    return jax.make_array_from_callback(array.shape, batch_sharded(mesh), lambda index: array[index])


def map_chunks(
    fn: Callable[..., Sequence[jax.Array]], arrays: Sequence[np.ndarray], num_rows: int, chunk: int,
    mesh: jax.sharding.Mesh,
) -> Iterator[list[np.ndarray]]:
    """Runs fn(i, *chunk_i) over rows [i*chunk, (i+1)*chunk) of host arrays and yields its outputs on the host.

    Every chunk has exactly `chunk` rows, so fn compiles once: the last one is padded with copies of its last row,
    and the padded rows are cut off the outputs (each yielded array has the chunk's real rows along axis 0). The
    inputs are split over the mesh along axis 0; every process must hold them whole. One chunk is dispatched ahead
    of the one being fetched, so the host never leaves the devices idle. With no arrays, fn(i) is called
    ceil(num_rows / chunk) times.
    """
    if chunk % mesh.size:
        raise ValueError(f"chunk={chunk} is not a multiple of the {mesh.size} devices")
    in_flight: list[tuple[Sequence[jax.Array], int]] = []
    for i, start in enumerate(range(0, num_rows, chunk)):
        parts = []
        for a in arrays:
            part = a[start : start + chunk]
            parts.append(shard_host_array(mesh, np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])))
        in_flight.append((fn(i, *parts), min(chunk, num_rows - start)))
        if len(in_flight) > 1:
            outputs, n = in_flight.pop(0)
            yield [fetch(x)[:n] for x in outputs]
    for outputs, n in in_flight:
        yield [fetch(x)[:n] for x in outputs]
