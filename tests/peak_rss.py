"""Runs a module as `python -m` would and prints its peak resident set size on exit, for the memory tests.

python tests/peak_rss.py -m ddpm_jax.main --config=... prints `peak_rss_mib: N` on stderr when the program exits.
"""

import atexit
import resource
import runpy
import sys


def _report() -> None:
    """Prints the process's peak RSS (Linux reports ru_maxrss in KiB)."""
    print(f"peak_rss_mib: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: python tests/peak_rss.py -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    atexit.register(_report)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
