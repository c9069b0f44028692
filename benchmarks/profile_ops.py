"""Where the time goes: per-op tables of ddpm_jax's train step and sampler, and of the diffusers peer's, side by side.

    python benchmarks/profile_ops.py --preset {tutorial,small64,tiny32} [--peer] [--steps N] [--top K] [--json FILE]

(Not profile.py: a script directory holding profile.py shadows the standard library's profile module, which
cProfile, and so torch._dynamo, imports.)

ddpm_jax: the compiled train step (what --mode=train runs) is traced with jax.profiler over N steps; each XLA:CPU
thunk's time is matched to its instruction in the optimized HLO, which gives its category (convolution, conv weight
gradient, matmul, reduction, elementwise, data movement) and its pass from the JAX name stack (forward under jvp,
backward under transpose(jvp), update for everything outside the network: noising, clipping, Adam, EMA). The
sampler is traced over one call and reported per denoising step.
--peer: the same preset in diffusers/PyTorch (peer_bench.py --profile, run with --peer_python), profiled with
torch.profiler: self CPU time of each aten op, attributed to forward / backward / update by record_function.
Ops may overlap in time on several cores, so the tables give op time, and the wall time per step beside it.
XLA:CPU runs convolution thunks asynchronously on its thread pool: their trace events time only the launch, and
their run time lands in the last row, "not in any op (wall - op time)".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# Imported first: it adds the product's XLA flags for the --preset in argv before JAX starts.
from benchmarks import jax_bench  # noqa: E402  # isort: skip

import jax  # noqa: E402

from benchmarks import op_profile, presets, run  # noqa: E402
from ddpm_jax import xla_flags  # noqa: E402


def trace_op_times(fn, calls: int, module: str) -> tuple[dict[str, float], int]:
    """Nanoseconds per HLO instruction of `module`, summed over `calls` calls of fn (jax.profiler), and the op count."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                fn()
        paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
        if not paths:
            raise SystemExit(f"error: jax.profiler wrote no trace under {trace_dir}")
        data = jax.profiler.ProfileData.from_file(paths[-1])
    times: dict[str, float] = {}
    count = 0
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if stats.get("hlo_module") == module and "hlo_op" in stats:
                    times[stats["hlo_op"]] = times.get(stats["hlo_op"], 0.0) + event.duration_ns
                    count += 1
    if not times:
        raise SystemExit(f"error: the trace holds no op of {module}; is this jax's CPU thunk runtime?")
    return times, count


def _module_name(hlo_text: str) -> str:
    match = re.match(r"HloModule (\S+?),", hlo_text)
    if not match:
        raise SystemExit("error: cannot read the HLO module's name from the compiled program")
    return match.group(1)


def profile_compiled(compiled, call, calls: int, per: int, sample: bool) -> dict:
    """Op rows of a compiled program (per `per`: steps) and its untraced wall time in ms per `per`."""
    text = compiled.as_text()
    instructions, computations = op_profile.parse_hlo(text)
    times, count = trace_op_times(call, calls, _module_name(text))
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        walls.append(time.perf_counter() - start)
    return {"rows": op_profile.xla_rows(instructions, computations, times, calls * per, sample=sample),
            "wall_ms": 1e3 * statistics.median(walls) / per, "ops": count / (calls * per)}


def profile_ours(p: presets.Preset, dtype: str, steps: int, skip_sampling: bool) -> dict:
    """ddpm_jax's train step over `steps` steps and (unless skipped) one sampler call, as op rows."""
    bench = jax_bench.setup(p, dtype, 1)
    for _ in range(2):
        bench.dispatch()
    out = {"framework": jax_bench.framework(dtype),
           "train": profile_compiled(bench.step, bench.dispatch, steps, 1, sample=False)}
    if not skip_sampling:
        key, params = jax.random.PRNGKey(1), bench.state.ema_params
        compiled = bench.compiled_sampler(key)
        sample_call = lambda: jax.block_until_ready(compiled(params, key))  # noqa: E731
        sample_call()
        out["sample"] = profile_compiled(compiled, sample_call, 1, p.sample_steps, sample=True)
    return out


def report(p: presets.Preset, ours: dict, peer: dict | None, top: int) -> str:
    """The Markdown report: per framework and part, the slowest ops; then the category comparison per part."""
    parts = []
    for part, unit in (("train", "train step"), ("sample", "denoising step")):
        if part not in ours:
            continue
        for who, result in (("ddpm_jax", ours), ("peer", peer)):
            if result is None or part not in result:
                continue
            title = (f"{who} {unit}, {p.name} (batch {p.batch_size}): wall {result[part]['wall_ms']:.1f} ms per "
                     f"{unit}, {result[part]['ops']:.0f} ops")
            parts.append(op_profile.format_top(title, result[part]["rows"], top))
        theirs = peer[part] if peer and part in peer else None
        parts.append(f"{unit} by pass and category (ms per {unit}):\n\n" + op_profile.format_comparison(
            ours[part]["rows"], theirs["rows"] if theirs else None,
            (ours[part]["wall_ms"], theirs["wall_ms"] if theirs else None)))
    return "\n\n".join(parts)


def main() -> None:
    """Parses the flags, profiles ddpm_jax (and the peer), prints the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=0, help="train steps traced (default: the preset's repeats)")
    parser.add_argument("--top", type=int, default=15, help="rows of each op table")
    parser.add_argument("--peer", action="store_true", help="also profile the diffusers peer")
    parser.add_argument("--peer_python", default=os.environ.get("DDPM_JAX_PEER_PYTHON", sys.executable))
    parser.add_argument("--skip_sampling", action="store_true")
    parser.add_argument("--json", default="", help="also write every row of both profiles to this file")
    args = parser.parse_args()
    # The train step runs as --mode=train runs it (before JAX creates its CPU client).
    xla_flags.apply_defaults(inline_dispatch=xla_flags.inline_dispatch_for("train"))
    p = presets.get(args.preset)
    steps = args.steps or max(3, p.train_repeats // 3)
    if steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {steps}")
    if args.peer:
        run.check_peer_python(args.peer_python)
    ours = profile_ours(p, args.dtype, steps, args.skip_sampling)
    peer = None
    if args.peer:
        peer = run.run_child(args.peer_python, "peer_bench.py", f"--preset={p.name}", f"--profile={steps}",
                             *(["--skip_sampling"] if args.skip_sampling else []))
    print(f"{run.cpu_name()}, {os.cpu_count()} cores ({run.cpu_flags()}); {ours['framework']}"
          + (f" vs {peer['framework']}" if peer else ""))
    print(report(p, ours, peer, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": p.name, "device": run.cpu_name(), "cpu_flags": run.cpu_flags(), "steps": steps,
                       "ours": ours, "peer": peer}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
