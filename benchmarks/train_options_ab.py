"""The product's train step against the same step with other XLA compile options or UNet fields, A/B in one process.

    python benchmarks/train_options_ab.py --preset tiny32 [--option KEY=VALUE ...] [--model FIELD=VALUE ...]
        [--kernel_gradient {auto,autodiff,swapped}] [--rounds 8] [--steps 10]

Without --option the variant is the step without its own compile options (xla_flags.train_step_compiler_options),
i.e. YNNPACK for convolutions and dots only, as the process-wide XLA flag sets it; with --model only (e.g.
`--model fused_norm_conv=false`) or --kernel_gradient only (the 3x3 kernel gradients' form,
models/conv_weight_grad.py), the product's options on a UNet with those fields or that form. Both
programs advance one state on fixed synthetic images; rounds alternate their order, so a drift of the machine shows
in both. Prints one JSON object: img/s per round, medians, the speed ratio (product over variant) and how many
reductions each program hands to YNNPACK, which shows that the options reached the compiler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import jax_bench, presets  # noqa: E402  (jax_bench applies the product's XLA flags)
from ddpm_jax import train, xla_flags  # noqa: E402
from ddpm_jax.models import conv_weight_grad  # noqa: E402


def ynn_reductions(compiled) -> int:
    """Reductions in a compiled CPU program that run as YNNPACK fusions (by the op each fusion was made from: an
    operand's name may say reduce_sum too)."""
    return sum('"kind":"__ynn_fusion"' in line and "reduce_sum" in "".join(re.findall(r'op_name="([^"]*)"', line))
               for line in compiled.as_text().splitlines())


@contextlib.contextmanager
def kernel_gradient_form(form: str):
    """Traces inside this block use that form of the 3x3 kernel gradients ("" leaves the environment as it is)."""
    before = os.environ.get(conv_weight_grad.OVERRIDE_ENV)
    if form:
        os.environ[conv_weight_grad.OVERRIDE_ENV] = form
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(conv_weight_grad.OVERRIDE_ENV, None)
        else:
            os.environ[conv_weight_grad.OVERRIDE_ENV] = before


def parse_options(items: list[str]) -> dict[str, str]:
    """KEY=VALUE strings as a compile-options dict; without any, the YNN fusion type of the process-wide flag."""
    if not items:
        return {xla_flags.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT"}
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --option {item!r} is not KEY=VALUE, e.g. {xla_flags.YNN_FUSION_FLAG}=...")
        options[key] = value
    return options


def parse_model_fields(items: list[str]) -> dict[str, bool | int]:
    """FIELD=VALUE strings as UNet fields: true/false as booleans, digits as ints."""
    fields: dict[str, bool | int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --model {item!r} is not FIELD=VALUE, e.g. fused_norm_conv=false")
        lowered = value.lower()
        fields[key] = lowered == "true" if lowered in ("true", "false") else int(value)
    return fields


def main() -> None:
    """Times both programs in alternating rounds and prints the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE compile option of the variant")
    parser.add_argument("--model", action="append", default=[], help="FIELD=VALUE UNet field of the variant")
    parser.add_argument("--kernel_gradient", default="", choices=["", *conv_weight_grad.FORMS],
                        help="the variant's form of the 3x3 kernel gradients (the product's: auto, by shape)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="train steps per program per round")
    args = parser.parse_args()
    # The train step runs as --mode=train runs it (before JAX creates its CPU client).
    xla_flags.apply_defaults(inline_dispatch=xla_flags.inline_dispatch_for("train"))
    fields = parse_model_fields(args.model)
    p = presets.get(args.preset)
    bench = jax_bench.setup(p, "float32", 1)
    if args.option or not (fields or args.kernel_gradient):
        options = parse_options(args.option)
    else:
        options = xla_flags.train_step_compiler_options(jax.default_backend())
    try:
        model = bench.model.clone(**fields)
    except TypeError as e:
        raise SystemExit(f"error: --model: {e}") from None
    with kernel_gradient_form(args.kernel_gradient):
        variant = train.make_train_step(bench.config, model, bench.mesh).lower(bench.state, bench.batch).compile(
            compiler_options=options or None)
    programs = {"product": bench.step, "variant": variant}
    img_s: dict[str, list[float]] = {name: [] for name in programs}

    def run(name: str, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            bench.state, scalars = programs[name](bench.state, bench.batch)
        jax.block_until_ready(scalars["loss"])
        return p.batch_size * steps / (time.perf_counter() - start)

    for name in programs:  # Warm-up.
        run(name, 2)
    for r in range(args.rounds):
        for name in (programs if r % 2 == 0 else reversed(list(programs))):
            img_s[name].append(run(name, args.steps))
    medians = {name: statistics.median(v) for name, v in img_s.items()}
    print(json.dumps({
        "preset": p.name, "product_options": xla_flags.train_step_compiler_options(jax.default_backend()),
        "variant_options": options, "variant_model_fields": fields,
        "variant_kernel_gradient": args.kernel_gradient or "auto",
        "median_img_s": medians, "speed_ratio": medians["product"] / medians["variant"],
        "ynn_reductions": {"product": ynn_reductions(bench.step), "variant": ynn_reductions(variant)},
        "img_s": img_s,
    }))


if __name__ == "__main__":
    main()
