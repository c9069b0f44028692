"""Wall-clock timing shared by every benchmark process; standard library only, so the PyTorch peer can import it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def run_times(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds taken by each of `repeats` calls of fn (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_after_warmup(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of one call of fn: the median of `repeats` timed calls after one untimed warm-up call."""
    fn()
    return statistics.median(run_times(fn, repeats))
