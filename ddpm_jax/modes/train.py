"""`--mode=train`: train, or resume from the latest checkpoint in the workdir."""

from __future__ import annotations

import ml_collections

from ddpm_jax import checkpointing, train


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Trains or resumes (train.train_and_evaluate checks the config itself); returns where the checkpoints are."""
    train.train_and_evaluate(config, workdir)
    return {"checkpoints": checkpointing.checkpoint_dir(workdir)}
