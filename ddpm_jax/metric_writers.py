"""Metric writing at the edge: TensorBoard events and a JSON-lines scalar log (process 0), a console line with ETA,
and the clock that measures training throughput with periodic work left out."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from ddpm_jax import fileio

SCALARS_FILE = "metrics.jsonl"


class _JsonLines:
    """Appends lines to a local file, flushing each; in a bucket, where objects cannot grow, rewrites it whole."""

    def __init__(self, path: str):
        """Opens a local file for appending, or reads what a bucket object already holds."""
        self._path, self._file, self._lines = path, None, []
        if fileio.is_remote(path):
            self._lines = fileio.read_text(path).splitlines(keepends=True) if fileio.exists(path) else []
            return
        self._file = open(path, "a")  # Appends: a resumed run continues the same file.
        if self._file.tell():
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write("\n")  # End a line a crash cut short, so the next record starts clean.

    def append(self, line: str) -> None:
        """Adds one line (with its newline) so that it is on storage when this returns."""
        if self._file:
            self._file.write(line)
            self._file.flush()  # Each line reaches disk (or Drive) before the next step: a crash keeps it.
        else:
            self._lines.append(line)
            fileio.write_text(self._path, "".join(self._lines))

    def close(self) -> None:
        """Closes the local file; a bucket object is already complete."""
        if self._file:
            self._file.close()
            self._file = None


class MetricWriter:
    """Writes scalars and images to TensorBoard files under `logdir` on process 0; a no-op on other processes.

    With `scalars_path`, each write_scalars call also appends one JSON object {"step": N, name: value, ...} there.
    """

    def __init__(self, logdir: str, scalars_path: str | None = None):
        """Opens the event file writer (tensorboardX, which needs no TensorFlow) and the JSON-lines file."""
        self._writer = None
        self._scalars_file = None
        if jax.process_index() == 0:
            if not fileio.is_remote(logdir):  # tensorboardX writes gs:// itself (google-cloud-storage, gcs extra).
                os.makedirs(logdir, exist_ok=True)
            self._writer = SummaryWriter(logdir)
            if scalars_path:
                self._scalars_file = _JsonLines(scalars_path)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Adds one value per name at `step`."""
        if self._writer:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), step)
        if self._scalars_file:
            record = {"step": int(step), **{name: float(value) for name, value in scalars.items()}}
            self._scalars_file.append(json.dumps(record) + "\n")

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Adds a uint8 (H,W,C) image at `step`."""
        if self._writer:
            self._writer.add_image(name, image, step, dataformats="HWC")

    def flush(self) -> None:
        """Pushes pending events to disk."""
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file and the JSON-lines file."""
        if self._writer:
            self._writer.close()
            self._writer = None
        if self._scalars_file:
            self._scalars_file.close()
            self._scalars_file = None


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (steps, values)} from the workdir's metrics.jsonl, as the latest run of each step wrote them.

    Records of one step (the loss, then an FID) are merged. A resumed run logs again from its checkpoint on: a step
    before one already read drops the records after it, so the result follows the run that the checkpoints continue,
    and its values replace the earlier run's at the same step. A torn last line is skipped.
    """
    path = os.path.join(workdir, SCALARS_FILE)
    if not fileio.exists(path):
        raise FileNotFoundError(f"no {SCALARS_FILE} in {workdir}: train first (it is written every log step)")
    records: list[dict[str, float]] = []
    for line in fileio.read_text(path).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # A line cut short by a crash or a lost connection.
            continue
        while records and records[-1]["step"] > record["step"]:
            records.pop()
        if records and records[-1]["step"] == record["step"]:
            records[-1].update(record)
        else:
            records.append(record)
    names = sorted({k for r in records for k in r} - {"step"})
    series = {}
    for name in names:
        points = [(r["step"], r[name]) for r in records if name in r]
        series[name] = (np.array([p[0] for p in points], np.int64), np.array([p[1] for p in points], np.float64))
    return series


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


class StepClock:
    """Training throughput since the last `restart`: steps counted, wall time with `paused()` stretches left out.

    Periodic work (sample grids, FID, checkpoints' host copies) runs inside `with clock.paused():`, so it never
    shows up as slower training, and the loop needs no manual resets of the window.
    """

    def __init__(self) -> None:
        """Starts the clock at zero steps."""
        self.restart()

    def restart(self) -> None:
        """Starts a new window: zero steps, zero time."""
        self._start, self._steps = time.perf_counter(), 0

    def count(self, steps: int) -> None:
        """Adds steps to the window."""
        self._steps += steps

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leaves the time spent inside the block out of the window."""
        stopped = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - stopped

    def steps_per_sec(self) -> float:
        """Steps per second of the window so far (0 before the first step)."""
        elapsed = time.perf_counter() - self._start
        return self._steps / elapsed if elapsed > 0 else 0.0
