"""ddpm_jax's side of the benchmark: the product's own compiled train step and sampler, one preset per process.

Run by `benchmarks/run.py`; prints one JSON object. Everything timed is what `--mode=train` and `--mode=sample` run:
`train.make_train_step` (noising, forward, backward, clipping, Adam, EMA under shard_map) and
`sampler.make_sampler` (one lax.scan over the denoising steps). Compilation and warm-up are timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # What `python -m ddpm_jax.main` runs with; DDPM_JAX_XLA_DEFAULTS=0 measures without.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import presets  # noqa: E402
from benchmarks.timing import run_times  # noqa: E402
from ddpm_jax import config as default  # noqa: E402
from ddpm_jax import parallel, sampler, train, train_state  # noqa: E402
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
    """FLOPs of one forward pass per image, counted by XLA's cost analysis of the compiled forward."""
    x1, t1 = jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x1, t1)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = jax.jit(model.apply).lower(params, x, t).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / batch


def main() -> None:
    """Measures train throughput, compile time, sampling time per step and peak memory for one preset."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps_per_dispatch", type=int, default=1)
    parser.add_argument("--skip_sampling", action="store_true")
    args = parser.parse_args()
    p = presets.get(args.preset)
    config = benchmark_config(p, args.dtype, args.steps_per_dispatch)
    k = args.steps_per_dispatch

    mesh = parallel.make_mesh()
    model = unet.create_model(config)
    tx = train_state.create_optimizer(config)
    state = train_state.init_train_state(config, model, tx, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    rng = np.random.default_rng(0)
    shape = (k, p.batch_size) if k > 1 else (p.batch_size,)
    images = rng.integers(0, 256, (*shape, p.image_size, p.image_size, 3), np.uint8)
    # With k > 1, a stack of k batches: the step function scans over its leading axis.
    batch = {"image": parallel.global_stacked_batch(mesh, images) if k > 1 else parallel.global_batch(mesh, images)}

    start = time.perf_counter()
    step = train.compile_train_step(train.make_train_step(config, model, mesh), state, batch)
    compile_s = time.perf_counter() - start

    def train_dispatch() -> None:
        nonlocal state
        state, scalars = step(state, batch)
        jax.block_until_ready(scalars["loss"])

    for _ in range(2):
        train_dispatch()
    repeats = max(3, -(-p.train_repeats // k))
    train_s = statistics.median(run_times(train_dispatch, repeats)) / k
    state, scalars = step(state, batch)  # The step donates its input state: keep the new one.
    loss = float(np.mean(parallel.fetch(scalars["loss"])))

    result = {
        "framework": f"ddpm_jax / jax {jax.__version__} ({jax.devices()[0].platform}, {args.dtype})",
        "params": int(num_params),
        "train_img_s": p.batch_size / train_s,
        "train_step_s": train_s,
        "compile_s": compile_s,
        "flops_per_image": 3.0 * forward_flops_per_image(model, p.image_size, p.batch_size),
        "steps_per_dispatch": k,
        "dtype": args.dtype,
        "loss": loss,
    }
    if not args.skip_sampling:
        sample_fn = sampler.make_sampler(config, model, mesh)
        key = jax.random.PRNGKey(1)
        compiled = sample_fn.lower(state.ema_params, key, p.batch_size).compile()
        jax.block_until_ready(compiled(state.ema_params, key))
        result["sample_s_per_step"] = statistics.median(
            run_times(lambda: jax.block_until_ready(compiled(state.ema_params, key)), 3)) / p.sample_steps
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()
