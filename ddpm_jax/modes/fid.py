"""`--mode=fid`: FID and KID of eval.fid_num_samples samples from the EMA weights of the latest checkpoint."""

from __future__ import annotations

import os

import ml_collections

from ddpm_jax import checkpointing, metric_writers, sampler
from ddpm_jax.evaluation import fid, fid_evaluator
from ddpm_jax.modes import common


def run(config: ml_collections.ConfigDict, workdir: str,
        extractor: fid_evaluator.FeatureExtractor | None = None) -> dict[str, str]:
    """Scores, writes eval/fid_step_<N>_<sampler>_<count>.json and TensorBoard scalars; returns console lines.

    `extractor` replaces the Inception network (tests inject a small one).
    """
    workdir, mesh = common.start(config, workdir)
    # Missing weights fail here, before anything compiles.
    evaluator = fid_evaluator.FidEvaluator(config, extractor or fid_evaluator.load_extractor(config, mesh))
    model, ema_params, step = checkpointing.restore_ema_params(config, workdir, mesh)
    evaluator.reference()  # Data problems surface before the long sampling.
    record = evaluator.evaluate(sampler.make_sampler(config, model, mesh), ema_params, step,
                                config.eval.fid_num_samples, workdir)
    writer = metric_writers.MetricWriter(os.path.join(workdir, "tensorboard"))
    try:
        writer.write_scalars(step, fid_evaluator.tensorboard_scalars(record))
    finally:
        writer.close()
    n = fid.count_label(record["num_samples"])
    d = config.data
    return {
        f"FID@{n}": f"{record['fid']:.4f}",
        f"KID@{n}": f"{record['kid']:.5f} +- {record['kid_std']:.5f}",
        "samples": f"{record['num_samples']} from the EMA weights at step {step} ({record['sampler']})",
        "reference": f"{record['num_reference']} images of {d.dataset} ({d.split}, {d.image_size}x{d.image_size}), "
                     f"cached in {record['reference_cache']}",
        "scores": record["path"],
    }
