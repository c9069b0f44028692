"""XLA flags measured against the defaults, in one run: train img/s, sampling s/step, compile time and peak RSS.

    python benchmarks/flag_sweep.py --preset tiny32 --flags=--xla_cpu_prefer_vector_width=512 [--flags=...]
                                    [--rounds 2] [--skip_sampling] [--json FILE]

Each variant is one value of XLA_FLAGS added to what `python -m ddpm_jax.main` runs with (ddpm_jax/xla_flags.py's
defaults stay on unless a variant sets the same flag). Every round runs the defaults and then every variant, each in
its own process (benchmarks/jax_bench.py), one after another; ratios are a variant's median over the rounds against
the defaults' median, so a drift of the machine during the run shows in both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import presets, run  # noqa: E402

DEFAULTS = "(defaults)"


def bench(preset: str, flags: str, skip_sampling: bool) -> dict:
    """One jax_bench.py run with `flags` added to XLA_FLAGS."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    try:
        return run.run_child(sys.executable, "jax_bench.py", f"--preset={preset}",
                             *(["--skip_sampling"] if skip_sampling else []), env=env)
    except SystemExit as e:
        raise SystemExit(f"{e} (XLA_FLAGS='{env['XLA_FLAGS']}'; an XLA that does not know a flag aborts)") from None


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per variant: medians, and ratios against the defaults (speed ratios: above 1 is faster)."""
    def med(rs: list[dict], key: str) -> float | None:
        values = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(values) if values else None

    base = runs[DEFAULTS]
    out = []
    for flags, rs in runs.items():
        row = {"flags": flags, "train_img_s": med(rs, "train_img_s"), "sample_s_per_step": med(rs, "sample_s_per_step"),
               "compile_s": med(rs, "compile_s"), "peak_rss_mib": med(rs, "peak_rss_mib"), "runs": len(rs)}
        row["train_ratio"] = row["train_img_s"] / med(base, "train_img_s")
        b = med(base, "sample_s_per_step")
        row["sample_ratio"] = b / row["sample_s_per_step"] if b and row["sample_s_per_step"] else None
        out.append(row)
    return out


def format_table(rows: list[dict]) -> str:
    """The sweep as a Markdown table."""
    lines = ["| XLA flags | train img/s | ratio | sampling s/step | ratio | compile s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sample = f"{r['sample_s_per_step']:.4f} | {r['sample_ratio']:.2f}x" if r["sample_ratio"] else " | "
        lines.append(f"| `{r['flags']}` | {r['train_img_s']:.1f} | {r['train_ratio']:.2f}x | {sample} | "
                     f"{r['compile_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Runs the rounds and prints the table (and writes --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--flags", action="append", default=[], help="one variant's XLA flags (repeatable)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip_sampling", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not args.flags or args.rounds < 1:
        raise SystemExit("error: give at least one --flags=... variant and --rounds >= 1")
    runs: dict[str, list[dict]] = {DEFAULTS: [], **{f: [] for f in args.flags}}
    for round_ in range(args.rounds):
        for flags in runs:
            r = bench(args.preset, "" if flags == DEFAULTS else flags, args.skip_sampling)
            runs[flags].append(r)
            print(f"round {round_ + 1}: {flags}: {r['train_img_s']:.1f} img/s", flush=True)
    rows = summarize(runs)
    print(f"{run.cpu_name()}, {os.cpu_count()} cores ({run.cpu_flags()}); preset {args.preset}, "
          f"{args.rounds} rounds")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "device": run.cpu_name(), "cpu_flags": run.cpu_flags(), "rows": rows,
                       "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
