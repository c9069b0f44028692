"""Metric writing at the edge: TensorBoard event files (process 0 only) and a console progress line with ETA."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging


class MetricWriter:
    """Writes scalars and images to TensorBoard files under `logdir` on process 0; a no-op on other processes."""

    def __init__(self, logdir: str):
        """Opens the event file writer (tensorboardX, which needs no TensorFlow)."""
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self._writer = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Adds one value per name at `step`."""
        if self._writer:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), step)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Adds a uint8 (H,W,C) image at `step`."""
        if self._writer:
            self._writer.add_image(name, image, step, dataformats="HWC")

    def flush(self) -> None:
        """Pushes pending events to disk."""
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        if self._writer:
            self._writer.close()
            self._writer = None


def format_duration(seconds: float) -> str:
    """Human-readable duration: 45s, 3m05s, 2h07m."""
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def progress_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
    """One console line: step, loss, grad norm, learning rate, throughput and the time left."""
    steps_per_s = scalars.get("steps_per_sec", 0.0)
    eta = format_duration((total - step) / steps_per_s) if steps_per_s > 0 else "?"
    return (
        f"step {step}/{total} ({100.0 * step / total:.1f}%) | loss {scalars['loss']:.4f} | "
        f"grad_norm {scalars['grad_norm']:.3f} | lr {scalars['learning_rate']:.2e} | "
        f"{steps_per_s:.2f} steps/s, {scalars.get('images_per_sec', 0.0):.1f} img/s | ETA {eta}"
    )


def log_progress(step: int, total: int, scalars: Mapping[str, float]) -> None:
    """Logs the progress line on process 0."""
    if jax.process_index() == 0:
        logging.info("%s", progress_line(step, total, scalars))
