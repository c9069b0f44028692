"""The GPU check: what an H100/H200 gives, in one run of a few minutes (benchmarks/gpu_check.sh runs it).

    python benchmarks/gpu_check.py [--out DIR] [--dry_run] [--quickstart_data DIR]

Prints, each from its own process (benchmarks/jax_bench.py, then `python -m ddpm_jax.main`):
  - the tutorial preset (113.7 M parameters, 128x128) at batch 64 in bfloat16 and in float32: img/s, model-FLOPs
    utilisation against the GPU's tensor-core peak (benchmarks/jax_bench.PEAK_TFLOPS), compile time, peak device
    memory; sampling s/step in bfloat16;
  - small64 and tiny32 at their preset batches: img/s and sampling s/step;
  - the quickstart (configs/quickstart.py) trained and sampled to a grid: seconds and the grid's path.
--dry_run runs every part with the smoke preset's UNet (16x16, two levels) at batch 2 on whatever device there is
(CI runs it on the CPU) and a 10-step quickstart: it checks the script, not the GPU. Results go to
DIR/gpu_check.json and the console (Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks import run  # noqa: E402

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# (label, preset, dtype, batch (0: the preset's), timed train steps, sampler steps (0: no sampling)).
PARTS = [
    ("tutorial b64 bf16", "tutorial", "bfloat16", 64, 10, 5),
    ("tutorial b64 f32", "tutorial", "float32", 64, 10, 0),
    ("small64", "small64", "float32", 0, 20, 10),
    ("tiny32", "tiny32", "float32", 0, 30, 20),
]


def bench_args(part: tuple, dry_run: bool) -> list[str]:
    """jax_bench.py's flags for one part; a dry run swaps in the smoke UNet at batch 2 with 2 steps of each."""
    _, preset, dtype, batch, repeats, sample_steps = part
    if dry_run:
        preset, batch, repeats, sample_steps = "smoke", 2, 2, min(sample_steps, 2)
    args = [f"--preset={preset}", f"--dtype={dtype}", f"--train_repeats={repeats}"]
    args += [f"--batch_size={batch}"] if batch else []
    args += [f"--sample_steps={sample_steps}"] if sample_steps else ["--skip_sampling"]
    return args


def check_device(python: str, dry_run: bool) -> str:
    """The first device's platform and kind; stops with one line when a real check finds no GPU."""
    probe = subprocess.run([python, "-c", "import jax; d = jax.devices()[0]; print(d.platform, '|', d.device_kind)"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise SystemExit(f"error: {python} cannot import jax: {probe.stderr.strip().splitlines()[-1:]}")
    line = probe.stdout.strip().splitlines()[-1]
    if not dry_run and not line.startswith("gpu"):
        raise SystemExit(f"error: the GPU check needs a GPU and jax sees '{line}'; install jax for CUDA (bash "
                         "launch/gpu_host.sh install makes .venv with jax[cuda12]), or check the script with --dry_run")
    return line


def quickstart_data(explicit: str) -> str | None:
    """The quickstart's dataset: --quickstart_data, else Debian's Fashion-MNIST (installed when missing and root)."""
    if explicit:
        return explicit
    if not os.path.isfile(os.path.join(FASHION_MNIST, "train-images-idx3-ubyte.gz")) and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], capture_output=True, check=False)
    return FASHION_MNIST if os.path.isdir(FASHION_MNIST) else None


def run_quickstart(python: str, workdir: str, dataset: str, dry_run: bool) -> dict:
    """Trains configs/quickstart.py and samples it: seconds of each and the grid's path."""
    flags = [f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}", f"--workdir={workdir}",
             f"--config.data.dataset={dataset}"]
    if dry_run:
        flags += ["--config.training.num_train_steps=10", "--config.training.sample_every_steps=0",
                  "--config.training.checkpoint_every_steps=10", "--config.sampling.num_samples=8",
                  "--config.sampling.num_steps=5"]
    result = {}
    for mode in ("train", "sample"):
        start = time.perf_counter()
        proc = subprocess.run([python, "-m", "ddpm_jax.main", *flags, f"--mode={mode}"], cwd=REPO,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"error: the quickstart's --mode={mode} failed with exit code {proc.returncode}")
        result[f"{mode}_s"] = time.perf_counter() - start
        grid = re.search(r"sample grid: (\S+)", proc.stdout + proc.stderr)
        if grid:
            result["grid"] = grid.group(1)
    return result


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    """The bench parts as a Markdown table."""
    lines = ["| part | batch | img/s | MFU | compile s | peak device MiB | sample s/step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['batch_size']} | {r['train_img_s']:.1f} | {_fmt(r['mfu'], '.1%')} | "
                     f"{r['compile_s']:.1f} | {_fmt(r['peak_device_mib'], '.0f')} | "
                     f"{_fmt(r.get('sample_s_per_step'), '.4f')} |")
    return "\n".join(lines)


def main() -> None:
    """Runs every part one after another, prints the table and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="where gpu_check.json and the quickstart's workdir go")
    parser.add_argument("--dry_run", action="store_true", help="tiny parts on any device: checks the script")
    parser.add_argument("--quickstart_data", default="", help="the quickstart's images (default: Fashion-MNIST)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out, exist_ok=True)
    python = sys.executable
    started = time.perf_counter()
    device = check_device(python, args.dry_run)
    print(f"device: {device}; host: {run.cpu_name()}, {os.cpu_count()} cores" + (" (dry run)" if args.dry_run else ""),
          flush=True)
    results = []
    for part in PARTS:
        r = run.run_child(python, "jax_bench.py", *bench_args(part, args.dry_run))
        r["label"] = part[0]
        results.append(r)
        print(f"{part[0]}: {r['train_img_s']:.1f} img/s, compile {r['compile_s']:.1f} s "
              f"({time.perf_counter() - started:.0f} s so far)", flush=True)
    dataset = quickstart_data(args.quickstart_data)
    quickstart = None
    if dataset is None:
        print(f"quickstart: skipped, no dataset ({FASHION_MNIST} missing; pass --quickstart_data=DIR)")
    else:
        quickstart = run_quickstart(python, os.path.join(out, "quickstart"), dataset, args.dry_run)
        print(f"quickstart: trained in {quickstart['train_s']:.0f} s, sampled in {quickstart['sample_s']:.0f} s; "
              f"sample grid: {quickstart.get('grid', '(not found in the log)')}")
    print(format_table(results))
    report = {"device": device, "host": run.cpu_name(), "dry_run": args.dry_run, "parts": results,
              "quickstart": quickstart, "total_s": time.perf_counter() - started}
    path = os.path.join(out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"total {report['total_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
