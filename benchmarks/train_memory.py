"""What the compiled train step holds at its memory peak: XLA's buffer sizes and the buffers live at the liveness peak.

    python benchmarks/train_memory.py --preset {tutorial,small64,tiny32,smoke} [--top 15] [--json FILE]

Compiles the preset's train step (what --mode=train runs, on abstract inputs: nothing is computed) with an XLA dump,
prints `memory_analysis()` (the state, donated and updated in place, and the step's temporary buffers) and reads the
dump's live ranges: the buffers live at the peak of the scheduled program, grouped by pass (forward: under `jvp` in
the JAX name stack, kept for the backward pass; backward: under `transpose(jvp)`; state: the step's inputs; layout:
copies XLA inserts, which carry no name) and by the kind of instruction that made them. This is how the
GroupNorm -> swish -> conv op of ddpm_jax/models/norm_conv.py was found (README "Performance").
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ddpm_jax import xla_flags  # noqa: E402

MiB = 2**20


def liveness_peak(live_range_text: str) -> tuple[int, list[tuple[str, int]]]:
    """(position, [(buffer, bytes)]) of the peak in an XLA `*-live-range.txt` dump."""
    m = re.search(r"Live ranges at (\d+) \(peak\):\n(.*?)(?:\n\s*Stack trace|\Z)", live_range_text, re.S)
    if not m:
        raise SystemExit("error: the XLA dump has no 'Live ranges at N (peak)' section (an XLA that does not write it)")
    buffers = re.findall(r"^\s+(\S+?)\{[^}]*\}: (\d+) bytes", m.group(2), re.M)
    return int(m.group(1)), [(name, int(size)) for name, size in buffers]


def instruction_names(hlo_text: str) -> dict[str, str]:
    """Each instruction of an optimized HLO dump -> its JAX op_name ("" when XLA made it, e.g. a layout copy)."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*", hlo_text, re.M):
        op = re.search(r'op_name="([^"]*)"', m.group(0))
        names.setdefault(m.group(1), op.group(1) if op else "")
    return names


def classify(buffer: str, op_name: str, parameters: set[str]) -> tuple[str, str]:
    """(pass, kind) of one buffer: its pass from the name stack, its kind from the instruction's name."""
    kind = re.sub(r"(\.\d+)+$", "", buffer)
    if buffer in parameters:
        return "state", "parameter"
    if "transpose(jvp" in op_name:
        return "backward", kind
    if "jvp(" in op_name:
        return "forward (kept)", kind
    return ("layout" if not op_name else "other"), kind


def analyse(dump_dir: str, top: int) -> dict:
    """The liveness peak of the train step's dump in dump_dir, grouped and its largest buffers."""
    def one(pattern: str) -> str:
        paths = glob.glob(os.path.join(dump_dir, f"*jit_train_step.{pattern}"))
        if not paths:
            raise SystemExit(f"error: XLA wrote no *jit_train_step.{pattern} under {dump_dir}")
        with open(paths[0]) as f:
            return f.read()

    hlo = one("*after_optimizations.txt")  # cpu_ or gpu_, by backend.
    names = instruction_names(hlo)
    entry = hlo[hlo.index("ENTRY"):]
    parameters = set(re.findall(r"^\s*%?([\w.\-]+) = \S+ parameter\(", entry, re.M))
    position, live = liveness_peak(one("*after_optimizations-live-range.txt"))
    groups: collections.Counter = collections.Counter()
    rows = []
    for buffer, size in live:
        pass_, kind = classify(buffer, names.get(buffer, ""), parameters)
        groups[(pass_, kind)] += size
        rows.append({"buffer": buffer, "mib": size / MiB, "pass": pass_, "op_name": names.get(buffer, "")})
    rows.sort(key=lambda r: -r["mib"])
    return {"peak_position": position, "live_mib": sum(s for _, s in live) / MiB, "buffers": len(live),
            "groups": [{"pass": p, "kind": k, "mib": v / MiB} for (p, k), v in groups.most_common()],
            "top": rows[:top]}


def format_report(r: dict, top: int) -> str:
    """The analysis as two Markdown tables."""
    lines = [f"{r['preset']} train step (batch {r['batch']}): state {r['state_mib']:.1f} MiB, temporary buffers "
             f"{r['temp_mib']:.1f} MiB (memory_analysis); at the liveness peak (instruction {r['peak_position']}) "
             f"{r['live_mib']:.1f} MiB in {r['buffers']} buffers", "", "| MiB | pass | made by |", "|---:|---|---|"]
    lines += [f"| {g['mib']:.1f} | {g['pass']} | {g['kind']} |" for g in r["groups"][:top]]
    lines += ["", "| MiB | pass | buffer | op |", "|---:|---|---|---|"]
    lines += [f"| {t['mib']:.1f} | {t['pass']} | {t['buffer']} | {t['op_name'][-80:]} |" for t in r["top"]]
    return "\n".join(lines)


def main() -> None:
    """Compiles the step with a dump in a temporary directory, prints the report (and writes --json)."""
    from benchmarks import presets  # Imports no JAX.

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--top", type=int, default=15, help="rows of each table")
    parser.add_argument("--json", default="", help="also write the report to this file")
    args = parser.parse_args()
    p = presets.get(args.preset)
    with tempfile.TemporaryDirectory() as dump_dir:
        xla_flags.apply_defaults()
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} "
                                   "--xla_dump_hlo_module_re=train_step").strip()
        import jax

        from benchmarks import jax_bench
        from ddpm_jax import parallel, train, train_state
        from ddpm_jax.models import unet

        config = jax_bench.benchmark_config(p, "float32", 1)
        mesh = parallel.make_mesh()
        model = unet.create_model(config)
        state = train_state.abstract_train_state(config, model, train_state.create_optimizer(config), mesh)
        compiled = train.compile_train_step(train.make_train_step(config, model, mesh), state,
                                            train.batch_spec(config, mesh))
        m = compiled.memory_analysis()
        report = {"preset": p.name, "batch": p.batch_size, "device": jax.devices()[0].device_kind,
                  "state_mib": train_state.state_bytes(state) / MiB, "temp_mib": m.temp_size_in_bytes / MiB,
                  "argument_mib": m.argument_size_in_bytes / MiB, "alias_mib": m.alias_size_in_bytes / MiB,
                  **analyse(dump_dir, args.top)}
    print(format_report(report, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
