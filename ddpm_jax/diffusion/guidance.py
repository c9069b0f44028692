"""Classifier-free guidance: label dropout in training, the guided network output in sampling.

A class-conditional UNet (model.num_classes = K > 0) has K + 1 label embeddings; label K is the null label. Training
replaces a `training.label_dropout` fraction of labels by the null label, so the one network learns both
eps(x, t, c) and the unconditional eps(x, t, null) (Ho & Salimans 2022). Sampling then guides with weight w:

    out_guided = (1 + w) * out(x, t, c) - w * out(x, t, null)

applied to the network output, whatever it predicts. For eps, x0 and v this is the same guidance: given x_t and t,
each of the three is an affine function of the others, and affine maps commute with weights that sum to 1, so
guiding x0 or v gives exactly the x0 or v of the guided eps (the optional x0 clipping then applies to the guided x0).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion.parameterization import DenoiseFn

LabelledFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t, labels) -> network output


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
    """A `denoise_fn(x, t)` for the samplers that guides `model_fn(x, t, labels)` towards `labels` with weight w.

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
