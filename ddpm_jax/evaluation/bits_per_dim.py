"""The variational bound (bits per dimension) of a model on a held-out split, for `--mode=eval`.

Every image gets all T terms of the bound (the method of Ho et al. 2020): one compiled call evaluates a batch at
all T timesteps as a `lax.scan`, with the batch split over the devices. Noise comes from a fixed key folded with the
example's index and the timestep, so the numbers do not depend on the batch size or the device count.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import builders, data, metric_writers, parallel, pixels, rng, sampler
from ddpm_jax.diffusion import likelihood
from ddpm_jax.errors import DataError

NUM_BUCKETS = 10  # Timestep ranges of the per-bucket summary; the JSON also holds every t.
Evaluator = Callable[[Any, jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]


def make_evaluator(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh) -> Evaluator:
    """Compiled (params, uint8 images, example ids, weights) -> weighted sums over the batch of every bound term.

    The batch arrays are split over the 'data' axis; the sums come back replicated: "prior" (), "mse" (T,), one (T,)
    array per variance in likelihood.VARIANCES, and "count" () (the sum of the weights; padding has weight 0).
    """
    param = builders.create_parameterization(config, config.eval.clip_denoised)
    noise_key = rng.bound_noise_key(config.seed)

    @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
    def run(params: Any, images: jax.Array, ids: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
        x0 = pixels.to_model_range(images)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(noise_key, ids)
        terms = likelihood.bound_terms(sampler.sharded_denoiser(model, params, mesh), param, x0, keys)
        sums = {k: jnp.tensordot(v, weights, axes=([-1], [0])) for k, v in terms.items()}
        sums["count"] = jnp.sum(weights)
        return sums

    return run


def summarize(
    sums: dict[str, np.ndarray], num_dims: int, variance: str, num_buckets: int = NUM_BUCKETS
) -> dict[str, Any]:
    """Bits per dimension from the summed terms: the total, its parts, per-variance totals and per-bucket values."""
    count = float(sums["count"])

    def bpd(nats: Any) -> Any:
        return likelihood.bits_per_dim(np.asarray(nats, np.float64) / count, num_dims)

    prior = float(bpd(sums["prior"]))
    by_variance = {}
    for v in likelihood.VARIANCES:
        per_t = bpd(sums[v])
        by_variance[v] = {"bits_per_dim": prior + float(per_t.sum()), "decoder_bpd": float(per_t[0]),
                          "diffusion_bpd": float(per_t[1:].sum())}
    per_t = bpd(sums[variance])
    mse = np.asarray(sums["mse"], np.float64) / count
    num_timesteps = len(mse)
    edges = np.linspace(0, num_timesteps, num_buckets + 1).round().astype(int)
    buckets = [
        {"t_first": int(lo), "t_last": int(hi - 1), "mse": float(mse[lo:hi].mean()), "bpd": float(per_t[lo:hi].sum())}
        for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo
    ]
    return {
        "bits_per_dim": by_variance[variance]["bits_per_dim"],
        "prior_bpd": prior,
        "decoder_bpd": by_variance[variance]["decoder_bpd"],
        "diffusion_bpd": by_variance[variance]["diffusion_bpd"],
        "by_variance": by_variance,
        "buckets": buckets,
        "bpd_per_t": [float(x) for x in per_t],
        "mse_per_t": [float(x) for x in mse],
    }


def load_split(config: ml_collections.ConfigDict) -> data.ArraySource:
    """This host's share of the held-out split eval.split; a folder without it gets a message naming the options."""
    split = config.eval.split
    try:
        return data.source_from_config(config, split=split, process_index=jax.process_index(),
                                       process_count=jax.process_count())
    except DataError as e:
        if not str(e).startswith("data.split"):
            raise
        raise DataError(
            f"{e}. --mode=eval reads eval.split={split!r}: give the folder a {split}/ subfolder of held-out images, "
            f"or pass --config.eval.split=train to measure the bound on training images"
        ) from e


def _host_plan(num_local: int, num_examples: int, local_batch: int) -> tuple[int, int]:
    """(images this host evaluates, compiled calls every host makes) for eval.num_examples (0: the whole split)."""
    p, n = jax.process_index(), jax.process_count()
    # Host p holds the examples p, p + n, p + 2n, ... of the split (the data's host share).
    mine = num_local if num_examples == 0 else min(num_local, len(range(p, num_examples, n)))
    most = mine
    if n > 1:
        most = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
    return mine, max(1, -(-most // local_batch))




def evaluate_bound(
    config: ml_collections.ConfigDict, model: nn.Module, params: Any, mesh: jax.sharding.Mesh,
    source: data.ArraySource, step: int,
) -> dict[str, Any]:
    """All T terms of the bound for eval.num_examples images of this host's `source` (0: all), summed over hosts.

    Returns `summarize`'s dict plus "num_images", "seconds" and "compile_seconds". Logs progress and an ETA.
    """
    e = config.eval
    num_timesteps = config.diffusion.num_timesteps
    # The global batch is rounded up to a multiple of the device count (every host feeds an equal share); the last
    # batch is padded with weight-0 copies of an example.
    global_batch = parallel.round_up(e.batch_size, mesh.size)
    local_batch = global_batch // jax.process_count()
    mine, num_calls = _host_plan(len(source), e.num_examples, local_batch)
    if e.num_examples > 0 and mine < len(range(jax.process_index(), e.num_examples, jax.process_count())):
        logging.warning("eval: eval.num_examples=%d but split %s has fewer images; evaluating all of them",
                        e.num_examples, e.split)
    num_dims = config.data.image_size ** 2 * 3

    def batch(i: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Call i's images, example ids (for the noise) and weights, as global arrays split over the devices."""
        local = np.arange(i * local_batch, (i + 1) * local_batch)
        valid = local < mine
        local = np.where(valid, local, 0)  # Padding repeats example 0 with weight 0.
        ids = (local * jax.process_count() + jax.process_index()).astype(np.int32)
        return tuple(parallel.global_batch(mesh, a) for a in (source.get_batch(local), ids, valid.astype(np.float32)))

    start = time.perf_counter()
    compiled = make_evaluator(config, model, mesh).lower(params, *batch(0)).compile()
    compile_seconds = time.perf_counter() - start
    logging.info("eval: compiled the bound (%d timesteps per call) in %.1f s; %d calls of %d images for %d images "
                 "per host of split %s, EMA weights at step %d", num_timesteps, compile_seconds, num_calls,
                 global_batch, mine, e.split, step)
    totals: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    for i in range(num_calls):
        sums = {k: np.asarray(parallel.fetch(v), np.float64) for k, v in compiled(params, *batch(i)).items()}
        totals = sums if not totals else {k: totals[k] + sums[k] for k in totals}
        elapsed = time.perf_counter() - start
        done = int(totals["count"])
        so_far = summarize(totals, num_dims, e.variance)["bits_per_dim"] if done else float("nan")
        if jax.process_index() == 0:
            logging.info("eval: %d images | bits/dim so far %.4f | %.2f img/s (%.0f network passes/s) | ETA %s",
                         done, so_far, done / elapsed, done * num_timesteps / elapsed,
                         metric_writers.format_duration((num_calls - i - 1) * elapsed / (i + 1)))
    return {**summarize(totals, num_dims, e.variance), "num_images": int(totals["count"]),
            "seconds": round(time.perf_counter() - start, 1), "compile_seconds": round(compile_seconds, 1)}
