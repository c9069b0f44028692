"""Training batches: a pure function of (seed, step), epochs reshuffled, dicts with labels, a prefetch thread."""

import threading
import time

import numpy as np
import pytest

from ddpm_jax import data


def test_batch_indices_epochs_and_determinism() -> None:
    n, b, seed = 12, 4, 7
    epoch0 = np.concatenate([data.batch_indices(s, b, n, seed) for s in range(3)])
    epoch1 = np.concatenate([data.batch_indices(s, b, n, seed) for s in range(3, 6)])
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
    assert not np.array_equal(epoch0, np.arange(n))
    # The documented formula, so the data order is stable across versions of this code.
    assert np.array_equal(epoch0, np.random.default_rng([seed, 0]).permutation(n))
    assert np.array_equal(epoch1, np.random.default_rng([seed, 1]).permutation(n))

    assert np.array_equal(data.batch_indices(5, b, n, seed), data.batch_indices(5, b, n, seed))
    assert np.array_equal(data.batch_indices(1000, 8, 100, 3), data.batch_indices(1000, 8, 100, 3))
    assert not np.array_equal(data.batch_indices(0, 64, 1000, 0), data.batch_indices(0, 64, 1000, 1))
    batch = data.batch_indices(0, 64, 1000, 0)
    assert batch.dtype == np.int64 and batch.shape == (64,) and len(set(batch.tolist())) == 64


def test_batch_indices_straddles_epochs_and_large_batches() -> None:
    n, seed = 10, 3
    perms = [np.random.default_rng([seed, e]).permutation(n) for e in range(6)]
    stream = np.concatenate(perms)
    # Batch of 4 over 10 examples: step 2 covers positions 8..11, the end of epoch 0 and the start of epoch 1.
    assert np.array_equal(data.batch_indices(2, 4, n, seed), stream[8:12])
    for step in range(12):
        assert np.array_equal(data.batch_indices(step, 4, n, seed), stream[4 * step : 4 * step + 4])
    # batch_size > num_examples: one batch spans several whole epochs.
    assert np.array_equal(data.batch_indices(0, 25, n, seed), stream[:25])
    assert np.array_equal(data.batch_indices(1, 25, n, seed), stream[25:50])
    assert np.bincount(data.batch_indices(0, 20, n, seed), minlength=n).tolist() == [2] * n
    assert np.array_equal(data.batch_indices(0, 3, 1, seed), [0, 0, 0])
    with pytest.raises(ValueError):
        data.batch_indices(-1, 4, n, seed)


def _labelled_source(n: int = 7) -> data.ArraySource:
    """Image i is filled with the value i and labelled i % 3, so a batch shows which examples it holds."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy()
    return data.ArraySource(images, np.arange(n) % 3, ("a", "b", "c"))


def test_train_batches_resume_exactly() -> None:
    source = _labelled_source()
    full = data.train_batches(source, batch_size=3, seed=11, start_step=0)
    from_zero = [next(full) for _ in range(12)]
    full.close()
    resumed = data.train_batches(source, batch_size=3, seed=11, start_step=5, prefetch=1)
    tail = [next(resumed) for _ in range(7)]
    resumed.close()
    for a, b in zip(from_zero[5:], tail, strict=True):
        assert np.array_equal(a["image"], b["image"])
    for step, batch in enumerate(from_zero):
        assert list(batch) == ["image"]  # No labels unless asked for.
        assert batch["image"].shape == (3, 4, 4, 3) and batch["image"].dtype == np.uint8
        assert np.array_equal(batch["image"][:, 0, 0, 0], data.batch_indices(step, 3, 7, 11))


def test_train_batches_carry_labels_and_stack_steps() -> None:
    source = _labelled_source()
    single = data.train_batches(source, batch_size=3, seed=2, start_step=4, with_labels=True)
    singles = [next(single) for _ in range(6)]
    single.close()
    for step, batch in enumerate(singles, start=4):
        indices = data.batch_indices(step, 3, 7, 2)
        assert batch["label"].dtype == np.int32 and np.array_equal(batch["label"], indices % 3)
        assert np.array_equal(batch["image"][:, 0, 0, 0], indices)
    # steps_per_item=3: steps 4-6, then 7-9, stacked on a leading axis, the same batches as one at a time.
    stacked = data.train_batches(source, batch_size=3, seed=2, start_step=4, with_labels=True, steps_per_item=3)
    items = [next(stacked) for _ in range(2)]
    stacked.close()
    for i, item in enumerate(items):
        assert item["image"].shape == (3, 3, 4, 4, 3) and item["label"].shape == (3, 3)
        for j in range(3):
            for key in ("image", "label"):
                assert np.array_equal(item[key][j], singles[3 * i + j][key])
    with pytest.raises(ValueError, match="steps_per_item >= 1"):
        data.train_batches(source, batch_size=3, seed=2, start_step=0, steps_per_item=0)


class _FailingSource:
    """Serves two batches, then fails like a broken disk would."""

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return 5

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("disk on fire")
        return np.zeros((len(indices), 2, 2, 3), np.uint8)


def test_train_batches_propagates_errors() -> None:
    batches = data.train_batches(_FailingSource(), batch_size=2, seed=0, start_step=0)
    next(batches)
    next(batches)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


def _producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ddpm_jax.train_batches") and t.is_alive()]


def test_train_batches_close_stops_the_thread() -> None:
    assert not _producer_threads()
    batches = data.train_batches(_labelled_source(), batch_size=2, seed=0, start_step=0, prefetch=2)
    next(batches)
    time.sleep(0.2)  # let the producer fill the queue and block on it
    assert len(_producer_threads()) == 1
    start = time.perf_counter()
    batches.close()
    assert time.perf_counter() - start < 5
    assert not _producer_threads()
