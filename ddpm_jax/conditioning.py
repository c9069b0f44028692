"""Class conditioning: label dropout in training, classifier-free guidance in sampling, and class names for grids.

A class-conditional UNet (model.num_classes = K > 0) has K + 1 label embeddings; label K is the null label. Training
replaces a `training.label_dropout` fraction of labels by the null label, so the one network learns both
eps(x, t, c) and the unconditional eps(x, t, null) (Ho & Salimans 2022). Sampling then guides with weight w:

    out_guided = (1 + w) * out(x, t, c) - w * out(x, t, null)

applied to the network output, whatever it predicts. For eps, x0 and v this is the same guidance: given x_t and t,
each of the three is an affine function of the others, and affine maps commute with weights that sum to 1, so
guiding x0 or v gives exactly the x0 or v of the guided eps (the optional x0 clipping then applies to the guided x0).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import config_checks, fileio, input_pipeline
from ddpm_jax.sampling import DenoiseFn

CLASSES_FILE = "classes.json"  # Written into the workdir at training time: captions for --mode=sample.
LabelledFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def drop_labels(
    rng: jax.Array, example_ids: jnp.ndarray, labels: jnp.ndarray, rate: float, null_label: int
) -> jnp.ndarray:
    """Replaces each label by `null_label` with probability `rate`, keyed by the global example index.

    The draw for an example depends only on (rng, its index in the global batch), like its noise, timestep and flip,
    so the dropped labels are the same on any number of devices and after a resume.
    """
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, example_ids)
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, rate))(keys)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def guide(cond: jnp.ndarray, uncond: jnp.ndarray, scale: float) -> jnp.ndarray:
    """Classifier-free guidance: (1 + w) * cond - w * uncond."""
    return (1.0 + scale) * cond - scale * uncond


def guided_denoise_fn(model_fn: LabelledFn, labels: jnp.ndarray, null_label: int, scale: float) -> DenoiseFn:
    """A `denoise_fn(x, t)` for `sampling.sample` that guides `model_fn(x, t, labels)` towards `labels` with weight w.

    w = 0 is one conditional call. Otherwise the conditional and the unconditional outputs come from one call on a
    batch of 2B, each example next to its null-label twin so that a batch split over devices stays local.
    """
    if scale == 0:
        return lambda x, t: model_fn(x, t, labels)

    def denoise(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        def twice(a: jnp.ndarray) -> jnp.ndarray:
            return jnp.repeat(a, 2, axis=0)  # (B, ...) -> (2B, ...): [a0, a0, a1, a1, ...]

        both_labels = jnp.stack([labels, jnp.full_like(labels, null_label)], axis=1).reshape(-1)
        out = model_fn(twice(x), twice(t), both_labels)
        out = out.reshape(x.shape[0], 2, *out.shape[1:])
        return guide(out[:, 0], out[:, 1], scale)

    return denoise


def grid_labels(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """The class of each sample to draw: None if unconditional; one class repeated, or each class in turn.

    With sampling.class_label = -1 every class gets ceil(num_samples / K) samples, one grid row per class.
    """
    k, s = config.model.num_classes, config.sampling
    if k == 0:
        return None
    if s.class_label >= 0:
        return np.full(s.num_samples, s.class_label, np.int32)
    return np.repeat(np.arange(k, dtype=np.int32), math.ceil(s.num_samples / k))


def grid_columns(labels: np.ndarray | None) -> int | None:
    """Columns of the sample grid: one row per class for a per-class grid, else None (the default layout)."""
    if labels is None or len(np.unique(labels)) < 2:
        return None
    return len(labels) // len(np.unique(labels))


def dataset_class_names(config: ml_collections.ConfigDict, source: Any) -> tuple[str, ...] | None:
    """Checks model.num_classes against the dataset's labels; returns the class names (None when unconditional).

    Raises DataError when a class-conditional model meets data without labels, and ConfigError when the counts
    differ, naming the classes found. Called after loading the data and before anything is compiled.
    """
    k = config.model.num_classes
    if k == 0:
        return None
    found = getattr(source, "class_names", None)
    if found is None or getattr(source, "labels", None) is None:
        raise input_pipeline.DataError(
            f"model.num_classes={k} needs class labels, but data.dataset={config.data.dataset} has none. Labels come "
            "from the sub-folder names of an image folder (all images in first-level sub-folders, one per class), "
            "IDX label files, a TFDS 'label' feature or a parquet 'label' column; or set model.num_classes=0"
        )
    if len(found) != k:
        shown = ", ".join(found[:12]) + (f", ... ({len(found) - 12} more)" if len(found) > 12 else "")
        raise config_checks.ConfigError(
            f"model.num_classes={k} but data.dataset={config.data.dataset} has {len(found)} classes ({shown}); "
            f"set --config.model.num_classes={len(found)}"
        )
    names = tuple(config.data.class_names)
    return names if names else tuple(found)


def save_class_names(workdir: str, class_names: Sequence[str]) -> str:
    """Writes the class names into workdir/classes.json, for captions when sampling later; returns the path."""
    text = json.dumps({"class_names": list(class_names)}, indent=2)
    return fileio.write_text(os.path.join(workdir, CLASSES_FILE), text)


def load_class_names(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, ...]:
    """Class names for captions: data.class_names, else those saved at training time, else the class numbers."""
    k = config.model.num_classes
    if config.data.class_names:
        return tuple(config.data.class_names)
    path = os.path.join(workdir, CLASSES_FILE)
    if fileio.exists(path):
        names = tuple(json.loads(fileio.read_text(path)).get("class_names", ()))
        if len(names) == k:
            return names
        logging.warning("%s lists %d classes but model.num_classes=%d: captions use class numbers", path, len(names), k)
    return tuple(str(c) for c in range(k))


def write_captions(
    path: str, labels: np.ndarray, class_names: Sequence[str], guidance_scale: float, columns: int | None
) -> str:
    """Writes a JSON caption beside a sample grid and logs it: each row's class (per-class grids), every label, w."""
    labels = np.asarray(labels)
    caption: dict[str, Any] = {"guidance_scale": float(guidance_scale), "class_names": list(class_names)}
    if columns:
        caption["rows"] = [class_names[int(c)] for c in labels[::columns]]
        for r, name in enumerate(caption["rows"]):
            logging.info("grid row %d: %s", r, name)
    else:
        caption["classes"] = [class_names[int(c)] for c in np.unique(labels)]
        logging.info("grid of class %s", ", ".join(caption["classes"]))
    caption["labels"] = labels.tolist()
    return fileio.write_text(path, json.dumps(caption, indent=1))
