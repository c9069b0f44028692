"""Checkpoints: a thin wrapper over Orbax's CheckpointManager (save the train state and config, restore onto any device
layout), the workdir check before training, and the EMA restore that every mode reading a trained model needs."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddpm_jax import fileio, parallel, train_state
from ddpm_jax.errors import CheckpointMismatchError, MissingCheckpointError, WorkdirError
from ddpm_jax.models import unet

# Orbax splits every replicated array into one slice per replica so that replicas write in parallel; for the many
# small arrays of a UNet that is thousands of device slicing ops (10-20 s for the first save of even a tiny model).
# Only arrays with at least 4 MiB per replica are split; smaller ones are written whole from one replica.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=4 << 20), override=True
)


def check_workdir(workdir: str, state_bytes: int) -> None:
    """Fails early, with a clear message, if workdir is not writable or has too little space for two checkpoints."""
    if fileio.is_remote(workdir):  # A bucket: check that we may write there; its space is not ours to measure.
        probe = f"{workdir}/.write_probe_{uuid.uuid4().hex}"
        try:
            fileio.write_bytes(probe, b"\0")
            epath.Path(probe).unlink()
        except Exception as e:  # Credentials, a missing bucket and a missing gcsfs all surface differently.
            raise WorkdirError(f"cannot write to --workdir={workdir} ({type(e).__name__}: {e}); check the bucket "
                               'name and your credentials, and install the gcs extra: pip install "ddpm_jax[gcs]"'
                               ) from e
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise WorkdirError(f"cannot write to --workdir={workdir} ({reason}); choose a writable directory") from e
    # Two checkpoints may coexist while the older one is replaced, plus room for samples and event files.
    needed = 2 * state_bytes + (64 << 20)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise WorkdirError(
            f"--workdir={workdir} has {free / 2**20:.0f} MiB free but checkpoints of this model need about "
            f"{needed / 2**20:.0f} MiB; free some space or choose another directory"
        )


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """Maps 'a/b/kernel' -> shape for every array (or array metadata) leaf of a nested dict."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape) for path, leaf in flat
    }


class Checkpointer:
    """Saves {state, config} every so often under `directory`, keeps the last few, restores the latest."""

    def __init__(self, directory: str, keep: int = 3):
        """Opens (and creates) the checkpoint directory; it must be an absolute path for Orbax."""
        self.directory = fileio.resolve(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
            # Registered up front so that metadata can be read before the first restore in this process.
            item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, config: dict[str, Any], force: bool = False) -> bool:
        """Starts an asynchronous save of the state (global arrays) and the config dict at `step`."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
            force=force,
        )

    def check_compatible(self, step: int, abstract_params: Any) -> None:
        """Raises CheckpointMismatchError if the saved params differ in structure or shape from abstract_params."""
        saved = _shapes_by_path(self._manager.item_metadata(step)["state"].tree["params"])
        wanted = _shapes_by_path(abstract_params)
        if saved == wanted:
            return
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        differing = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
        if differing:
            k = differing[0]
            detail = f"{k} is {saved[k]} in the checkpoint but {wanted[k]} in the config"
        elif missing:
            detail = f"the config has {missing[0]}, the checkpoint does not"
        else:
            detail = f"the checkpoint has {extra[0]}, the config does not"
        raise CheckpointMismatchError(
            f"the checkpoint at {self.directory}/{step} holds a model of a different shape ({detail}); "
            "use a new --workdir, or the config it was trained with (its config.json is saved beside the checkpoint)"
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores (state, config dict) at `step` onto the shardings given in abstract_state."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()),
        )
        logging.info("restored checkpoint %s/%d", self.directory, step)
        return restored["state"], restored["config"]

    def restore_latest_intact(self, abstract_state: Any, set_aside_damaged: bool = False) -> tuple[Any, int] | None:
        """Restores the newest checkpoint that reads back whole; None if there is none.

        A checkpoint whose files are missing or corrupt is skipped with a warning (and, when training, renamed to
        `damaged-<step>-<time>` so that the step can be saved again); a model-shape mismatch is raised, not skipped.
        """
        restored = None
        moved = False
        for step in reversed(self.all_steps()):
            try:
                self.check_compatible(step, abstract_state.params)
                restored = (self.restore(step, abstract_state)[0], step)
                break
            except CheckpointMismatchError:
                raise
            except Exception as e:  # Orbax/TensorStore raise many types for truncated or missing files.
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                logging.warning("the checkpoint at %s/%d is damaged (%s); falling back to an older one",
                                self.directory, step, reason[:300])
                if set_aside_damaged:  # Every process finds the same damage; process 0 moves it.
                    if jax.process_index() == 0:
                        target = os.path.join(self.directory, f"damaged-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                        epath.Path(self.directory, str(step)).rename(target)
                        logging.warning("moved the damaged checkpoint to %s", target)
                    moved = True
        if moved:
            parallel.sync_processes("damaged checkpoints set aside")
            self._manager.reload()
        return restored

    def reached_preemption(self, step: int) -> bool:
        """True when the multi-host preemption service says this step is the one to save at before stopping."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves have been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()


def checkpoint_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints: <workdir>/checkpoints."""
    return os.path.join(fileio.resolve(workdir), "checkpoints")


def restore_ema_params(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
) -> tuple[nn.Module, Any, int]:
    """The model of `config` and the EMA parameters and step of the latest intact checkpoint in workdir."""
    ckpt_dir = checkpoint_dir(workdir)
    if not fileio.is_dir(ckpt_dir):
        raise MissingCheckpointError(f"no checkpoints in {ckpt_dir}: train first with --mode=train --workdir={workdir}")
    ckpt = Checkpointer(ckpt_dir, keep=config.training.keep_checkpoints)
    model = unet.create_model(config)
    abstract = train_state.abstract_train_state(config, model, train_state.create_optimizer(config), mesh)
    try:
        restored = ckpt.restore_latest_intact(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise MissingCheckpointError(
            f"no intact checkpoint in {ckpt_dir}: train first with --mode=train --workdir={workdir}"
        )
    state, step = restored
    return model, state.ema_params, step
