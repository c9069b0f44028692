"""ddpm_jax's side of the benchmark: the product's own compiled train step and sampler, one preset per process.

Run by `benchmarks/run.py`; prints one JSON object. Everything timed is what `--mode=train` and `--mode=sample` run:
`train.make_train_step` (noising, forward, backward, clipping, Adam, EMA under shard_map) and
`sampler.make_sampler` (one lax.scan over the denoising steps). Compilation and warm-up are timed apart.

By default one process times both on the devices `--mode=train` uses (one CPU device). With --sampling_only it times
only the sampler, on the devices `--mode=sample` uses: on a CPU host one per core (xla_flags.cpu_devices_for), which
must be set before JAX starts, hence a process of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import presets  # noqa: E402  (imports no JAX)
from ddpm_jax import xla_flags  # noqa: E402


def cpu_devices_for_argv(argv: list[str]) -> int:
    """CPU devices that `python -m ddpm_jax.main` would use for this benchmark's work: per core for --sampling_only
    (the sampling modes' split of the preset's batch), else one, as training runs."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(presets.PRESETS))
    pre.add_argument("--batch_size", type=int, default=0)
    pre.add_argument("--sampling_only", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if not known.sampling_only or known.preset is None:
        return 1
    batch = known.batch_size if known.batch_size > 0 else presets.get(known.preset).batch_size
    return xla_flags.cpu_devices_for("sample", xla_flags.host_cores(), batch)


def legacy_loop_fusion_for_argv(argv: list[str]) -> bool:
    """Whether `python -m ddpm_jax.main` would compile the --preset's loop fusions with XLA:CPU's LLVM IR emitter
    (without a preset, as for the tests' tiny UNets: yes)."""
    p = presets.from_argv(argv)
    return p is None or xla_flags.legacy_loop_fusion_for(p.image_size, p.channels[0])


# What `python -m ddpm_jax.main` runs with (the devices and dispatch of --mode=sample with --sampling_only, else of
# --mode=train); DDPM_JAX_XLA_DEFAULTS=0 measures without. Imported (by the tests), it only adds the flags.
if __name__ == "__main__":
    _mode = "sample" if "--sampling_only" in sys.argv[1:] else "train"
    xla_flags.apply_defaults(cpu_devices=cpu_devices_for_argv(sys.argv[1:]),
                             inline_dispatch=xla_flags.inline_dispatch_for(_mode),
                             legacy_loop_fusion=legacy_loop_fusion_for_argv(sys.argv[1:]))
else:
    xla_flags.apply_defaults(legacy_loop_fusion=legacy_loop_fusion_for_argv(sys.argv[1:]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Off unless asked: a cached compile would report the cache's load time as compile_s. The GPU check's CI dry run asks,
# so that its parts of one UNet compile once.
if os.environ.get("DDPM_JAX_BENCH_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["DDPM_JAX_BENCH_CACHE"])

from benchmarks.timing import median_after_warmup, run_times  # noqa: E402
from ddpm_jax import config as default  # noqa: E402
from ddpm_jax import host_memory, parallel, sampler, train, train_state  # noqa: E402
from ddpm_jax.models import unet  # noqa: E402


def benchmark_config(p: presets.Preset, dtype: str, steps_per_dispatch: int):
    """The default config with the preset's UNet and batch, compute dtype and optimizer steps per dispatch."""
    config = default.get_config()
    for key, value in presets.config_overrides(p).items():
        section, name = key.split(".")
        config[section][name] = value
    config.model.dtype = dtype
    config.training.steps_per_dispatch = steps_per_dispatch
    config.sampling.method = "ddim"  # Same cost per step as ddpm; lets one call run exactly sample_steps steps.
    config.sampling.num_steps = p.sample_steps
    config.sampling.num_intermediates = 0
    return config


def forward_flops_per_image(model: unet.UNet, size: int, batch: int) -> float:
    """Model FLOPs of one forward pass per image, by XLA's cost analysis of the lowered (not compiled) forward of the
    UNet as written: its upsampling convolutions at full resolution, as the peer computes them, not folded.

    Not compiling keeps a third program's compile out of the peak RSS; the count is 0.2% below the compiled
    program's (tiny32: 473.6 against 474.5 MFLOP), which also counts the elementwise work fusion adds.
    """
    x1, t1 = jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x1, t1)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    cost = jax.jit(model.clone(fold_upsampling=False).apply).lower(params, x, t).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / batch


@dataclasses.dataclass
class Bench:
    """A preset's compiled train step on fixed synthetic uint8 images, and the state it advances."""

    preset: presets.Preset
    config: Any
    mesh: jax.sharding.Mesh
    model: unet.UNet
    state: Any
    batch: dict
    step: Any
    compile_s: float

    def dispatch(self) -> dict:
        """One call of the step (steps_per_dispatch optimizer steps), waited for; keeps the new state (the step
        donates the old one) and returns the scalars."""
        self.state, scalars = self.step(self.state, self.batch)
        jax.block_until_ready(scalars["loss"])
        return scalars

    def compiled_sampler(self, key: jax.Array):
        """The product's sampler for one batch of the preset, compiled: call it with (params, key)."""
        return compile_sampler(self.config, self.model, self.mesh, self.state.ema_params, key, self.preset.batch_size)


def compile_sampler(config: Any, model: unet.UNet, mesh: jax.sharding.Mesh, params: Any, key: jax.Array, batch: int):
    """The product's sampler (what --mode=sample runs) for `batch` samples, compiled: call it with (params, key)."""
    return sampler.make_sampler(config, model, mesh).lower(params, key, batch).compile()


def framework(dtype: str) -> str:
    """The "framework" field of a report: JAX's version, the platform it runs on and the compute dtype."""
    return f"ddpm_jax / jax {jax.__version__} ({jax.devices()[0].platform}, {dtype})"


def setup(p: presets.Preset, dtype: str, steps_per_dispatch: int) -> Bench:
    """Compiles the train step (what --mode=train runs) and then builds the preset's state and images, as
    --mode=train does: compiled for the abstract state, before the state exists. Times the compile."""
    k = steps_per_dispatch
    config = benchmark_config(p, dtype, k)
    mesh = parallel.make_mesh()
    model = unet.create_model(config)
    tx = train_state.create_optimizer(config)
    start = time.perf_counter()
    step = train.compile_train_step(train.make_train_step(config, model, mesh),
                                    train_state.abstract_train_state(config, model, tx, mesh),
                                    train.batch_spec(config, mesh))
    compile_s = time.perf_counter() - start
    state = train_state.init_train_state(config, model, tx, mesh)
    host_memory.release_freed_heap()  # As --mode=train does: the init's compile leaves freed heap behind.
    shape = (k, p.batch_size) if k > 1 else (p.batch_size,)
    images = np.random.default_rng(0).integers(0, 256, (*shape, p.image_size, p.image_size, 3), np.uint8)
    # With k > 1, a stack of k batches: the step function scans over its leading axis.
    batch = {"image": parallel.global_stacked_batch(mesh, images) if k > 1 else parallel.global_batch(mesh, images)}
    return Bench(p, config, mesh, model, state, batch, step, compile_s)


# Dense tensor-core peaks in TFLOP/s by device kind, from NVIDIA's data sheets (SXM parts). float32 is the TF32
# peak: XLA runs float32 convolutions and dots on TF32 tensor cores at JAX's default precision.
PEAK_TFLOPS = {"H200": {"bfloat16": 989.4, "float32": 494.7}, "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
               "H100": {"bfloat16": 989.4, "float32": 494.7}, "A100": {"bfloat16": 312.0, "float32": 156.0}}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The accelerator's peak FLOP/s for dtype, or None for a device kind not in PEAK_TFLOPS (CPUs among them)."""
    for name, peaks in PEAK_TFLOPS.items():  # Longest names first where one contains another (H100 PCIe, H100).
        if name in device_kind:
            return peaks[dtype] * 1e12
    return None


def device_stats() -> dict:
    """Device kind and peak device memory in MiB (None where the backend keeps no statistics, as on CPU)."""
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"device_kind": device.device_kind, "peak_device_mib": peak / 2**20 if peak is not None else None}


def time_sampler(compiled: Any, params: Any, key: jax.Array, steps: int) -> float:
    """Seconds per denoising step of a compiled sampler call: the median of 3 calls after one warm-up."""
    return median_after_warmup(lambda: jax.block_until_ready(compiled(params, key)), 3) / steps


def sampling_only(p: presets.Preset, dtype: str) -> dict:
    """Times the preset's sampler alone, as `--mode=sample` runs it: the train state initialised (sample restores a
    whole checkpoint), its EMA parameters kept, the sampler compiled, then timed on this process's devices."""
    config = benchmark_config(p, dtype, 1)
    mesh = parallel.make_mesh()
    model = unet.create_model(config)
    params = train_state.init_train_state(config, model, train_state.create_optimizer(config), mesh).ema_params
    host_memory.release_freed_heap()
    key = jax.random.PRNGKey(1)
    start = time.perf_counter()
    compiled = compile_sampler(config, model, mesh, params, key, p.batch_size)
    compile_s = time.perf_counter() - start
    host_memory.release_freed_heap()  # As sampler.precompile does.
    return {
        "framework": framework(dtype),
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "sample_s_per_step": time_sampler(compiled, params, key, p.sample_steps),
        "sample_devices": jax.device_count(),
        "sample_compile_s": compile_s,
        "dtype": dtype,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch_size": p.batch_size,
    }


def main() -> None:
    """Measures train throughput, compile time, sampling time per step and peak memory for one preset."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps_per_dispatch", type=int, default=1)
    parser.add_argument("--skip_sampling", action="store_true")
    parser.add_argument("--sampling_only", action="store_true",
                        help="time only the sampler, on the devices --mode=sample uses (one per CPU core)")
    parser.add_argument("--batch_size", type=int, default=0, help="instead of the preset's batch (GPU check: 64)")
    parser.add_argument("--train_repeats", type=int, default=0, help="instead of the preset's timed train steps")
    parser.add_argument("--sample_steps", type=int, default=0, help="instead of the preset's steps per sampler call")
    args = parser.parse_args()
    if args.sampling_only and args.skip_sampling:
        raise SystemExit("error: --sampling_only and --skip_sampling exclude each other; pass one")
    p = presets.get(args.preset)
    overrides = {"batch_size": args.batch_size, "train_repeats": args.train_repeats, "sample_steps": args.sample_steps}
    p = dataclasses.replace(p, **{k: v for k, v in overrides.items() if v > 0})
    if args.sampling_only:
        print(json.dumps(sampling_only(p, args.dtype)))
        return
    k = args.steps_per_dispatch
    bench = setup(p, args.dtype, k)
    num_params = sum(x.size for x in jax.tree.leaves(bench.state.params))
    key = jax.random.PRNGKey(1)
    if not args.skip_sampling:
        # Compiled before any step runs, as --mode=train compiles its grid sampler (sampler.precompile): the
        # compile's working memory does not come on top of a step's buffers.
        compiled = bench.compiled_sampler(key)
        host_memory.release_freed_heap()
    for _ in range(2):
        bench.dispatch()
    repeats = max(3, -(-p.train_repeats // k))
    train_s = statistics.median(run_times(bench.dispatch, repeats)) / k
    loss = float(np.mean(parallel.fetch(bench.dispatch()["loss"])))

    result = {
        "framework": framework(args.dtype),
        "params": int(num_params),
        "train_img_s": p.batch_size / train_s,
        "train_step_s": train_s,
        "compile_s": bench.compile_s,
        "flops_per_image": 3.0 * forward_flops_per_image(bench.model, p.image_size, p.batch_size),
        "steps_per_dispatch": k,
        "dtype": args.dtype,
        "loss": loss,
    }
    if not args.skip_sampling:
        result["sample_s_per_step"] = time_sampler(compiled, bench.state.ema_params, key, p.sample_steps)
        result["sample_devices"] = jax.device_count()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(device_stats())
    peak = peak_flops(result["device_kind"], args.dtype)
    result["mfu"] = result["train_img_s"] * result["flops_per_image"] / peak if peak else None
    result["batch_size"] = p.batch_size
    print(json.dumps(result))


if __name__ == "__main__":
    main()
