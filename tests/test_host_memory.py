"""host_memory: freed heap handed back to the OS, and large blocks kept for reuse instead of faulted in again."""

import ctypes
import json
import subprocess
import sys

import pytest
from helpers import REPO

from ddpm_jax import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets glibc's malloc")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


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
    assert host_memory.release_freed_heap()
    released = held - _rss_mib()
    for b in blocks[1::2]:
        libc.free(b)
    assert released > 64, f"only {released:.0f} of 128 freed MiB went back to the OS"


# In a process of its own (mallopt is process-wide): page faults of writing a fresh 80 MiB block, three times, with
# glibc's defaults, then after keep_blocks_of. Each round allocates, writes every page and frees, as a step does with
# its temporaries.
_ROUNDS = """
import ctypes, json, resource
from ddpm_jax import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 80 << 20

def faults_per_round():
    counts = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

default = faults_per_round()
kept = host_memory.keep_blocks_of(SIZE)
print(json.dumps({"default": default, "kept": kept, "after": faults_per_round(),
                  "too_large": host_memory.keep_blocks_of(3 << 30), "nothing": host_memory.keep_blocks_of(0)}))
"""


def test_kept_blocks_are_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", _ROUNDS], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    pages = (80 << 20) // 4096
    assert min(r["default"]) > pages * 0.9, r  # glibc's default: a fresh mmap every time, every page faulted in.
    assert r["kept"] and not r["too_large"] and not r["nothing"], r
    assert max(r["after"][1:]) < pages * 0.05, r  # Once the heap has grown, the block is reused: (almost) no faults.
