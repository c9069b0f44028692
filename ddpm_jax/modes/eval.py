"""`--mode=eval`: bits per dimension of the latest checkpoint's EMA weights on eval.split, to eval/ and TensorBoard."""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections
from absl import logging

from ddpm_jax import checkpointing, fileio, metric_writers
from ddpm_jax.evaluation import bits_per_dim
from ddpm_jax.modes import common

PARTS = ("bits_per_dim", "prior_bpd", "decoder_bpd", "diffusion_bpd")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Writes eval/bpd_step_<N>_<n>img.json and the TensorBoard scalars; returns {label: value} for the console."""
    workdir, mesh = common.start(config, workdir)
    e = config.eval
    source = bits_per_dim.load_split(config)
    model, ema_params, step = checkpointing.restore_ema_params(config, workdir, mesh)
    summary = bits_per_dim.evaluate_bound(config, model, ema_params, mesh, source, step)
    count = summary["num_images"]
    if not all(math.isfinite(summary[k]) for k in PARTS):
        logging.warning("eval: the bound is not finite (%s); the model may have diverged", summary["bits_per_dim"])
    size = config.data.image_size
    payload = {
        "step": step, "dataset": str(config.data.dataset), "split": e.split, "image_size": size,
        "num_dims": size * size * 3, "num_timesteps": config.diffusion.num_timesteps, "variance": e.variance,
        "clip_denoised": bool(e.clip_denoised), "prediction": config.diffusion.prediction, **summary,
    }
    # Named by what changes the numbers, so no run overwrites another's (FID files sit beside these: fid_step_*).
    clip = "" if e.clip_denoised else "_noclip"
    path = os.path.join(workdir, "eval", f"bpd_step_{step:07d}_{count}img{clip}.json")
    if jax.process_index() == 0:
        fileio.write_text(path, json.dumps(payload, indent=1))
        writer = metric_writers.MetricWriter(os.path.join(workdir, "tensorboard"))
        scalars = {f"eval/{k}": summary[k] for k in PARTS}
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
