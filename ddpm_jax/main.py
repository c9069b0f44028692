"""Command-line entry point: parses --config, --workdir and --mode, then runs the mode. Nothing else lives here.

python -m ddpm_jax.main --config=configs/quickstart.py --workdir=/tmp/run [--mode=MODE] [--config.KEY=VALUE]

Every problem a user can fix (a mistyped key, a value of the wrong type, a missing config file, bad data, a
checkpoint of another model, ...) ends as one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import config as default_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/NAME.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
# Each mode is a module of ddpm_jax.modes with run(config, workdir) -> {label: value}; main prints "label: value".
MODES = {
    "train": "train, or resume from the latest checkpoint",
    "sample": "sample from the EMA weights of the latest checkpoint",
    "eval": "bits/dim of the EMA weights on eval.split",
    "fid": "FID and KID of eval.fid_num_samples EMA samples vs the training data",
    "inpaint": "fill the inpaint.mask region of images (RePaint)",
    "edit": "SDEdit images at edit.strength, or denoise edit.noise_sigma",
    "prepare": "decode data.dataset once into its streamed cache (data.cache_dir)",
}
flags.DEFINE_enum("mode", "train", list(MODES), "; ".join(f"{m}: {h}" for m, h in MODES.items()))
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


def _fail(message: str) -> None:
    """Prints `error: <first line of message>` and exits with code 2."""
    print(f"error: {str(message).strip().splitlines()[0] if str(message).strip() else message}", file=sys.stderr,
          flush=True)
    sys.exit(2)


def _flag_error(error: flags.Error) -> str:
    """absl's message for a bad flag, with the expected type for a --config.KEY value that does not parse."""
    text = str(error)
    match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", text)
    if not match:
        return text
    key, value, reason = match.groups()
    default = default_config.get_config()
    if key not in default_config.flat_keys(default):
        return default_config.unknown_key_message(key)
    for part in key.split("."):
        default = default[part]
    return f"--config.{key}={value}: {key} takes {type(default).__name__} values ({reason})"


def _parse_error(argv: list[str], error: Exception) -> str:
    """One line for what went wrong while parsing the flags or loading the config file."""
    if isinstance(error, flags.Error):
        return _flag_error(error)
    given = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
    known = default_config.flat_keys(default_config.get_config())
    unknown = [k for k in given if k not in known]
    if unknown:  # ml_collections raises AttributeError or KeyError for a --config.KEY the config lacks.
        return default_config.unknown_key_message(unknown[0])
    path = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), "")
    if path and not os.path.isfile(path):
        return (f"cannot load config file {path}: it does not exist; pass --config=configs/NAME.py "
                "(configs/quickstart.py, configs/butterflies.py, ...)")
    return f"cannot load config file {path}: {type(error).__name__}: {error}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every problem in the flags or the config file reported as one `error:` line."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.items()  # config_flags defers a file that failed to load to the first use: surface it here.
    except Exception as e:  # A bad flag (flags.Error), an unknown key, a missing or broken config file, ...
        _fail(_parse_error(argv, e))
    return rest


def main(argv: list[str]) -> None:
    """Runs the selected mode; known user errors become one line on stderr and exit code 2."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # Deferred so that --help answers at once and XLA_FLAGS is set before JAX starts its backends.
    from ddpm_jax import xla_flags

    distributed = bool(FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes is not None)
    xla_flags.apply_defaults(cpu_devices=xla_flags.cpu_devices_for(
        FLAGS.mode, xla_flags.host_cores(), FLAGS.config.training.batch_size, distributed),
        inline_dispatch=xla_flags.inline_dispatch_for(FLAGS.mode),
        legacy_loop_fusion=xla_flags.legacy_loop_fusion_for_config(FLAGS.config))
    import jax

    from ddpm_jax import fileio, parallel
    from ddpm_jax.errors import UserError

    try:
        if distributed:
            parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        cache_dir = os.environ.get("DDPM_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/ddpm_jax/jax"))
        if cache_dir:
            jax.config.update("jax_compilation_cache_dir", cache_dir)
        workdir = fileio.resolve(FLAGS.workdir)  # Absolute for Orbax; gs:// URLs stay as they are.
        outputs = importlib.import_module(f"ddpm_jax.modes.{FLAGS.mode}").run(FLAGS.config, workdir)
        if jax.process_index() == 0:
            for label, value in outputs.items():
                print(f"{label}: {value}", flush=True)
    except UserError as e:
        logging.error("%s", e)
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
