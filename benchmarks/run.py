"""Benchmark harness: ddpm_jax against the diffusers peer on the UNets of DESIGN.md §5, measured in one run.

    python benchmarks/run.py --preset {tutorial,small64,tiny32} [--json] [--peer] [--dtype bfloat16]
                             [--steps_per_dispatch K] [--rounds N]

Each measurement runs in its own process, one after another (never two at once: the machine has few cores), so that
peak memory is per framework: this machine's ceilings (ceiling.py), the input pipeline (pipeline_bench.py), ddpm_jax's
train step (jax_bench.py, on the devices --mode=train uses), its sampler (jax_bench.py --sampling_only, on the devices
--mode=sample uses: one per CPU core; ddpm_jax's peak RSS is the larger process's) and, with --peer, diffusers
UNet2DModel + DDPMScheduler on PyTorch (peer_bench.py, run with --peer_python or $DDPM_JAX_PEER_PYTHON, a Python with
`torch==2.13.0 diffusers`). Times are medians of repeated runs with compilation and warm-up excluded. --rounds N
measures both frameworks N times, alternating, and reports the medians (peak RSS: the largest) and each round's
ratios: single runs of either framework move by 10-20% on shared VMs. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import presets  # noqa: E402


def run_child(python: str, script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Runs benchmarks/<script> in a fresh process (with `env`, else ours) and returns the JSON object on the last
    line of its stdout."""
    cmd = [python, os.path.join(HERE, script), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"error: {' '.join(cmd)} failed with exit code {proc.returncode}; its stderr is above")
    return json.loads(lines[-1])


def check_peer_python(python: str) -> None:
    """Fails at once, before any measurement, when the peer's Python cannot import torch and diffusers."""
    probe = subprocess.run([python, "-c", "import torch, diffusers"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise SystemExit(
            f"error: --peer needs a Python with torch and diffusers, and {python} has not got them "
            f"({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'import failed'}). Make one: "
            "python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 diffusers, then pass "
            "--peer_python=/tmp/peer/bin/python"
        )


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The vector-unit flags that decide the kernels' speed (avx2, fma, avx512*), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "flags unknown"
    return " ".join(sorted(f for f in set(flags) if f.startswith("avx512") or f in ("avx2", "fma", "amx_bf16")))


def merge_sampling(train: dict, sampling: dict) -> dict:
    """Our figures from the train process and the sampling process: sampling's speed, devices and compile time, and
    the peak RSS of the larger process (each mode runs in a process of its own)."""
    merged = {**train, **{k: sampling[k] for k in ("sample_s_per_step", "sample_devices", "sample_compile_s")}}
    merged["train_peak_rss_mib"] = train["peak_rss_mib"]
    merged["sample_peak_rss_mib"] = sampling["peak_rss_mib"]
    merged["peak_rss_mib"] = max(train["peak_rss_mib"], sampling["peak_rss_mib"])
    return merged


def median_of_rounds(rounds: list[dict]) -> dict:
    """One framework's rounds as one measurement: each number the median over the rounds, each peak RSS the largest,
    everything else (names, shapes) from the first round."""
    merged = dict(rounds[0])
    for key, value in rounds[0].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values = [r[key] for r in rounds if isinstance(r.get(key), (int, float))]
        if key.endswith("peak_rss_mib"):
            merged[key] = max(values)
        elif len(set(values)) > 1:  # Counts that every round shares (devices, params) stay as they are.
            merged[key] = statistics.median(values)
    return merged


def round_ratios(ours: list[dict], peer: list[dict]) -> dict[str, list[float]]:
    """Each round's speed ratios (sampling: the peer's time over ours), to show how far single runs spread."""
    ratios = {"train": [o["train_img_s"] / p["train_img_s"] for o, p in zip(ours, peer, strict=True)]}
    if all(o.get("sample_s_per_step") for o in ours):
        ratios["sample"] = [p["sample_s_per_step"] / o["sample_s_per_step"] for o, p in zip(ours, peer, strict=True)]
    return ratios


def summarize(preset: presets.Preset, ceilings: dict, pipeline: dict | None, ours: dict, peer: dict | None,
              dtype: str) -> dict:
    """The report: our figures, achieved GFLOP/s against the measured ceiling, and the ratios to the peer."""
    ceiling = ceilings["matmul_bf16"] if dtype == "bfloat16" else max(ceilings["matmul_f32"],
                                                                       ceilings["conv_f32_fwd_bwd"])
    gflop_s = ours["flops_per_image"] * ours["train_img_s"] / 1e9
    report = {
        "preset": preset.name,
        "date": datetime.date.today().isoformat(),
        "device": f"{cpu_name()}, {os.cpu_count()} cores",
        **{k: ours[k] for k in ("framework", "params", "train_img_s", "train_step_s", "compile_s", "peak_rss_mib",
                                "flops_per_image", "steps_per_dispatch", "dtype", "loss") if k in ours},
        **{k: ours.get(k) for k in ("sample_s_per_step", "sample_devices", "sample_compile_s", "train_peak_rss_mib",
                                    "sample_peak_rss_mib")},
        "gflop_s": gflop_s,
        "ceiling_gflop_s": ceiling,
        "fraction_of_ceiling": gflop_s / ceiling,
        "ceilings": ceilings,
    }
    if pipeline is not None:
        report["pipeline_batches_img_s"] = pipeline["batches_img_s"]
        report["pipeline_decode_img_s"] = pipeline["decode_img_s"]
        report["pipeline_over_train"] = pipeline["batches_img_s"] / ours["train_img_s"]
    if peer is not None:
        report["peer"] = {**peer, "gflop_s": ours["flops_per_image"] * peer["train_img_s"] / 1e9}
        report["train_speedup"] = ours["train_img_s"] / peer["train_img_s"]
        if ours.get("sample_s_per_step"):
            report["sample_speedup"] = peer["sample_s_per_step"] / ours["sample_s_per_step"]
        report["memory_ratio"] = ours["peak_rss_mib"] / peer["peak_rss_mib"]
    return report


def print_report(r: dict) -> None:
    """Human-readable lines of the report."""
    print(f"preset {r['preset']} on {r['device']}, {r['date']}: {r['framework']}, {r['params'] / 1e6:.2f} M params, "
          f"{r['flops_per_image'] / 1e9:.2f} GFLOP per training image")
    print(f"  ceilings (GFLOP/s): matmul f32 {r['ceilings']['matmul_f32']:.0f}, conv f32 fwd+bwd "
          f"{r['ceilings']['conv_f32_fwd_bwd']:.0f}, matmul bf16 {r['ceilings']['matmul_bf16']:.0f}")
    sample = ""
    if r["sample_s_per_step"]:
        sample = (f", sampling {r['sample_s_per_step']:.3f} s/step on {r['sample_devices']} device(s) "
                  f"(compile {r['sample_compile_s']:.1f} s, peak RSS {r['sample_peak_rss_mib']:.0f} MiB)")
    print(f"  ddpm_jax: train {r['train_img_s']:.2f} img/s ({r['gflop_s']:.1f} GFLOP/s, "
          f"{100 * r['fraction_of_ceiling']:.0f}% of ceiling), compile {r['compile_s']:.1f} s, "
          f"peak RSS {r.get('train_peak_rss_mib') or r['peak_rss_mib']:.0f} MiB{sample}")
    if "pipeline_batches_img_s" in r:
        print(f"  input pipeline: {r['pipeline_batches_img_s']:.0f} img/s of batches ({r['pipeline_over_train']:.0f}x "
              f"the train throughput), decoding {r['pipeline_decode_img_s']:.0f} img/s")
    if "peer" in r:
        p = r["peer"]
        print(f"  peer {p['framework']}: train {p['train_img_s']:.2f} img/s ({p['gflop_s']:.1f} GFLOP/s), "
              f"sampling {p['sample_s_per_step']:.3f} s/step, peak RSS {p['peak_rss_mib']:.0f} MiB")
        sample_ratio = f", sampling {r['sample_speedup']:.2f}x" if "sample_speedup" in r else ""
        rounds = f" (medians of {r['rounds']} rounds)" if r.get("rounds", 1) > 1 else ""
        print(f"  ddpm_jax / peer{rounds}: train {r['train_speedup']:.2f}x{sample_ratio}, "
              f"memory {r['memory_ratio']:.2f}x")
        for name, ratios in r.get("round_ratios", {}).items():
            print(f"    {name} by round: {', '.join(f'{x:.2f}x' for x in ratios)}")


def main() -> None:
    """Parses the flags, runs each measurement in turn and prints the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    parser.add_argument("--peer", action="store_true", help="also run the diffusers peer and print the ratios")
    parser.add_argument("--peer_python", default=os.environ.get("DDPM_JAX_PEER_PYTHON", sys.executable))
    parser.add_argument("--peer_compile", action="store_true", help="torch.compile the peer's UNet")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="ddpm_jax compute dtype")
    parser.add_argument("--steps_per_dispatch", type=int, default=1)
    parser.add_argument("--skip_sampling", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="measure both frameworks N times, alternating")
    args = parser.parse_args()
    preset = presets.get(args.preset)
    if args.steps_per_dispatch < 1:
        raise SystemExit(f"error: --steps_per_dispatch must be >= 1, got {args.steps_per_dispatch}")
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds must be >= 1, got {args.rounds}")
    if args.peer:
        check_peer_python(args.peer_python)

    py = sys.executable
    ceilings = run_child(py, "ceiling.py")
    try:
        pipeline = run_child(py, "pipeline_bench.py", f"--preset={preset.name}")
    except SystemExit as e:
        print(f"skipping the input pipeline: {e}", file=sys.stderr)
        pipeline = None
    ours_args = [f"--preset={preset.name}", f"--dtype={args.dtype}", f"--steps_per_dispatch={args.steps_per_dispatch}"]
    ours_rounds, peer_rounds = [], []
    for _ in range(args.rounds):
        ours = run_child(py, "jax_bench.py", *ours_args, "--skip_sampling")
        if not args.skip_sampling:
            ours = merge_sampling(ours, run_child(py, "jax_bench.py", f"--preset={preset.name}",
                                                  f"--dtype={args.dtype}", "--sampling_only"))
        ours_rounds.append(ours)
        if args.peer:
            peer_rounds.append(run_child(args.peer_python, "peer_bench.py", f"--preset={preset.name}",
                                         *(["--compile"] if args.peer_compile else [])))
    peer = median_of_rounds(peer_rounds) if peer_rounds else None
    report = summarize(preset, ceilings, pipeline, median_of_rounds(ours_rounds), peer, args.dtype)
    report["rounds"] = args.rounds
    if peer_rounds and args.rounds > 1:
        report["round_ratios"] = round_ratios(ours_rounds, peer_rounds)
    print_report(report)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
