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
}
flags.DEFINE_enum("mode", "train", list(MODES), "; ".join(f"{m}: {h}" for m, (_, _, h) in MODES.items()))
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
    # Imported here so that --help answers at once and flags are parsed before JAX starts.
    import jax

    from ddpm_jax import checkpointing, config_checks, input_pipeline

    cache_dir = os.environ.get("DDPM_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/ddpm_jax/jax"))
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
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
