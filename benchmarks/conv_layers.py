"""Each convolution of a preset's UNet timed alone: forward, input gradient and weight gradient, against PyTorch's.

    python benchmarks/conv_layers.py --preset {tutorial,small64,tiny32,smoke} [--peer] [--repeats N] [--json FILE]

The convolutions are read from the UNet's own forward pass (its jaxpr: shapes, strides, padding, layout, as the train
step computes them), and each distinct one is compiled three times with the train step's XLA options: the
convolution, its gradient with respect to the input, and with respect to the kernel (what autodiff makes of it,
XLA's layout copies included). --peer times the same convolutions in PyTorch (peer_bench.py --conv_layers: conv2d
and aten::convolution_backward on oneDNN, NCHW). Where profile_ops.py says how much of a train step goes to
convolutions, this says which of the three kernels is behind, per shape, and by how much. Times are medians of
--repeats calls after one warm-up, one kernel at a time. The UNet is read as the peer computes it, its upsampling
convolutions on the upsampled input: the train step's weight gradient there is that one, while its forward and
input gradient run folded into a 2x2 convolution at the lower resolution (models/upsample.py; 2.25x fewer FLOPs),
so for those rows this table gives ddpm_jax's kernels at the peer's cost, not at the train step's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import jax_bench, presets, run  # noqa: E402  (jax_bench sets the XLA flags of --preset's UNet)
from ddpm_jax import xla_flags  # noqa: E402

if __name__ == "__main__":  # The kernels run as the train step's do (set before JAX creates its CPU client).
    xla_flags.apply_defaults(inline_dispatch=xla_flags.inline_dispatch_for("train"),
                             legacy_loop_fusion=jax_bench.legacy_loop_fusion_for_argv(sys.argv[1:]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import median_after_warmup  # noqa: E402
from ddpm_jax.models import unet  # noqa: E402

KERNELS = ("forward", "input grad", "weight grad")
NHWC = ("NHWC", "HWIO", "NHWC")


def _subjaxprs(value):
    """The jaxprs inside an equation's parameter (a closed or open jaxpr, or a tuple of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def conv_equations(jaxpr) -> list:
    """Every conv_general_dilated equation of a jaxpr, nested calls (jit, custom_vjp, remat) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                found.extend(conv_equations(sub))
    return found


def describe(eqn) -> dict:
    """A convolution as JSON: input and kernel shapes, strides, padding, dilations, groups, layout check."""
    p = eqn.params
    lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars[:2])
    standard = jax.lax.conv_dimension_numbers(lhs, rhs, NHWC)
    return {"lhs": list(lhs), "rhs": list(rhs), "strides": list(p["window_strides"]),
            "padding": [list(pad) for pad in p["padding"]], "lhs_dilation": list(p["lhs_dilation"]),
            "rhs_dilation": list(p["rhs_dilation"]), "groups": p["feature_group_count"],
            "nhwc": p["dimension_numbers"] == standard and len(lhs) == 4, "dtype": str(eqn.invars[0].aval.dtype),
            "dimension_numbers": p["dimension_numbers"]}


def unet_convolutions(p: presets.Preset, dtype: str) -> list[dict]:
    """The distinct convolutions of the preset's UNet forward pass at its batch, with how often each occurs (the
    upsampling convolutions unfolded, as the peer computes them)."""
    config = jax_bench.benchmark_config(p, dtype, 1)
    model = unet.create_model(config).clone(fold_upsampling=False)
    x = jax.ShapeDtypeStruct((p.batch_size, p.image_size, p.image_size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((p.batch_size,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    jaxpr = jax.make_jaxpr(model.apply)(params, x, t)
    convs: dict[str, dict] = {}
    for eqn in conv_equations(jaxpr.jaxpr):
        d = describe(eqn)
        key = json.dumps(portable([d])[0])
        convs.setdefault(key, {**d, "count": 0})["count"] += 1
    return list(convs.values())


def portable(convs: list[dict]) -> list[dict]:
    """The descriptions without JAX's dimension-numbers object: what the peer's process and --json read."""
    return [{k: v for k, v in c.items() if k != "dimension_numbers"} for c in convs]


def flops(c: dict) -> float:
    """Multiply-adds x 2 of one convolution (each of its three kernels costs the same)."""
    kh, kw, cin, cout = c["rhs"] if c["nhwc"] else (0, 0, 0, 0)
    b = c["lhs"][0]
    out_h = (c["lhs"][1] + sum(c["padding"][0]) - kh) // c["strides"][0] + 1
    out_w = (c["lhs"][2] + sum(c["padding"][1]) - kw) // c["strides"][1] + 1
    return 2.0 * b * out_h * out_w * kh * kw * cin * cout / c["groups"]


def time_ours(c: dict, repeats: int) -> dict[str, float]:
    """Milliseconds of the convolution's forward, input-gradient and weight-gradient kernels as XLA compiles them."""
    dtype = jnp.dtype(c["dtype"])

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, c["strides"], [tuple(pad) for pad in c["padding"]], c["lhs_dilation"], c["rhs_dilation"],
            dimension_numbers=c["dimension_numbers"], feature_group_count=c["groups"])

    def input_grad(x, w, g):
        return jax.vjp(lambda x: conv(x, w), x)[1](g)[0]

    def weight_grad(x, w, g):
        return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], c["lhs"], dtype)
    w = jax.random.normal(keys[1], c["rhs"], dtype)
    g = jax.random.normal(keys[2], jax.eval_shape(conv, x, w).shape, dtype)
    options = xla_flags.train_step_compiler_options(jax.default_backend()) or None
    fns = {"forward": lambda x, w, g: conv(x, w), "input grad": input_grad, "weight grad": weight_grad}
    times = {}
    for name, fn in fns.items():
        compiled = jax.jit(fn).lower(x, w, g).compile(compiler_options=options)
        times[name] = 1e3 * median_after_warmup(functools.partial(_call, compiled, x, w, g), repeats)
    return times


def _call(compiled: Any, *args: jax.Array) -> None:
    """One call of a compiled program, waited for."""
    jax.block_until_ready(compiled(*args))


def label(c: dict) -> str:
    """A convolution in a few words: batch, input size and channels, kernel, output channels, stride."""
    b, h, w, cin = c["lhs"] if c["nhwc"] else (c["lhs"][0], "?", "?", "?")
    kh, kw, _, cout = c["rhs"] if c["nhwc"] else ("?", "?", "?", "?")
    stride = "" if c["strides"] == [1, 1] else f" stride {c['strides'][0]}"
    return f"{b}x{h}x{w}x{cin} -> {cout}, {kh}x{kw}{stride}"


def kernel_totals(convs: list[dict], times: list[dict | None]) -> dict[str, float]:
    """Milliseconds per kernel over one forward + backward: each convolution counted as often as it occurs, those
    without a time (None) left out."""
    return {k: sum(t[k] * c["count"] for c, t in zip(convs, times, strict=True) if t) for k in KERNELS}


def report(convs: list[dict], ours: list[dict], peer: list[dict | None] | None) -> str:
    """A markdown table: per convolution, each kernel's ms (and GFLOP/s) in ddpm_jax, the peer's, and the ratio; then
    the totals per kernel over one forward + backward (over the convolutions both have times for)."""
    head = "| convolution | count | kernel | ddpm_jax ms | GFLOP/s |"
    head += " peer ms | GFLOP/s | peer/ours |" if peer else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, c in enumerate(convs):
        f = flops(c)
        for kernel in KERNELS:
            ms = ours[i][kernel]
            row = f"| {label(c)} | {c['count']} | {kernel} | {ms:.2f} | {f / ms / 1e6:.0f} |"
            if peer:
                theirs = peer[i][kernel] if peer[i] else None
                row += (" - | - | - |" if theirs is None
                        else f" {theirs:.2f} | {f / theirs / 1e6:.0f} | {theirs / ms:.2f}x |")
            lines.append(row)
    both = [t if (peer is None or peer[i]) else None for i, t in enumerate(ours)]
    mine = kernel_totals(convs, both)
    theirs = kernel_totals(convs, peer) if peer else None
    lines.append("")
    lines.append("one forward + backward, each convolution as often as it occurs (ms):")
    for k in (*KERNELS, "all"):
        ours_ms = sum(mine.values()) if k == "all" else mine[k]
        line = f"  {k}: ddpm_jax {ours_ms:.1f}"
        if theirs:
            peer_ms = sum(theirs.values()) if k == "all" else theirs[k]
            line += f", peer {peer_ms:.1f} (peer/ours {peer_ms / ours_ms:.2f}x)"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    """Times each convolution of the preset's UNet in ddpm_jax and, with --peer, in PyTorch, and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per kernel (the median is reported)")
    parser.add_argument("--peer", action="store_true", help="also time the same convolutions in PyTorch")
    parser.add_argument("--peer_python", default=os.environ.get("DDPM_JAX_PEER_PYTHON", sys.executable))
    parser.add_argument("--json", default="", help="also write the shapes and times to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1, got {args.repeats}")
    if args.peer and args.dtype != "float32":
        raise SystemExit("error: --peer times PyTorch's float32 convolutions; compare them with --dtype float32")
    if args.peer:
        run.check_peer_python(args.peer_python)
    p = presets.get(args.preset)
    convs = unet_convolutions(p, args.dtype)
    ours = [time_ours(c, args.repeats) for c in convs]
    peer = None
    if args.peer:
        shapes = json.dumps(portable(convs))
        peer = run.run_child(args.peer_python, "peer_bench.py", f"--preset={p.name}", f"--conv_layers={shapes}",
                             f"--repeats={args.repeats}")["conv_layers"]
    print(f"{run.cpu_name()}, {os.cpu_count()} cores ({run.cpu_flags()}); ddpm_jax / jax {jax.__version__} "
          f"({jax.default_backend()}, {args.dtype}); preset {p.name}, batch {p.batch_size}")
    print(report(convs, ours, peer))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": p.name, "device": run.cpu_name(), "cpu_flags": run.cpu_flags(),
                       "convolutions": portable(convs),
                       "ours_ms": ours, "peer_ms": peer}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
