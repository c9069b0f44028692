"""The host's C heap under XLA:CPU (glibc): hand back what the compiler freed, keep what every step allocates again.

- XLA's compiler frees most of what it allocates, but glibc keeps those pages: `release_freed_heap` hands them back
  (about 480 MiB after compiling tiny32's train step).
- Each call of a compiled CPU program allocates its temporary buffers as one block (`temp_size_in_bytes`: 88 MiB for
  tiny32's train step, 462 MiB for small64's). glibc serves a block that large with a fresh mmap and unmaps it when
  it is freed, so every train step faulted all its pages in again: 22,600 page faults and about 50 ms of kernel
  time per tiny32 step. `keep_blocks_of` raises glibc's mmap and trim thresholds above the block's size, so the
  heap keeps it from one step to the next. Only the main thread's heap can: a worker thread's arena maps every
  block over 64 MiB, so training runs its one-device programs inline on the calling thread
  (`xla_flags.apply_defaults(inline_dispatch=True)`). Together: training 1.17x (tiny32), 1.10x (small64) and 1.12x
  (tutorial) as fast, at the same peak memory (README "Performance").

Both are no-ops (returning False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MiB = 1 << 20
INT_MAX = (1 << 31) - 1
_kept = 0  # The largest mmap threshold set so far (glibc has no call that reads it back).


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has malloc_trim and mallopt; musl and macOS do not), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_freed_heap() -> bool:
    """Hands the C heap's free pages back to the OS (glibc's malloc_trim); True if it ran.

    After compiling tiny32's train step the process held about 480 MiB that the compiler had freed, on top of which
    the step's own buffers then raised the peak.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def keep_blocks_of(nbytes: int) -> bool:
    """Makes glibc keep freed blocks of up to `nbytes` in the heap for reuse instead of unmapping them; True if set.

    Blocks this large then come from the heap, not from a fresh mmap (the mmap threshold: nbytes rounded up to a MiB,
    plus one MiB), and a free top of the heap is no longer handed back on free (the trim threshold, at its largest):
    what is freed stays for the next step's allocations, and only `release_freed_heap` hands pages back, at the
    points the loop chooses. The mmap threshold never goes down: a later, smaller program keeps the larger setting.
    mallopt takes a C int, so blocks of 2 GiB and more cannot be kept (False); the tutorial UNet's train step needs
    1.6 GiB.
    """
    global _kept
    libc = _glibc()
    threshold = (-(-nbytes // MiB) + 1) * MiB
    if libc is None or nbytes <= 0 or threshold > INT_MAX:
        return False
    if threshold > _kept:
        if not (libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) and libc.mallopt(M_MMAP_THRESHOLD, threshold)):
            return False
        _kept = threshold
    return True
