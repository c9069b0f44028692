"""Training batches: a pure function of (seed, step, this host's data), built ahead by worker threads, as dicts.

The batch of step `s` holds positions s*B .. s*B+B-1 of an endless stream of seeded epoch permutations, so a
resumed run reproduces the data order from the step number alone. Each item is {"image": uint8 (B, S, S, 3)} plus
"label" (int32 (B,)) for class-conditional training.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ddpm_jax.data.source import ImageSource
from ddpm_jax.errors import DataError


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Example indices for `step`: positions step*B .. step*B+B-1 of an endless stream of seeded epoch permutations."""
    if step < 0 or batch_size < 1 or num_examples < 1 or seed < 0:
        raise ValueError(
            "batch_indices needs step >= 0, batch_size >= 1, num_examples >= 1 and seed >= 0, got "
            f"step={step}, batch_size={batch_size}, num_examples={num_examples}, seed={seed}"
        )
    positions = int(step) * int(batch_size) + np.arange(batch_size, dtype=np.int64)
    epochs = positions // num_examples
    offsets = positions % num_examples
    out = np.empty(batch_size, dtype=np.int64)
    # A batch touches one or two epochs (more only when batch_size > num_examples).
    for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
        mask = epochs == epoch
        out[mask] = _epoch_permutation(int(seed), epoch, int(num_examples))[offsets[mask]]
    return out


def train_batches(
    source: ImageSource, *, batch_size: int, seed: int, start_step: int, prefetch: int | None = None,
    with_labels: bool = False, steps_per_item: int = 1, workers: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's batches for steps start_step, start_step + 1, ... forever, built ahead by `workers` threads
    at most `prefetch` items ahead (default: 2 per thread).

    Each item is {"image": uint8 (B, S, S, 3)}, with "label" (int32 (B,), the same examples) when `with_labels` (the
    source must have labels). With steps_per_item = k > 1, each item holds k consecutive steps' batches stacked on a
    leading axis: (k, B, S, S, 3) and (k, B), for a train step that runs k steps per call.
    """
    prefetch = 2 * workers if prefetch is None else prefetch
    if batch_size < 1 or prefetch < 1 or start_step < 0 or steps_per_item < 1 or workers < 1:
        raise ValueError(
            "need batch_size >= 1, prefetch >= 1, start_step >= 0, steps_per_item >= 1, workers >= 1; got "
            f"{batch_size}, {prefetch}, {start_step}, {steps_per_item}, {workers}"
        )
    num_examples = len(source)
    if num_examples < 1:
        raise DataError("the data source is empty")
    if with_labels and getattr(source, "labels", None) is None:
        raise DataError("the data source has no class labels")

    def batch(step: int) -> dict[str, np.ndarray]:
        indices = batch_indices(step, batch_size, num_examples, seed)
        out = {"image": source.get_batch(indices)}
        if with_labels:
            out["label"] = source.get_labels(indices)
        return out

    def item(i: int) -> dict[str, np.ndarray]:
        first = start_step + i * steps_per_item
        if steps_per_item == 1:
            return batch(first)
        steps = [batch(first + j) for j in range(steps_per_item)]
        return {key: np.stack([b[key] for b in steps]) for key in steps[0]}

    return _prefetching(item, prefetch, workers)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of epoch `epoch`; cached because consecutive steps reuse the same one or two epochs."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False  # shared by the cache: nobody may modify it
    return perm


def _prefetching(make_item: Callable[[int], Any], prefetch: int, workers: int = 1) -> Iterator[Any]:
    """Yields make_item(0), make_item(1), ... in order, built ahead by `workers` threads, at most `prefetch` ahead.

    Item i depends on i alone, so the order of the items never depends on which thread built which.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ddpm_jax.train_batches")
    pending = collections.deque(pool.submit(make_item, i) for i in range(prefetch))
    try:
        for i in itertools.count(prefetch):
            item = pending.popleft().result()  # re-raises what building it raised
            pending.append(pool.submit(make_item, i))
            yield item
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)  # at most one item per thread is still being built
