"""XLA flags that ddpm_jax turns on by default, merged into XLA_FLAGS before JAX starts its backends.

On the CPU, routing convolutions and dots through XLA's YNNPACK fusions makes the UNet's train step and forward pass
about 1.5-2.5x faster (benchmarks/run.py; figures in README "Performance"). Only "dot": adding "eltwise" pulls
GroupNorm and swish into the convolution fusions, which made small64's train step and forward pass 1.3x slower.
The flag is experimental in XLA, so it is only added for the jaxlib releases it was measured on; a user's own
XLA_FLAGS value for the same flag wins, and DDPM_JAX_XLA_DEFAULTS=0 turns the defaults off.
"""

from __future__ import annotations

import os
from importlib.metadata import version

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot"}
# Releases the defaults were measured on: an XLA that does not know a flag aborts the process.
TESTED_JAXLIB = ((0, 10, 2), (0, 11, 0))  # [from, to)


def merged(xla_flags: str, defaults: dict[str, str]) -> str:
    """XLA_FLAGS with each default flag appended unless the string already sets that flag."""
    present = {f.lstrip("-").split("=", 1)[0] for f in xla_flags.split()}
    extra = [f"--{name}={value}" for name, value in defaults.items() if name not in present]
    return " ".join([xla_flags.strip(), *extra]).strip()


def jaxlib_version() -> tuple[int, ...] | None:
    """The installed jaxlib's (major, minor, patch), or None when it is missing or unreadable."""
    try:
        return tuple(int(p) for p in version("jaxlib").split(".")[:3])
    except Exception:  # noqa: BLE001 - any failure means "unknown": add no flags.
        return None


def apply_defaults() -> str:
    """Adds the default flags to os.environ["XLA_FLAGS"] (call before JAX first touches a device); returns it."""
    current = os.environ.get("XLA_FLAGS", "")
    wanted = os.environ.get("DDPM_JAX_XLA_DEFAULTS", "1").strip().lower() not in ("0", "false", "no", "off")
    version = jaxlib_version()
    if wanted and version is not None and TESTED_JAXLIB[0] <= version < TESTED_JAXLIB[1]:
        os.environ["XLA_FLAGS"] = merged(current, CPU_DEFAULTS)
    return os.environ.get("XLA_FLAGS", "")
