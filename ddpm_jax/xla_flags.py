"""XLA flags that ddpm_jax turns on by default, merged into XLA_FLAGS before JAX starts its backends.

On the CPU, routing convolutions and dots through XLA's YNNPACK fusions makes the UNet's train step and forward pass
about 1.5-2.5x faster (benchmarks/run.py; figures in README "Performance"). Only "dot": adding "eltwise" pulls
GroupNorm and swish into the convolution fusions, which made small64's train step and forward pass 1.3x slower.
The flag is experimental in XLA, so it is only added for the jaxlib releases it was measured on; a user's own
XLA_FLAGS value for the same flag wins, and DDPM_JAX_XLA_DEFAULTS=0 turns the defaults off.

The train step alone also routes reductions (GroupNorm's statistics and their gradients) through YNNPACK, passed as a
compile option of that one program: training 0.99-1.05x as fast as without on tiny32, small64 and tutorial (Zen 4
and Intel AVX-512 VMs, A/B in one process, benchmarks/train_options_ab.py), while the sampler's forward pass was
0.93x as fast with it, so the process-wide flag stays "dot".

For UNets up to small64's activations (64 x 64 pixels x 64 channels per image at full resolution), loop fusions (the
elementwise kernels between convolutions, and the optimizer's update) are compiled by XLA:CPU's LLVM IR emitter
instead of its newer MLIR fusion emitters (backend option xla_cpu_disable_new_fusion_emitters). The MLIR emitters
hold an MLIR context and pass pipeline for every fusion waiting to be compiled, about 400 MiB for tiny32's train
step: with the LLVM IR emitter the benchmark's peak RSS fell from 1,156 to 716 MiB on tiny32 and from 1,659 to 1,505
on small64, training 0.99x and 1.13x and sampling 1.01x and 1.06x as fast, for 16-31% longer compiles (Zen 4 VM,
benchmarks/flag_sweep.py). On tutorial (128 x 128 x 128) it trained 0.84x and sampled 0.72x as fast, so larger
UNets keep the MLIR emitters. A user's own xla_backend_extra_options keep their entries and gain this one unless
they set its key; XLA only checks that the key is present, so DDPM_JAX_LLVM_LOOP_FUSION=0 (or 1) overrides the choice.

The modes that only sample (sample, fid, inpaint, edit) also split the host CPU into one JAX device per core, up to
8: the batch is then data-parallel over the cores, which sampled 1.07-1.33x faster on 2-core VMs than one device
using both cores. Training keeps one device: there it was as fast or slower and peaked higher (README "Performance").
The flag only adds CPU devices, so on a GPU or TPU host, whose default devices are the accelerators, it changes nothing.

The train state's init runs once, and its program is mostly one unrolled threefry hash per parameter: on the CPU it
is compiled with LLVM at -O0 (compile option xla_backend_optimization_level=0), which gives bitwise the same state
(tests/test_train_state.py) and cut that compile from 21 to 2.5 s on tiny32 (31 to 5 s on small64, 15 to 11 s on
tutorial) and its compile peak by 55 MiB, for 0.03-1.8 s more to run it (Zen 4 VM).

Training also runs its one-device CPU programs inline on the calling thread instead of JAX's dispatch thread pool
(`jax_cpu_enable_async_dispatch=False`, which leaves multi-device programs as they are): then each step's temporary
buffers come from the main thread's heap, which `host_memory.keep_blocks_of` keeps between steps, instead of a fresh
mmap that faulted in every page again. Training 1.17x (tiny32), 1.10x (small64) and 1.12x (tutorial) as fast
(README "Performance").
"""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Any

import jax

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# A comma-separated list of backend options (key or key=value), merged key by key with a user's own list.
BACKEND_OPTIONS_FLAG = "xla_backend_extra_options"
# XLA:CPU's LLVM IR emitter for loop fusions instead of its MLIR fusion emitters (see the module docstring).
LEGACY_LOOP_FUSION_OPTION = "xla_cpu_disable_new_fusion_emitters"
CPU_DEFAULTS = {YNN_FUSION_FLAG: "dot"}
LEGACY_LOOP_FUSION_DEFAULTS = {BACKEND_OPTIONS_FLAG: LEGACY_LOOP_FUSION_OPTION}
# Largest full-resolution activation per image (pixels x channels) it is used for: small64's, the largest model it
# was measured as fast or faster on; tutorial's (128 x 128 x 128) trained 0.84x and sampled 0.72x as fast with it.
LEGACY_LOOP_FUSION_MAX_ACTIVATION = 64 * 64 * 64
LOOP_FUSION_ENV = "DDPM_JAX_LLVM_LOOP_FUSION"  # 1 or 0 overrides the choice by size (the option is set or not).
# Compile options take the enum's names, not XLA_FLAGS' short ones.
TRAIN_STEP_CPU_OPTIONS = {YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# The state's init: compiled for the least compile time, since it runs once (see the module docstring).
STATE_INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 0}
# Releases the defaults were measured on: an XLA that does not know a flag aborts the process.
TESTED_JAXLIB = ((0, 10, 2), (0, 11, 0))  # [from, to)


# Modes whose work is the sampler's denoising loop over a batch, split over the devices.
SAMPLING_MODES = ("sample", "fid", "inpaint", "edit")
MAX_CPU_DEVICES = 8  # Measured on 2 cores only; beyond 8 a device's share of a sampling batch gets small.
DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"
# Modes whose one-device CPU programs run inline on the calling thread (see the module docstring).
INLINE_DISPATCH_MODES = ("train",)


def host_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which container CPU limits narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count() or 1


def cpu_devices_for(mode: str, cores: int, batch_size: int, distributed: bool = False) -> int:
    """CPU devices for `mode`: one per core (at most 8, dividing the training batch) when it only samples, else 1.

    The training batch must split evenly over the devices (config_checks), so the count is the largest that divides
    it; a multi-process run keeps one device per process, as its other hosts count on.
    """
    if mode not in SAMPLING_MODES or distributed:
        return 1
    return max(n for n in range(1, max(1, min(cores, MAX_CPU_DEVICES)) + 1) if batch_size % n == 0)


def flag_values(xla_flags: str) -> dict[str, str]:
    """The flags an XLA_FLAGS string sets, by name without dashes ("" for a flag given without a value)."""
    return dict(f.lstrip("-").partition("=")[::2] for f in xla_flags.split())


def loop_fusion_override_or(choice: bool) -> bool:
    """DDPM_JAX_LLVM_LOOP_FUSION's answer to whether loop fusions use the LLVM IR emitter (1: yes, 0: XLA's
    default), or `choice` (the answer by size) when it is unset."""
    value = os.environ.get(LOOP_FUSION_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return choice


def legacy_loop_fusion_for(image_size: int, channels: int) -> bool:
    """Whether a UNet at image_size with `channels` at full resolution compiles its loop fusions with the LLVM IR
    emitter (see the module docstring): for activations up to LEGACY_LOOP_FUSION_MAX_ACTIVATION per image, unless
    DDPM_JAX_LLVM_LOOP_FUSION says otherwise."""
    return loop_fusion_override_or(image_size * image_size * channels <= LEGACY_LOOP_FUSION_MAX_ACTIVATION)


def legacy_loop_fusion_for_config(config: Any) -> bool:
    """legacy_loop_fusion_for a ddpm_jax config's UNet (read before JAX starts, so before config_checks); True for
    values config_checks rejects next with its own message."""
    try:
        channels = int(config.model.ch) * int(tuple(config.model.ch_mult)[0])
        return legacy_loop_fusion_for(int(config.data.image_size), channels)
    except (TypeError, ValueError, IndexError):
        return True


def merged_options(users: str, defaults: str) -> str:
    """A backend options list ("key,key=value") with each default entry appended unless the user's sets its key."""
    entries = [e for e in users.split(",") if e]
    keys = {e.partition("=")[0] for e in entries}
    return ",".join(entries + [e for e in defaults.split(",") if e and e.partition("=")[0] not in keys])


def merged(xla_flags: str, defaults: dict[str, str]) -> str:
    """XLA_FLAGS with each default flag appended unless the string already sets that flag.

    The backend options flag is a list: the user's own list gets the default entries whose keys it does not set.
    """
    present = flag_values(xla_flags)
    tokens = xla_flags.split()
    if BACKEND_OPTIONS_FLAG in present and BACKEND_OPTIONS_FLAG in defaults:
        combined = merged_options(present[BACKEND_OPTIONS_FLAG], defaults[BACKEND_OPTIONS_FLAG])
        tokens = [f"--{BACKEND_OPTIONS_FLAG}={combined}" if t.lstrip("-").partition("=")[0] == BACKEND_OPTIONS_FLAG
                  else t for t in tokens]
    extra = [f"--{name}={value}" for name, value in defaults.items() if name not in present]
    return " ".join([*tokens, *extra])


def jaxlib_version() -> tuple[int, ...] | None:
    """The installed jaxlib's (major, minor, patch), or None when it is missing or unreadable."""
    try:
        return tuple(int(p) for p in version("jaxlib").split(".")[:3])
    except Exception:  # noqa: BLE001 - any failure means "unknown": add no flags.
        return None


def defaults_wanted() -> bool:
    """False when DDPM_JAX_XLA_DEFAULTS turns ddpm_jax's XLA defaults off (0, false, no, off)."""
    return os.environ.get("DDPM_JAX_XLA_DEFAULTS", "1").strip().lower() not in ("0", "false", "no", "off")


def jaxlib_tested() -> bool:
    """Whether the installed jaxlib is one the experimental defaults were measured on."""
    version = jaxlib_version()
    return version is not None and TESTED_JAXLIB[0] <= version < TESTED_JAXLIB[1]


def train_step_compiler_options(platform: str) -> dict[str, str]:
    """Compile options for the train step on `platform`: YNNPACK reductions on CPUs of a tested jaxlib, else none.

    None either when the defaults are off or XLA_FLAGS sets the YNN fusion flag to another value than the default
    apply_defaults adds (which child processes inherit): the user's choice wins.
    """
    default = CPU_DEFAULTS[YNN_FUSION_FLAG]
    users = flag_values(os.environ.get("XLA_FLAGS", "")).get(YNN_FUSION_FLAG, default) != default
    if platform != "cpu" or not defaults_wanted() or not jaxlib_tested() or users:
        return {}
    return dict(TRAIN_STEP_CPU_OPTIONS)


def state_init_compiler_options(platform: str) -> dict[str, Any]:
    """Compile options for the train state's init on `platform`: LLVM at -O0 on CPUs, unless the defaults are off.

    Not tied to the tested jaxlib releases: the option is as old as XLA:CPU. Not used on GPUs (not measured there).
    """
    if platform != "cpu" or not defaults_wanted():
        return {}
    return dict(STATE_INIT_CPU_OPTIONS)


def inline_dispatch_for(mode: str) -> bool:
    """Whether `mode` runs its one-device CPU programs inline on the calling thread: training, unless turned off."""
    return mode in INLINE_DISPATCH_MODES and defaults_wanted()


def apply_defaults(cpu_devices: int = 1, inline_dispatch: bool = False, legacy_loop_fusion: bool = True) -> str:
    """Adds the default flags to os.environ["XLA_FLAGS"] (call before JAX first touches a device); returns it.

    cpu_devices > 1 also asks for that many host CPU devices (see cpu_devices_for), unless XLA_FLAGS sets a count.
    inline_dispatch runs one-device CPU programs on the calling thread (see inline_dispatch_for). legacy_loop_fusion
    compiles loop fusions with the LLVM IR emitter (see legacy_loop_fusion_for). All are read when JAX creates its
    CPU client (importing JAX does not), so afterwards they change nothing.
    """
    if not defaults_wanted():
        return os.environ.get("XLA_FLAGS", "")
    if inline_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    defaults: dict[str, str] = {}
    if jaxlib_tested():
        defaults.update(CPU_DEFAULTS)
        if loop_fusion_override_or(legacy_loop_fusion):
            defaults.update(LEGACY_LOOP_FUSION_DEFAULTS)
    if cpu_devices > 1:  # A flag every jaxlib knows, so not tied to the tested releases.
        defaults[DEVICE_COUNT_FLAG] = str(cpu_devices)
    if defaults:
        os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""), defaults)
    return os.environ.get("XLA_FLAGS", "")
