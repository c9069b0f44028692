"""Sampling from trained weights: the compiled, device-sharded sampler and `--mode=sample` from a workdir."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpointing, conditioning, config_checks, fileio, images, parallel, sampling
from ddpm_jax import schedule as sch
from ddpm_jax.parallel import DATA_AXIS

Sampler = Callable[[Any, jax.Array, int], tuple[jax.Array, jax.Array]]


def make_sampler(
    config: ml_collections.ConfigDict, model: nn.Module, sched: sch.Schedule, mesh: jax.sharding.Mesh
) -> Sampler:
    """Compiled sampler (params, rng, batch[, labels]) -> (uint8 samples, uint8 frames), batch split over devices.

    labels (int32 (batch,), class-conditional models only) are sampled with sampling.guidance_scale; without them
    the model predicts with its null label, i.e. unconditionally.
    """
    s = config.sampling
    size = config.data.image_size
    batch_sharding = parallel.batch_sharded(mesh)
    frame_sharding = NamedSharding(mesh, P(None, DATA_AXIS))

    @functools.partial(jax.jit, static_argnums=(2,), out_shardings=(batch_sharding, frame_sharding))
    def run(params: Any, rng: jax.Array, batch: int, labels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        def denoise(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
            return model.apply({"params": params}, x, t, train=False)

        if labels is not None:
            denoise = conditioning.guided_denoise_fn(
                lambda x, t, c: model.apply({"params": params}, x, t, labels=c, train=False),
                jax.lax.with_sharding_constraint(labels, batch_sharding), model.num_classes, s.guidance_scale,
            )

        x, frames = sampling.sample(
            denoise, sched, rng, (batch, size, size, 3),
            method=s.method, num_steps=s.num_steps, eta=s.eta, prediction=config.diffusion.prediction,
            clip_denoised=s.clip_denoised, num_intermediates=s.num_intermediates,
            constrain=lambda v: jax.lax.with_sharding_constraint(v, batch_sharding),
        )
        return sampling.to_uint8(x), sampling.to_uint8(frames)

    return run


def generate(
    sampler: Sampler, params: Any, rng: jax.Array, num_samples: int, batch_size: int, num_devices: int,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples in chunks (a multiple of the device count); returns num_samples uint8 images and the frames.

    labels: the class of each sample (num_samples of them) for class-conditional models, or None.
    """
    # Only the first chunk's frames are kept: the denoising strip shows a few rows, and 50k frames would not fit.
    chunk = -(-min(batch_size, num_samples) // num_devices) * num_devices
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"got {len(labels)} labels for {num_samples} samples")
    outs, frames = [], None
    for i in range(-(-num_samples // chunk)):
        if labels is None:
            x, f = sampler(params, jax.random.fold_in(rng, i), chunk)
        else:  # The last chunk is padded with copies of its labels; the extra samples are dropped below.
            chunk_labels = np.resize(labels[i * chunk : (i + 1) * chunk], chunk)
            x, f = sampler(params, jax.random.fold_in(rng, i), chunk, chunk_labels)
        outs.append(parallel.fetch(x))
        if frames is None:
            frames = parallel.fetch(f)[:, :num_samples]
    return np.concatenate(outs)[:num_samples], frames


def write_samples(
    directory: str, name: str, samples: np.ndarray, frames: np.ndarray,
    labels: np.ndarray | None = None, class_names: tuple[str, ...] | None = None, guidance_scale: float = 0.0,
) -> dict[str, str]:
    """Writes the grid PNG, the uint8 .npz and (if frames were recorded) the denoising-strip PNG; returns paths.

    With the samples' class labels and names, a per-class grid has one row per class and `<name>_classes.json`
    captions it.
    """
    columns = conditioning.grid_columns(labels)
    paths = {
        "grid": images.save_png(os.path.join(directory, f"{name}.png"), images.make_grid(samples, ncols=columns)),
        "npz": images.save_npz(os.path.join(directory, f"{name}.npz"), samples),
    }
    if frames.shape[0]:
        paths["strip"] = images.save_png(os.path.join(directory, f"{name}_strip.png"), images.make_strip(frames))
    if labels is not None:
        paths["classes"] = conditioning.write_captions(
            os.path.join(directory, f"{name}_classes.json"), labels, class_names, guidance_scale, columns
        )
    return paths


def restore_ema_params(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
) -> tuple[nn.Module, Any, int]:
    """The model of `config` and the EMA parameters and step of the latest intact checkpoint in workdir."""
    from ddpm_jax import train  # Local import: train imports this module for its periodic sample grids.
    from ddpm_jax.models import unet

    ckpt_dir = os.path.join(fileio.resolve(workdir), "checkpoints")
    if not fileio.is_dir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}: train first with --mode=train --workdir={workdir}")
    ckpt = checkpointing.Checkpointer(ckpt_dir, keep=config.training.keep_checkpoints)
    model = unet.create_model(config)
    abstract = train.abstract_train_state(config, model, train.create_optimizer(config), mesh)
    try:
        restored = ckpt.restore_latest_intact(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(
            f"no intact checkpoint in {ckpt_dir}: train first with --mode=train --workdir={workdir}"
        )
    state, step = restored
    return model, state.ema_params, step


def sample_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Restores the EMA parameters of the latest checkpoint in workdir, samples, and writes the images.

    Returns {label: path} for the grid PNG, the uint8 .npz and (if frames were recorded) the denoising strip.
    """
    from ddpm_jax import train  # Local import: train imports this module for its periodic sample grids.

    workdir = fileio.resolve(workdir)
    mesh = parallel.make_mesh()
    config_checks.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    model, ema_params, step = restore_ema_params(config, workdir, mesh)

    s = config.sampling
    sampler = make_sampler(config, model, train.create_schedule(config), mesh)
    classes = conditioning.grid_labels(config)  # None for unconditional models
    samples, frames = generate(
        sampler, ema_params, jax.random.PRNGKey(config.seed + 2), s.num_samples if classes is None else len(classes),
        s.batch_size, mesh.size, labels=classes,
    )
    label = f"ddpm{config.diffusion.num_timesteps}" if s.method == "ddpm" else f"ddim{s.num_steps}_eta{s.eta:g}"
    if classes is not None:
        label += f"_w{s.guidance_scale:g}" + (f"_class{s.class_label}" if s.class_label >= 0 else "")
    paths: dict[str, str] = {}
    if jax.process_index() == 0:
        paths = write_samples(
            os.path.join(workdir, "samples"), f"step_{step:07d}_{label}", samples, frames, labels=classes,
            class_names=conditioning.load_class_names(config, workdir), guidance_scale=s.guidance_scale,
        )
        logging.info("wrote %d samples from the EMA weights at step %d: %s", len(samples), step, paths)
    labels = {"grid": "sample grid", "npz": "samples (uint8 N,H,W,3)", "strip": "denoising strip",
              "classes": "class captions"}
    return {labels[k]: v for k, v in paths.items()}
