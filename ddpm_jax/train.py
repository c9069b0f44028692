"""Training: the TrainState, a pure train step, its data-parallel wrapper, and the train_and_evaluate loop."""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from ddpm_jax import (
    checkpointing,
    conditioning,
    config_checks,
    fid,
    fileio,
    generation,
    images,
    input_pipeline,
    losses,
    metrics,
    parallel,
    preemption,
)
from ddpm_jax import schedule as sch
from ddpm_jax.models import unet
from ddpm_jax.parallel import DATA_AXIS


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of global arrays, saved whole in checkpoints."""

    step: jnp.ndarray
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to the learning rate over optim.warmup_steps, then constant (as in DDPM)."""
    lr, warmup = config.optim.learning_rate, config.optim.warmup_steps

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        if warmup <= 0:
            return jnp.asarray(lr, jnp.float32)
        return lr * jnp.minimum(1.0, (step + 1) / warmup)

    return schedule


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping followed by Adam or AdamW on the warm-up schedule."""
    o = config.optim
    lr = learning_rate_schedule(config)
    if o.optimizer == "adam":
        opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.optimizer == "adamw":
        opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        raise ValueError(f"unknown optim.optimizer {o.optimizer!r}; accepted: adam, adamw")
    if o.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
    return opt


def create_schedule(config: ml_collections.ConfigDict) -> sch.Schedule:
    """The noise schedule named by config.diffusion."""
    d = config.diffusion
    return sch.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def _init_fn(config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation) -> Callable:
    size = config.data.image_size

    def init(rng: jax.Array) -> TrainState:
        x = jnp.zeros((1, size, size, 3), jnp.float32)
        params = model.init({"params": rng}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.array, params),
            opt_state=tx.init(params),
        )

    return init


def init_train_state(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
    """Initialises parameters, EMA and optimizer state from config.seed, replicated over the mesh."""
    init = _init_fn(config, model, tx)
    return jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(config.seed))


def abstract_train_state(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the train state, without computing it: a restore target."""
    shapes = jax.eval_shape(_init_fn(config, model, tx), jax.random.PRNGKey(0))
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def ema_decay_at(step: jnp.ndarray, decay: float) -> jnp.ndarray:
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)): early averages forget the random init fast."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(
    state: TrainState,
    batch: jnp.ndarray,
    *,
    model: nn.Module,
    sched: sch.Schedule,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    axis_name: str = DATA_AXIS,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimizer step on this device's share of the batch (uint8 images); gradients are averaged over devices.

    Randomness is a pure function of (seed, step, global example index) for noise, timesteps, flips and label
    dropout, so a step gives the same update on any number of devices; dropout keys also depend on the device index.
    For class-conditional models (model.num_classes > 0) the batch is (uint8 images, int32 labels).
    """
    device = jax.lax.axis_index(axis_name)
    labels = None
    if config.model.num_classes > 0:
        batch, labels = batch
    local_batch = batch.shape[0]
    step_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), state.step)
    example_ids = device * local_batch + jnp.arange(local_batch)
    example_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(step_rng, 0), example_ids)
    flip_keys, diffusion_keys = jnp.moveaxis(jax.vmap(jax.random.split)(example_keys), 1, 0)
    dropout_rng = jax.random.fold_in(jax.random.fold_in(step_rng, 1), device)

    x0 = batch.astype(jnp.float32) / 127.5 - 1.0
    if config.data.random_flip:
        flip = jax.vmap(jax.random.bernoulli)(flip_keys)
        x0 = jnp.where(flip[:, None, None, None], x0[:, :, ::-1, :], x0)
    noise, t = losses.sample_noise_and_timesteps(diffusion_keys, x0.shape[1:], sched.num_timesteps)
    if labels is not None:  # The null label for some examples: the unconditional model that guidance needs.
        labels = conditioning.drop_labels(jax.random.fold_in(step_rng, 2), example_ids, labels,
                                          config.training.label_dropout, config.model.num_classes)

    def loss_fn(params: Any) -> jnp.ndarray:
        def apply(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
            return model.apply({"params": params}, x, t, labels=labels, train=True, rngs={"dropout": dropout_rng})

        local_loss = losses.diffusion_loss(apply, sched, x0, t, noise, config.diffusion.prediction)
        # Every device holds the same number of examples, so the mean of per-device means is the global mean.
        return jax.lax.pmean(local_loss, axis_name)

    # The params are replicated (device-invariant) inputs of shard_map, so differentiating the all-reduced loss
    # makes autodiff insert the matching all-reduce of the per-device gradients: `grads` is the global-batch mean
    # gradient, identical on every device. (A further pmean of grads here would be a no-op; a psum would be wrong.)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree_utils.tree_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config.training.ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
    scalars = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate_schedule(config)(state.step)}
    if config.training.skip_nonfinite_updates:
        # Keep the old parameters, EMA and optimizer moments when this step's loss or gradients are not finite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        kept = state.replace(step=new_state.step)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
        scalars["skipped_updates"] = 1.0 - finite.astype(jnp.float32)
    return new_state, scalars


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    sched: sch.Schedule,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jnp.ndarray]]]:
    """The compiled data-parallel step: state replicated, batch split over the 'data' axis, state donated.

    With training.steps_per_dispatch = k > 1 one call runs k steps (a lax.scan carrying the state, unrolled on CPUs):
    the batch has a leading axis of k (parallel.global_stacked_batch), split over 'data' on axis 1, and each scalar
    comes back (k,).
    """
    step = functools.partial(train_step, model=model, sched=sched, tx=tx, config=config)
    k = config.training.steps_per_dispatch
    if k == 1:
        sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
        return jax.jit(sharded, donate_argnums=(0,))

    # XLA:CPU rewrites convolutions into the layout its fast kernels take only in the entry computation, so the
    # gradient convolutions of a step inside a while loop fall back to a naive loop (15x slower, measured): on CPUs
    # the k steps are unrolled, so compile time grows with k (tiny32: 25 s at k=1, 60 s at k=4). Accelerators loop.
    unroll = all(d.platform == "cpu" for d in mesh.devices.flat)

    def steps(state: TrainState, stacked: Any) -> tuple[TrainState, dict[str, jnp.ndarray]]:
        return jax.lax.scan(step, state, stacked, length=k, unroll=unroll)

    sharded = jax.shard_map(steps, mesh=mesh, in_specs=(P(), P(None, DATA_AXIS)), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=(0,))


def release_freed_heap() -> bool:
    """Hands the C heap's free pages back to the OS (glibc's malloc_trim); True if it ran.

    XLA's compiler frees most of what it allocates, but glibc keeps those pages: after compiling tiny32's train step
    the process held about 480 MiB it no longer used, on top of which the step's own buffers then raised the peak.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to trim this way.
        return False


def compile_train_step(step_fn: Callable, state: TrainState, batch: jax.Array) -> Callable:
    """Compiles the step ahead of its first call, logs how long that took, then lines up all processes.

    Hosts finish compiling at different times (one may hit the compilation cache); CPU collectives give up if a peer
    is 30 s late to the first all-reduce, so no process runs the step before all have compiled it.
    """
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    logging.info("traced and compiled the train step in %.1f s", time.perf_counter() - start)
    release_freed_heap()
    parallel.sync_processes("train step compiled")
    return compiled


def _resume_or_init(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh, ckpt: checkpointing.Checkpointer, abstract: TrainState,
) -> TrainState:
    restored = ckpt.restore_latest_intact(abstract, set_aside_damaged=True)
    if restored is None:
        logging.info("no checkpoint in %s: starting from scratch", ckpt.directory)
        return init_train_state(config, model, tx, mesh)
    state, step = restored
    logging.info("resuming training from the checkpoint at step %d in %s", step, ckpt.directory)
    return state


def _state_bytes(state: TrainState) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _raise_nonfinite(loss: float, step: int, last_saved: int | None) -> None:
    kept = f"the checkpoint at step {last_saved} is kept" if last_saved is not None else "nothing was saved"
    raise FloatingPointError(
        f"the loss became {loss} by step {step}; {kept}. Lower optim.learning_rate, keep optim.grad_clip_norm > 0, "
        "or set training.skip_nonfinite_updates=True to skip such updates"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the model of `config`, writing checkpoints, metrics and sample grids under workdir.

    SIGTERM or SIGINT saves a checkpoint at the end of the current step and returns; running again resumes.
    """
    workdir = fileio.resolve(workdir)
    mesh = parallel.make_mesh()
    config_checks.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    t = config.training
    model = unet.create_model(config)
    tx = create_optimizer(config)
    abstract = abstract_train_state(config, model, tx, mesh)
    checkpointing.check_workdir(workdir, _state_bytes(abstract))
    source = input_pipeline.create_source(
        config.data.dataset, config.data.image_size, split=config.data.split,
        tfds_data_dir=config.data.tfds_data_dir or None,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    logging.info("dataset %s: %d images of %dx%d on this host", config.data.dataset, len(source),
                 config.data.image_size, config.data.image_size)
    class_names = conditioning.dataset_class_names(config, source)  # None for unconditional models
    grid_labels = conditioning.grid_labels(config)

    sched = create_schedule(config)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
    state = _resume_or_init(config, model, tx, mesh, ckpt, abstract)
    start_step = int(parallel.fetch(state.step))
    k = t.steps_per_dispatch  # Steps per compiled call; config_checks made every interval a multiple of it.
    if start_step % k:
        ckpt.close()
        raise config_checks.ConfigError(
            f"the checkpoint is at step {start_step}, not a multiple of training.steps_per_dispatch={k}; "
            f"set steps_per_dispatch to a divisor of {start_step} (1 always works) to resume")
    last_saved = start_step if start_step > 0 else None
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("UNet with %.2f M parameters on %d devices (%s)", num_params / 1e6, mesh.size,
                 jax.devices()[0].platform)

    train_step_fn = make_train_step(config, model, sched, tx, mesh)
    compiled_step = None
    sampler = generation.make_sampler(config, model, sched, mesh)
    writer = metrics.MetricWriter(os.path.join(workdir, "tensorboard"), os.path.join(workdir, metrics.SCALARS_FILE))
    if jax.process_index() == 0:
        fileio.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
        if class_names is not None:
            conditioning.save_class_names(workdir, class_names)

    batches = input_pipeline.train_batches(
        source, batch_size=t.batch_size // jax.process_count(), seed=config.seed, start_step=start_step,
        with_labels=config.model.num_classes > 0,
    )
    pending: list[dict[str, jax.Array]] = []
    window_start, window_steps = time.perf_counter(), 0
    try:
        with preemption.StopRequest() as stop:
            for step in range(start_step + k, t.num_train_steps + 1, k):  # `step`: the last step of this call.
                if k == 1:  # images[, labels]
                    batch = jax.tree.map(functools.partial(parallel.global_batch, mesh), next(batches))
                else:  # k consecutive batches stacked on a leading axis, each leaf (k, local batch, ...).
                    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[next(batches) for _ in range(k)])
                    batch = jax.tree.map(functools.partial(parallel.global_stacked_batch, mesh), stacked)
                if compiled_step is None:
                    compiled_step = compile_train_step(train_step_fn, state, batch)
                state, scalars = compiled_step(state, batch)  # With k > 1 each scalar is (k,), one per step.
                pending.append(scalars)
                window_steps += k
                if step == start_step + k:  # Leave compilation out of the throughput figures.
                    jax.block_until_ready(state.step)
                    window_start, window_steps = time.perf_counter(), 0
                # Orbax's sync point is the largest count any host passed here, plus one: pass the call index, as
                # with k > 1 the step (a multiple of k) would never equal it.
                stopping = stop.requested or ckpt.reached_preemption(step // k)
                if step % t.log_every_steps == 0 or step == t.num_train_steps:
                    window = {name: np.concatenate([np.atleast_1d(parallel.fetch(s[name])) for s in pending])
                              for name in pending[0]}  # One entry per step, whatever k is.
                    summary = {name: float(np.mean(v)) for name, v in window.items()}
                    if t.skip_nonfinite_updates:
                        finite = np.isfinite(window["loss"])
                        summary["loss"] = float(np.mean(window["loss"][finite])) if finite.any() else float("nan")
                        summary["skipped_updates"] = float(np.sum(window["skipped_updates"]))
                        if summary["skipped_updates"]:
                            logging.warning("skipped %d non-finite updates in the last %d steps",
                                            summary["skipped_updates"], len(window["loss"]))
                    elif not np.isfinite(summary["loss"]):
                        _raise_nonfinite(summary["loss"], step, last_saved)
                    elapsed = time.perf_counter() - window_start
                    summary["steps_per_sec"] = window_steps / elapsed
                    summary["images_per_sec"] = window_steps * t.batch_size / elapsed
                    metrics.log_progress(step, t.num_train_steps, summary)
                    writer.write_scalars(step, summary)
                    pending, window_start, window_steps = [], time.perf_counter(), 0
                if step % t.checkpoint_every_steps == 0 or step == t.num_train_steps or stopping:
                    loss = np.ravel(parallel.fetch(scalars["loss"]))  # The k losses of this call.
                    if not t.skip_nonfinite_updates and not np.isfinite(loss).all():
                        bad = int(np.argmin(np.isfinite(loss)))  # Never save a state that a non-finite step made.
                        _raise_nonfinite(float(loss[bad]), step - len(loss) + 1 + bad, last_saved)
                    ckpt.save(step, state, config.to_dict())
                    last_saved = step
                if stopping:
                    ckpt.wait()
                    logging.warning("stopped at step %d by %s; checkpoint saved. Run the same command to resume",
                                    step, stop.signal_name or "a preemption notice")
                    break
                if t.sample_every_steps and (step % t.sample_every_steps == 0 or step == t.num_train_steps):
                    samples, frames = generation.generate(
                        sampler, state.ema_params, jax.random.PRNGKey(config.seed + 1),
                        config.sampling.num_samples if grid_labels is None else len(grid_labels),
                        config.sampling.batch_size, mesh.size, labels=grid_labels,
                    )
                    if jax.process_index() == 0:
                        paths = generation.write_samples(
                            os.path.join(workdir, "samples"), f"step_{step:07d}", samples, frames,
                            labels=grid_labels, class_names=class_names, guidance_scale=config.sampling.guidance_scale,
                        )
                        writer.write_image(step, "samples",
                                           images.make_grid(samples, ncols=conditioning.grid_columns(grid_labels)))
                        logging.info("step %d: wrote sample grid %s", step, paths["grid"])
                    window_start, window_steps = time.perf_counter(), 0  # Sampling is not training time.
                if t.fid_every_steps and (step % t.fid_every_steps == 0 or step == t.num_train_steps):
                    fid.evaluate_during_training(config, workdir, mesh, sampler, state.ema_params, step, writer)
                    window_start, window_steps = time.perf_counter(), 0  # FID is not training time either.
    finally:
        batches.close()
        ckpt.close()
        writer.close()
    if start_step >= t.num_train_steps:
        logging.info("the checkpoint is already at step %d >= training.num_train_steps: nothing to train", start_step)
    return state


def train_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """`--mode=train`: trains or resumes, and returns {label: value} for the console."""
    train_and_evaluate(config, workdir)
    return {"checkpoints": os.path.join(fileio.resolve(workdir), "checkpoints")}
