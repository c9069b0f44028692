"""One process of a multi-process run on localhost, started twice by tests/test_multihost.py.

python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUTDIR DATASET

Each process gets 4 fake CPU devices. It (1) trains a few steps on explicit global batches, feeding only its own
rows, and saves the resulting parameters; (2) trains through train_and_evaluate with checkpoints and samples
from the restored checkpoint, so that saving, restoring and process-0-only writing run across processes, streaming
the data from a cache that both processes ask for at once (one prepares it, the other waits for it); (3) reads one
epoch of its share of that cache and saves the images, for the test to check that the shares are disjoint and
cover the dataset.
"""

import os
import pathlib
import sys

if __name__ == "__main__":  # Not when the test imports these helpers: its process keeps its 8 devices.
    # As in conftest: LLVM's optimisations off, so that each process compiles in half the time.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import conftest  # noqa: E402,F401  (sets the test compilation cache)
from helpers import flat_params, tiny_config  # noqa: E402

from ddpm_jax import parallel  # noqa: E402

NUM_STEPS = 3


def explicit_batches(config, num_steps: int):
    """The global batches of the comparison run: a pure function of the config, the same in every process."""
    import numpy as np

    size = config.data.image_size
    return np.random.default_rng(0).integers(0, 256, (num_steps, config.training.batch_size, size, size, 3), np.uint8)


def train_on_explicit_batches(config, batches):
    """Trains len(batches) steps from the config's init; each process feeds its slice of every global batch."""
    import jax

    from ddpm_jax import train, train_state
    from ddpm_jax.models import unet

    mesh = parallel.make_mesh()
    model = unet.create_model(config)
    state = train_state.init_train_state(config, model, train_state.create_optimizer(config), mesh)
    step_fn = train.make_train_step(config, model, mesh)
    step_fn = train.compile_train_step(step_fn, state, train.batch_spec(config, mesh))
    rows = len(batches[0]) // jax.process_count()
    losses = []
    for batch in batches:
        mine = batch[jax.process_index() * rows:(jax.process_index() + 1) * rows]
        state, scalars = step_fn(state, {"image": parallel.global_batch(mesh, mine)})
        losses.append(float(parallel.fetch(scalars["loss"])))
    return state, losses


def main() -> None:
    process_id, num_processes, port, outdir, dataset = sys.argv[1:6]
    parallel.initialize_distributed(f"localhost:{port}", int(num_processes), int(process_id))
    import jax
    from absl import logging

    logging.set_verbosity(logging.INFO)  # The test reads the progress and resume lines.
    import numpy as np

    from ddpm_jax import data, train
    from ddpm_jax.modes import sample

    assert jax.process_count() == int(num_processes) and jax.device_count() == 4 * int(num_processes)
    outdir = pathlib.Path(outdir)
    config = tiny_config(dataset, 8)

    state, losses = train_on_explicit_batches(config, explicit_batches(config, NUM_STEPS))
    params = flat_params(state.params)
    if jax.process_index() == 0:
        np.savez(outdir / "explicit.npz", losses=np.asarray(losses), **params)

    workdir = outdir / "workdir"
    config.training.num_train_steps, config.training.checkpoint_every_steps = 4, 2
    config.data.cache_dir, config.data.in_memory_max_gib = str(outdir / "caches"), 0.0
    state = train.train_and_evaluate(config, str(workdir))
    paths = sample.run(config, str(workdir))  # Restores the checkpoint cooperatively.
    if jax.process_index() == 0:
        np.savez(outdir / "trained.npz", **flat_params(state.ema_params))
        (outdir / "sample_paths.txt").write_text("\n".join(paths.values()))

    source = data.source_from_config(config, process_index=jax.process_index(), process_count=jax.process_count())
    batches = data.train_batches(source, batch_size=5, seed=1, start_step=0)
    epoch = np.concatenate([next(batches)["image"] for _ in range(-(-len(source) // 5))])[: len(source)]
    batches.close()
    np.save(outdir / f"epoch_{jax.process_index()}.npy", epoch)
    print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
    main()
