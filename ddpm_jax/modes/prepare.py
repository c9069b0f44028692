"""`--mode=prepare`: decodes data.dataset (split data.split) once into its cache of ArrayRecord shards.

Training, FID reference statistics and bits/dim then stream from the cache instead of decoding the source into memory.
Nothing is written to the workdir. A cache that is already complete is checked against the source and kept.
"""

from __future__ import annotations

import ml_collections

from ddpm_jax import data
from ddpm_jax.data import cache
from ddpm_jax.modes import common


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Prepares (or checks) the cache; returns {label: value} of its path, contents and preparation speed."""
    common.start(config, workdir)  # The config checked before anything is decoded.
    path, manifest, built = data.prepare_from_config(config)
    seconds = manifest["prepare_seconds"]
    speed = f"{seconds:.1f} s, {manifest['count'] / max(seconds, 1e-9):.0f} images/s"
    return {
        "cache": cache.summary(manifest, path),
        "skipped unreadable": str(manifest["skipped"]),
        "prepared": speed if built else f"earlier ({speed}); checked against the source and kept",
    }
