"""Command-line entry point: parses --config, --workdir and --mode, then dispatches. Nothing else lives here.

python -m ddpm_jax.main --config=configs/quickstart.py --workdir=/tmp/run [--mode=MODE] [--config.KEY=VALUE]
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/NAME.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
# Every mode is a function (config, workdir) -> {label: value}; main prints each as "label: value".
MODES = {
    "train": ("ddpm_jax.train", "train_from_workdir", "train, or resume from the latest checkpoint"),
    "sample": ("ddpm_jax.generation", "sample_from_workdir", "sample from the EMA weights of the latest checkpoint"),
    "eval": ("ddpm_jax.evaluation", "evaluate_from_workdir", "bits/dim of the EMA weights on eval.split"),
    "fid": ("ddpm_jax.fid", "fid_from_workdir", "FID and KID of eval.fid_num_samples EMA samples vs the training data"),
    "inpaint": ("ddpm_jax.editing", "inpaint_from_workdir", "fill the inpaint.mask region of images (RePaint)"),
    "edit": ("ddpm_jax.editing", "edit_from_workdir", "SDEdit images at edit.strength, or denoise edit.noise_sigma"),
}
flags.DEFINE_enum("mode", "train", list(MODES), "; ".join(f"{m}: {h}" for m, (_, _, h) in MODES.items()))
flags.DEFINE_bool("distributed", False, "Join a multi-process run (one process per host). Without "
                  "--coordinator_address the cluster is auto-detected (TPU VMs, SLURM).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for a multi-process run outside TPU VMs "
                    "(with --num_processes and --process_id; implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run (one per host).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
    """Drops the INFO chatter of Orbax and JAX internals so the progress lines stay readable."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        """Keeps warnings and errors from everywhere, INFO only from ddpm_jax."""
        return record.levelno >= py_logging.WARNING or f"{os.sep}ddpm_jax{os.sep}" in record.pathname


def main(argv: list[str]) -> None:
    """Runs the selected mode; known user errors become one line on stderr and exit code 2."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from ddpm_jax import xla_flags

    xla_flags.apply_defaults()  # Before JAX starts its backends, which read XLA_FLAGS once.
    # Imported here so that --help answers at once and flags are parsed before JAX starts.
    import jax

    from ddpm_jax import checkpointing, config_checks, fileio, input_pipeline, parallel

    if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes is not None:
        try:
            parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    cache_dir = os.environ.get("DDPM_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/ddpm_jax/jax"))
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    workdir = fileio.resolve(FLAGS.workdir)  # Absolute for Orbax; gs:// URLs stay as they are.
    known_errors = (config_checks.ConfigError, input_pipeline.DataError, checkpointing.CheckpointMismatchError,
                    checkpointing.WorkdirError, FileNotFoundError, FloatingPointError)
    module, function, _ = MODES[FLAGS.mode]
    try:
        outputs = getattr(importlib.import_module(module), function)(FLAGS.config, workdir)
        if jax.process_index() == 0:
            for label, value in outputs.items():
                print(f"{label}: {value}", flush=True)
    except known_errors as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
