"""`--mode=eval`: the variational bound (bits per dimension) of the EMA weights on a held-out split.

Every image gets all T terms of the bound (the method of Ho et al. 2020): one compiled call evaluates a batch at
all T timesteps as a `lax.scan`, with the batch split over the devices. Noise comes from a fixed key folded with the
example's index and the timestep, so the numbers do not depend on the batch size or the device count.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import config_checks, fileio, generation, input_pipeline, likelihood, metrics, parallel, train
from ddpm_jax import schedule as sch

NUM_BUCKETS = 10  # Timestep ranges of the per-bucket summary; the JSON also holds every t.
Evaluator = Callable[[Any, jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]


def make_evaluator(
    config: ml_collections.ConfigDict, model: nn.Module, sched: sch.Schedule, mesh: jax.sharding.Mesh
) -> Evaluator:
    """Compiled (params, uint8 images, example ids, weights) -> weighted sums over the batch of every bound term.

    The batch arrays are split over the 'data' axis; the sums come back replicated: "prior" (), "mse" (T,), one (T,)
    array per variance in likelihood.VARIANCES, and "count" () (the sum of the weights; padding has weight 0).
    """
    batch_sharding = parallel.batch_sharded(mesh)
    replicated = parallel.replicated(mesh)
    noise_key = jax.random.PRNGKey(config.seed + 3)  # seed+1: training grids, seed+2: --mode=sample.

    @functools.partial(jax.jit, out_shardings=replicated)
    def run(params: Any, images: jax.Array, ids: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
        def denoise(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
            return model.apply({"params": params}, x, t, train=False)

        x0 = images.astype(jnp.float32) / 127.5 - 1.0
        keys = jax.vmap(jax.random.fold_in, (None, 0))(noise_key, ids)
        terms = likelihood.bound_terms(
            denoise, sched, x0, keys, prediction=config.diffusion.prediction, clip_denoised=config.eval.clip_denoised,
            constrain=lambda v: jax.lax.with_sharding_constraint(v, batch_sharding),
        )
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


def _load_split(config: ml_collections.ConfigDict) -> input_pipeline.ImageSource:
    """This host's share of the held-out split eval.split; a folder without it gets a message naming the options."""
    split = config.eval.split
    try:
        return input_pipeline.create_source(
            config.data.dataset, config.data.image_size, split=split, tfds_data_dir=config.data.tfds_data_dir or None,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
    except input_pipeline.DataError as e:
        if not str(e).startswith("data.split"):
            raise
        raise input_pipeline.DataError(
            f"{e}. --mode=eval reads eval.split={split!r}: give the folder a {split}/ subfolder of held-out images, "
            f"or pass --config.eval.split=train to measure the bound on training images"
        ) from e


def _host_plan(num_local: int, num_examples: int, local_batch: int) -> tuple[int, int]:
    """(images this host evaluates, compiled calls every host makes) for eval.num_examples (0: the whole split)."""
    p, n = jax.process_index(), jax.process_count()
    # Host p holds the examples p, p + n, p + 2n, ... of the split (input_pipeline's host share).
    mine = num_local if num_examples == 0 else min(num_local, len(range(p, num_examples, n)))
    most = mine
    if n > 1:
        from jax.experimental import multihost_utils

        most = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
    return mine, max(1, -(-most // local_batch))


def evaluate_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Bits per dimension of the latest checkpoint's EMA weights on eval.split; writes eval/bpd_step_<N>_<n>img.json.

    Also writes the scalars to TensorBoard at the checkpoint's step, and returns {label: value} for the console.
    """
    workdir = fileio.resolve(workdir)  # A local folder or a gs:// URL.
    mesh = parallel.make_mesh()
    config_checks.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    e = config.eval
    source = _load_split(config)
    model, ema_params, step = generation.restore_ema_params(config, workdir, mesh)
    sched = train.create_schedule(config)

    # The global batch is rounded up to a multiple of the device count (every host feeds an equal share); the last
    # batch is padded with weight-0 copies of an example.
    global_batch = -(-e.batch_size // mesh.size) * mesh.size
    local_batch = global_batch // jax.process_count()
    mine, num_calls = _host_plan(len(source), e.num_examples, local_batch)
    if e.num_examples > 0 and mine < len(range(jax.process_index(), e.num_examples, jax.process_count())):
        logging.warning("eval: eval.num_examples=%d but split %s has fewer images; evaluating all of them",
                        e.num_examples, e.split)
    evaluator = make_evaluator(config, model, sched, mesh)
    size = config.data.image_size
    num_dims = size * size * 3

    def batch(i: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Call i's images, example ids (for the noise) and weights, as global arrays split over the devices."""
        local = np.arange(i * local_batch, (i + 1) * local_batch)
        valid = local < mine
        local = np.where(valid, local, 0)  # Padding repeats example 0 with weight 0.
        ids = (local * jax.process_count() + jax.process_index()).astype(np.int32)
        return tuple(parallel.global_batch(mesh, a) for a in (source.get_batch(local), ids, valid.astype(np.float32)))

    start = time.perf_counter()
    compiled = evaluator.lower(ema_params, *batch(0)).compile()
    compile_seconds = time.perf_counter() - start
    logging.info("eval: compiled the bound (%d timesteps per call) in %.1f s; %d calls of %d images for %d images "
                 "per host of split %s, EMA weights at step %d", sched.num_timesteps, compile_seconds, num_calls,
                 global_batch, mine, e.split, step)
    totals: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    for i in range(num_calls):
        sums = {k: np.asarray(parallel.fetch(v), np.float64) for k, v in compiled(ema_params, *batch(i)).items()}
        totals = sums if not totals else {k: totals[k] + sums[k] for k in totals}
        elapsed = time.perf_counter() - start
        done = int(totals["count"])
        so_far = summarize(totals, num_dims, e.variance)["bits_per_dim"] if done else float("nan")
        if jax.process_index() == 0:
            logging.info("eval: %d images | bits/dim so far %.4f | %.2f img/s (%.0f network passes/s) | ETA %s",
                         done, so_far, done / elapsed, done * sched.num_timesteps / elapsed,
                         metrics.format_duration((num_calls - i - 1) * elapsed / (i + 1)))

    count = int(totals["count"])
    summary = summarize(totals, num_dims, e.variance)
    if not all(math.isfinite(summary[k]) for k in ("bits_per_dim", "prior_bpd", "decoder_bpd", "diffusion_bpd")):
        logging.warning("eval: the bound is not finite (%s); the model may have diverged", summary["bits_per_dim"])
    payload = {
        "step": step, "num_images": count, "dataset": str(config.data.dataset), "split": e.split,
        "image_size": size, "num_dims": num_dims, "num_timesteps": sched.num_timesteps,
        "variance": e.variance, "clip_denoised": bool(e.clip_denoised), "prediction": config.diffusion.prediction,
        "seconds": round(time.perf_counter() - start, 1), "compile_seconds": round(compile_seconds, 1), **summary,
    }
    # Named by what changes the numbers, so no run overwrites another's (FID files sit beside these: fid_step_*).
    clip = "" if e.clip_denoised else "_noclip"
    path = os.path.join(workdir, "eval", f"bpd_step_{step:07d}_{count}img{clip}.json")
    if jax.process_index() == 0:
        fileio.write_text(path, json.dumps(payload, indent=1))
        writer = metrics.MetricWriter(os.path.join(workdir, "tensorboard"))
        scalars = {f"eval/{k}": summary[k] for k in ("bits_per_dim", "prior_bpd", "decoder_bpd", "diffusion_bpd")}
        scalars |= {f"eval/mse_t{b['t_first']:04d}-{b['t_last']:04d}": b["mse"] for b in summary["buckets"]}
        writer.write_scalars(step, scalars)
        writer.close()
        logging.info("eval: wrote %s", path)
    return {
        "bits/dim": f"{summary['bits_per_dim']:.4f} ({count} images of split {e.split!r}, step {step}, "
                    f"{e.variance} variance)",
        "prior / decoder / L_1..L_T-1 (bits/dim)": f"{summary['prior_bpd']:.4f} / {summary['decoder_bpd']:.4f} / "
                                                   f"{summary['diffusion_bpd']:.4f}",
        "bits/dim by variance": ", ".join(f"{v} {r['bits_per_dim']:.4f}" for v, r in summary["by_variance"].items()),
        "eval results": path,
    }
