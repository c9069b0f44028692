"""The errors a user can fix: each carries one readable line (what is wrong, how to fix it), and `main` prints it.

Every kind derives from `UserError`, which `main` catches and turns into `error: <line>` and exit code 2; anything
else is a bug and keeps its traceback. Each kind also derives from the builtin error it refines, so callers that
catch ValueError or OSError keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the input (config, data, workdir, checkpoint) that the user can fix; one line."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work, with what is wrong and what is accepted."""


class DataError(UserError, ValueError):
    """What is wrong with the data and how to fix it."""


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint in a workdir holds a model of another shape than the config describes."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A mode that reads a trained model found no intact checkpoint in the workdir."""


class WorkdirError(UserError, OSError):
    """The workdir cannot hold this run's checkpoints: not writable, or not enough free space."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged: the loss became NaN or infinite (the last good checkpoint is kept)."""
