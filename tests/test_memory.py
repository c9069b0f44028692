"""train.release_freed_heap: the C heap's freed pages go back to the OS after XLA compiles."""

import ctypes
import sys

import pytest

from ddpm_jax import train


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and trims glibc's heap")
def test_release_freed_heap_returns_freed_small_blocks_to_the_os():
    # 256 MiB in 64 KiB blocks, below glibc's mmap threshold so they come from the heap, like the compiler's; freeing
    # every other one leaves 128 MiB of free holes that free() itself cannot hand back.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(4096)]
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    for b in blocks[::2]:
        libc.free(b)
    held = _rss_mib()
    assert train.release_freed_heap()
    released = held - _rss_mib()
    for b in blocks[1::2]:
        libc.free(b)
    assert released > 64, f"only {released:.0f} of 128 freed MiB went back to the OS"
