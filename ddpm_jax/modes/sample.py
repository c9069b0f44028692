"""`--mode=sample`: samples from the EMA weights of the latest checkpoint and writes the grid, .npz and strip."""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from ddpm_jax import checkpointing, outputs, rng, sampler
from ddpm_jax.modes import common

LABELS = {"grid": "sample grid", "npz": "samples (uint8 N,H,W,3)", "strip": "denoising strip",
          "classes": "class captions"}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Samples and writes; returns {label: path} of the grid, the uint8 .npz, the strip and the class captions.

    The strip is written when sampling.num_intermediates > 0, the captions for class-conditional models.
    """
    workdir, mesh = common.start(config, workdir)
    model, ema_params, step = checkpointing.restore_ema_params(config, workdir, mesh)
    s = config.sampling
    classes = sampler.grid_labels(config)  # None for unconditional models
    samples, frames = sampler.generate(
        sampler.make_sampler(config, model, mesh), ema_params, rng.sample_mode_key(config.seed),
        s.num_samples if classes is None else len(classes), s.batch_size, mesh, labels=classes,
    )
    label = outputs.sampler_label(config) + (f"_class{s.class_label}" if classes is not None and s.class_label >= 0
                                             else "")
    paths: dict[str, str] = {}
    if jax.process_index() == 0:
        paths = outputs.write_samples(
            os.path.join(workdir, "samples"), f"step_{step:07d}_{label}", samples, frames, labels=classes,
            class_names=outputs.load_class_names(config, workdir), guidance_scale=s.guidance_scale,
        )
        logging.info("wrote %d samples from the EMA weights at step %d: %s", len(samples), step, paths)
    return {LABELS[k]: v for k, v in paths.items()}
