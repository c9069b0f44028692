"""Training: a pure train step, its data-parallel wrapper, and the train_and_evaluate loop.

The loop reads like the Flax examples': set up, then for each step call the compiled step and run whatever periodic
work is due (log, checkpoint, sample grid, FID), each a named helper, with the throughput clock paused around it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from ddpm_jax import (
    builders,
    checkpointing,
    config_checks,
    data,
    fileio,
    host_memory,
    metric_writers,
    outputs,
    parallel,
    pixels,
    preemption,
    rng,
    sampler,
    train_state,
    xla_flags,
)
from ddpm_jax.diffusion import guidance, losses
from ddpm_jax.diffusion.parameterization import Parameterization
from ddpm_jax.errors import CheckpointMismatchError, ConfigError, NonFiniteLossError
from ddpm_jax.evaluation import fid_evaluator
from ddpm_jax.models import unet
from ddpm_jax.parallel import DATA_AXIS
from ddpm_jax.train_state import TrainState

Batch = dict[str, jax.Array]  # {"image": uint8 (B, S, S, 3)[, "label": int32 (B,)]}
TrainStepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jnp.ndarray]]]


def random_flips(images: jnp.ndarray, keys: jax.Array) -> jnp.ndarray:
    """Each image (B, H, W, C) mirrored left-right with probability 1/2, decided by its own key (B keys)."""
    flip = jax.vmap(jax.random.bernoulli)(keys)
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    param: Parameterization,
    config: ml_collections.ConfigDict,
    axis_name: str = DATA_AXIS,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimizer step on this device's share of the batch; gradients are averaged over devices.

    Randomness is a pure function of (seed, step, global example index) for noise, timesteps, flips and label
    dropout (`rng`), so a step gives the same update on any number of devices; dropout keys also depend on the device
    index. For class-conditional models (model.num_classes > 0) the batch holds int32 "label"s.
    """
    device = jax.lax.axis_index(axis_name)
    images, labels = batch["image"], batch.get("label")
    local_batch = images.shape[0]
    step_key = rng.train_step_key(config.seed, state.step)
    example_ids = device * local_batch + jnp.arange(local_batch)
    example_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(step_key, rng.EXAMPLES), example_ids)
    flip_keys, diffusion_keys = jnp.moveaxis(jax.vmap(jax.random.split)(example_keys), 1, 0)
    dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, rng.DROPOUT), device)

    x0 = pixels.to_model_range(images)
    if config.data.random_flip:
        x0 = random_flips(x0, flip_keys)
    noise, t = losses.sample_noise_and_timesteps(diffusion_keys, x0.shape[1:], param.num_timesteps)
    if labels is not None:  # The null label for some examples: the unconditional model that guidance needs.
        labels = guidance.drop_labels(jax.random.fold_in(step_key, rng.LABEL_DROPOUT), example_ids, labels,
                                      config.training.label_dropout, config.model.num_classes)

    def loss_fn(params: Any) -> jnp.ndarray:
        def apply(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
            return model.apply({"params": params}, x, t, labels=labels, train=True, rngs={"dropout": dropout_key})

        t_cfg = config.training
        gamma = t_cfg.min_snr_gamma if t_cfg.loss_weighting == "min_snr" else t_cfg.p2_gamma
        local_loss = losses.diffusion_loss(apply, param, x0, t, noise, t_cfg.loss_weighting, gamma)
        # Every device holds the same number of examples, so the mean of per-device means is the global mean.
        return jax.lax.pmean(local_loss, axis_name)

    # The params are replicated (device-invariant) inputs of shard_map, so differentiating the all-reduced loss
    # makes autodiff insert the matching all-reduce of the per-device gradients: `grads` is the global-batch mean
    # gradient, identical on every device. (A further pmean of grads here would be a no-op; a psum would be wrong.)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree_utils.tree_norm(grads)
    new_state = state.apply_gradients(grads, config.training.ema_decay)
    scalars = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": train_state.learning_rate_schedule(config)(state.step)}
    if config.training.skip_nonfinite_updates:
        # Keep the old parameters, EMA and optimizer moments when this step's loss or gradients are not finite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        kept = state.replace(step=new_state.step)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
        scalars["skipped_updates"] = 1.0 - finite.astype(jnp.float32)
    return new_state, scalars


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh) -> TrainStepFn:
    """The compiled data-parallel step: state replicated, batch split over the 'data' axis, state donated.

    With training.steps_per_dispatch = k > 1 one call runs k steps (a lax.scan carrying the state, unrolled on CPUs):
    each batch leaf has a leading axis of k (data.train_batches(steps_per_item=k)), split over 'data' on axis 1, and
    each scalar comes back (k,).
    """
    param = builders.create_parameterization(config, clip_denoised=False)  # The loss never clips.
    step = functools.partial(train_step, model=model, param=param, config=config)
    k = config.training.steps_per_dispatch
    if k == 1:
        sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
        return jax.jit(sharded, donate_argnums=(0,))

    # XLA:CPU rewrites convolutions into the layout its fast kernels take only in the entry computation, so the
    # gradient convolutions of a step inside a while loop fall back to a naive loop (15x slower, measured): on CPUs
    # the k steps are unrolled, so compile time grows with k (tiny32: 25 s at k=1, 60 s at k=4). Accelerators loop.
    unroll = all(d.platform == "cpu" for d in mesh.devices.flat)

    def steps(state: TrainState, stacked: Batch) -> tuple[TrainState, dict[str, jnp.ndarray]]:
        return jax.lax.scan(step, state, stacked, length=k, unroll=unroll)

    sharded = jax.shard_map(steps, mesh=mesh, in_specs=(P(), P(None, DATA_AXIS)), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=(0,))


def batch_spec(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Batch:
    """Shapes, dtypes and shardings of one call's global batch: what the train step compiles for."""
    t, size = config.training, config.data.image_size
    k = t.steps_per_dispatch
    lead = (k,) if k > 1 else ()
    sharding = jax.sharding.NamedSharding(mesh, P(None, DATA_AXIS) if k > 1 else P(DATA_AXIS))
    spec = {"image": jax.ShapeDtypeStruct((*lead, t.batch_size, size, size, 3), jnp.uint8, sharding=sharding)}
    if config.model.num_classes > 0:
        spec["label"] = jax.ShapeDtypeStruct((*lead, t.batch_size), jnp.int32, sharding=sharding)
    return spec


def compile_train_step(step_fn: TrainStepFn, state: TrainState, batch: Batch) -> TrainStepFn:
    """Compiles the step ahead of its first call (for abstract or real inputs), logs the time, lines up all processes.

    Hosts finish compiling at different times (one may hit the compilation cache); CPU collectives give up if a peer
    is 30 s late to the first all-reduce, so no process runs the step before all have compiled it.
    """
    start = time.perf_counter()
    # The step's own XLA options (YNNPACK reductions on CPUs) go here, not on its jax.jit: a jit with compiler
    # options cannot be traced inside another one (make_jaxpr, a user's jit), and this is where the loop compiles.
    platform = jax.default_backend()
    options = xla_flags.train_step_compiler_options(platform)
    compiled = step_fn.lower(state, batch).compile(compiler_options=options or None)
    logging.info("traced and compiled the train step in %.1f s", time.perf_counter() - start)
    host_memory.release_freed_heap()
    if platform == "cpu":  # Each call allocates its temporaries as one block: kept, no step faults its pages in again.
        host_memory.keep_blocks_of(compiled.memory_analysis().temp_size_in_bytes)
    parallel.sync_processes("train step compiled")
    return compiled


# --------------------------------------------------------------------------------------------------------------------
# The loop and its periodic work.


def _restore_or_init(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
    ckpt: checkpointing.Checkpointer, abstract: TrainState,
) -> TrainState:
    restored = ckpt.restore_latest_intact(abstract, set_aside_damaged=True)
    if restored is None:
        logging.info("no checkpoint in %s: starting from scratch", ckpt.directory)
        state = train_state.init_train_state(config, model, tx, mesh)
    else:
        state, step = restored
        logging.info("resuming training from the checkpoint at step %d in %s", step, ckpt.directory)
    # Compiling the init left ~240 MiB of freed heap (tiny32) under the train step's compile, which sets the peak.
    host_memory.release_freed_heap()
    return state


def _compile_before_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
                          ckpt: checkpointing.Checkpointer, abstract: TrainState) -> TrainStepFn | None:
    """The train step compiled for the abstract state before any state exists; None if the newest checkpoint has
    nothing left to train. What restoring it would refuse is refused first, before minutes of compiling.

    Compiling beside the state put the compiler's peak on top of it: small64's train process peaked at 1,766 MiB
    that way and at 1,541 this way, once the step's own buffers had shrunk (README "Performance").
    """
    t = config.training
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            ckpt.check_compatible(latest, abstract.params)
        except CheckpointMismatchError:
            raise
        except Exception:  # Unreadable metadata: restore_latest_intact reports the damage and falls back.
            pass
        else:
            _check_resumable(ckpt, latest, t.steps_per_dispatch)
            if latest >= t.num_train_steps:
                return None
    return compile_train_step(make_train_step(config, model, mesh), abstract, batch_spec(config, mesh))


def _check_resumable(ckpt: checkpointing.Checkpointer, step: int, k: int) -> None:
    """Raises ConfigError (closing the checkpointer) when a checkpoint at `step` cannot resume k steps per call."""
    if step % k:
        ckpt.close()
        raise ConfigError(
            f"the checkpoint is at step {step}, not a multiple of training.steps_per_dispatch={k}; "
            f"set steps_per_dispatch to a divisor of {step} (1 always works) to resume")


def _due(step: int, every: int, last: int) -> bool:
    """Whether periodic work with interval `every` (0: never) runs after `step` of a run that ends at `last`."""
    return every > 0 and (step % every == 0 or step == last)


def _nonfinite_error(loss: float, step: int, last_saved: int | None) -> NonFiniteLossError:
    kept = f"the checkpoint at step {last_saved} is kept" if last_saved is not None else "nothing was saved"
    return NonFiniteLossError(
        f"the loss became {loss} by step {step}; {kept}. Lower optim.learning_rate, keep optim.grad_clip_norm > 0, "
        "or set training.skip_nonfinite_updates=True to skip such updates"
    )


def _log_window(
    config: ml_collections.ConfigDict, step: int, pending: list[dict[str, jax.Array]], clock: metric_writers.StepClock,
    writer: metric_writers.MetricWriter, last_saved: int | None,
) -> None:
    """Logs the mean of the scalars since the last log, and the throughput; a non-finite loss stops training."""
    t = config.training
    window = {name: np.concatenate([np.atleast_1d(parallel.fetch(s[name])) for s in pending])
              for name in pending[0]}  # One entry per step, whatever steps_per_dispatch is.
    summary = {name: float(np.mean(v)) for name, v in window.items()}
    if t.skip_nonfinite_updates:
        finite = np.isfinite(window["loss"])
        summary["loss"] = float(np.mean(window["loss"][finite])) if finite.any() else float("nan")
        summary["skipped_updates"] = float(np.sum(window["skipped_updates"]))
        if summary["skipped_updates"]:
            logging.warning("skipped %d non-finite updates in the last %d steps", summary["skipped_updates"],
                            len(window["loss"]))
    elif not np.isfinite(summary["loss"]):
        raise _nonfinite_error(summary["loss"], step, last_saved)
    summary["steps_per_sec"] = clock.steps_per_sec()
    summary["images_per_sec"] = summary["steps_per_sec"] * t.batch_size
    metric_writers.log_progress(step, t.num_train_steps, summary)
    writer.write_scalars(step, summary)


def _save(
    config: ml_collections.ConfigDict, ckpt: checkpointing.Checkpointer, step: int, state: TrainState,
    scalars: dict[str, jax.Array], last_saved: int | None,
) -> int:
    """Saves a checkpoint at `step` (asynchronously), unless this call's loss is not finite; returns the step."""
    loss = np.ravel(parallel.fetch(scalars["loss"]))  # The k losses of this call.
    if not config.training.skip_nonfinite_updates and not np.isfinite(loss).all():
        bad = int(np.argmin(np.isfinite(loss)))  # Never save a state that a non-finite step made.
        raise _nonfinite_error(float(loss[bad]), step - len(loss) + 1 + bad, last_saved)
    ckpt.save(step, state, config.to_dict())
    return step


def _grid_labels_and_count(config: ml_collections.ConfigDict) -> tuple[np.ndarray | None, int]:
    """The training grid's class labels (None if unconditional) and how many samples it holds."""
    labels = sampler.grid_labels(config)
    return labels, config.sampling.num_samples if labels is None else len(labels)


def _write_sample_grid(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, sample_fn: sampler.Sampler,
    state: TrainState, step: int, writer: metric_writers.MetricWriter, class_names: tuple[str, ...] | None,
) -> None:
    """Samples the EMA weights with the training grid's fixed noise and writes samples/step_<N>.png, .npz, strip."""
    labels, num = _grid_labels_and_count(config)
    samples, frames = sampler.generate(sample_fn, state.ema_params, rng.training_grid_key(config.seed), num,
                                       config.sampling.batch_size, mesh, labels=labels)
    if jax.process_index() == 0:
        paths = outputs.write_samples(os.path.join(workdir, "samples"), f"step_{step:07d}", samples, frames,
                                      labels=labels, class_names=class_names,
                                      guidance_scale=config.sampling.guidance_scale)
        writer.write_image(step, "samples",
                           outputs.make_grid(outputs.enlarge(samples), ncols=outputs.grid_columns(labels)))
        logging.info("step %d: wrote sample grid %s", step, paths["grid"])


def _write_run_files(workdir: str, config: ml_collections.ConfigDict, class_names: tuple[str, ...] | None) -> None:
    """config.json, and classes.json for class-conditional models (captions when sampling later); process 0."""
    if jax.process_index() == 0:
        fileio.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
        if class_names is not None:
            outputs.save_class_names(workdir, class_names)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the model of `config`, writing checkpoints, metrics and sample grids under workdir.

    SIGTERM or SIGINT saves a checkpoint at the end of the current step and returns; running again resumes.
    """
    workdir = fileio.resolve(workdir)
    mesh = parallel.make_mesh()
    config_checks.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    t = config.training
    k = t.steps_per_dispatch  # Steps per compiled call; config_checks made every interval a multiple of it.
    model, tx = unet.create_model(config), train_state.create_optimizer(config)
    abstract = train_state.abstract_train_state(config, model, tx, mesh)
    checkpointing.check_workdir(workdir, train_state.state_bytes(abstract))
    fid = fid_evaluator.FidEvaluator.from_config(config, mesh) if t.fid_every_steps else None  # Weights checked.
    source = data.source_from_config(config, process_index=jax.process_index(), process_count=jax.process_count())
    logging.info("dataset %s: %d images of %dx%d on this host", config.data.dataset, len(source),
                 config.data.image_size, config.data.image_size)
    class_names = data.check_class_labels(config, source)  # None for unconditional models

    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), keep=t.keep_checkpoints)
    step_fn = _compile_before_state(config, model, mesh, ckpt, abstract)
    state = _restore_or_init(config, model, tx, mesh, ckpt, abstract)
    start_step = int(parallel.fetch(state.step))
    _check_resumable(ckpt, start_step, k)  # A damaged newest checkpoint may have fallen back to an older one.
    last_saved = start_step if start_step > 0 else None
    logging.info("UNet with %.2f M parameters on %d devices (%s)",
                 sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, mesh.size, jax.devices()[0].platform)
    if start_step >= t.num_train_steps:
        ckpt.close()
        logging.info("the checkpoint is already at step %d >= training.num_train_steps: nothing to train", start_step)
        return state

    if step_fn is None:  # The newest checkpoint had nothing left to train but did not restore; an older one did.
        step_fn = compile_train_step(make_train_step(config, model, mesh), abstract, batch_spec(config, mesh))
    sample_fn = sampler.make_sampler(config, model, mesh)
    if t.sample_every_steps:
        # The grids' sampler compiled now, before any step's buffers are resident: the quickstart's peak RSS fell
        # from 938 to 755 MiB (its compile at the first grid came on top of them).
        labels, num = _grid_labels_and_count(config)
        sample_fn = sampler.precompile(sample_fn, state.ema_params,
                                       sampler.chunk_size(config.sampling.batch_size, num, mesh.size), labels)
        host_memory.release_freed_heap()
    writer = metric_writers.MetricWriter(os.path.join(workdir, "tensorboard"),
                                         os.path.join(workdir, metric_writers.SCALARS_FILE))
    _write_run_files(workdir, config, class_names)
    batches = data.train_batches(source, batch_size=t.batch_size // jax.process_count(), seed=config.seed,
                                 start_step=start_step, with_labels=config.model.num_classes > 0, steps_per_item=k,
                                 workers=config.data.num_workers)
    place = functools.partial(parallel.global_batch if k == 1 else parallel.global_stacked_batch, mesh)
    clock, pending = metric_writers.StepClock(), []
    try:
        with preemption.StopRequest() as stop:
            for step in range(start_step + k, t.num_train_steps + 1, k):  # `step`: the last step of this call.
                state, scalars = step_fn(state, jax.tree.map(place, next(batches)))
                pending.append(scalars)
                clock.count(k)
                if step == start_step + k:  # Leave the first call's warm-up out of the throughput figures.
                    jax.block_until_ready(state.step)
                    clock.restart()
                # Orbax's sync point is the largest count any host passed here, plus one: pass the call index, as
                # with k > 1 the step (a multiple of k) would never equal it.
                stopping = stop.requested or ckpt.reached_preemption(step // k)
                if _due(step, t.log_every_steps, t.num_train_steps):
                    _log_window(config, step, pending, clock, writer, last_saved)
                    pending = []
                    # What the window's checkpoint saves and grids freed goes back to the OS here: with the thresholds
                    # of keep_blocks_of nothing else hands it back (quickstart: peak RSS 791 -> 747 MiB).
                    host_memory.release_freed_heap()
                    clock.restart()
                if _due(step, t.checkpoint_every_steps, t.num_train_steps) or stopping:
                    last_saved = _save(config, ckpt, step, state, scalars, last_saved)
                if stopping:
                    ckpt.wait()
                    logging.warning("stopped at step %d by %s; checkpoint saved. Run the same command to resume",
                                    step, stop.signal_name or "a preemption notice")
                    break
                if _due(step, t.sample_every_steps, t.num_train_steps):
                    with clock.paused():
                        _write_sample_grid(config, workdir, mesh, sample_fn, state, step, writer, class_names)
                if fid is not None and _due(step, t.fid_every_steps, t.num_train_steps):
                    with clock.paused():
                        fid.evaluate_during_training(sample_fn, state.ema_params, step, workdir, writer)
    finally:
        batches.close()
        ckpt.close()
        writer.close()
    return state
