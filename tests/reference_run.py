"""A fixed 30-step run through `python -m ddpm_jax.main`, recorded before the house refactor (issue 12) and again
after the GroupNorm rewrite, after the folded upsampling convolution, after the train step's YNNPACK reductions and
after the GroupNorm -> swish -> conv op and after loop fusions moved to XLA:CPU's LLVM IR emitter (issue 14), which
changed the summation order of the statistics, convolutions and gradients or the code of elementwise kernels; each
new recording first matched the one before within the tolerance of tests/test_main.py (the folded convolution's:
identical samples, every leaf's mean and norm within 0.5% of it; the fused op's: identical samples, within 0.23% of
it; the LLVM IR emitter's: identical samples, within 0.33% of it; the last three were recorded on a Zen 4 VM, the
ones before on an AVX2 one).

The same commands must give bitwise-identical arrays after any change that claims to keep behaviour and numerics:
the final checkpoint (params, EMA, Adam moments, step), the sample grid written during training and 8 DDIM samples
from `--mode=sample`. It uses only the command line and Orbax's raw restore, never ddpm_jax's Python API, so it runs
unchanged on code whose modules have moved.

    python tests/reference_run.py --butterflies ../shared/data/butterflies --out tests/data/reference_run.npz

writes the fixture that tests/test_reference_run.py compares against: the samples themselves and a SHA-256 of every
leaf of the checkpoint, with the CPU and library versions it was recorded on (float results may differ in the last
bits on another CPU kind or XLA release; the test then compares values within a tolerance instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 30
# The quickstart with a tiny UNet; dropout and flips on, so that every random stream of the train step is used.
# MODEL fixes every compiled program; the CLI tests use it too, so that their programs come from one cache.
MODEL = {
    "data.image_size": 8, "model.ch": 8, "model.ch_mult": (1, 2), "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,), "model.num_groups": 4, "model.dropout": 0.1, "diffusion.num_timesteps": 50,
    "training.batch_size": 8, "sampling.method": "ddim", "sampling.num_steps": 5, "sampling.num_samples": 8,
    "sampling.num_intermediates": 3,
    # Pinned to the values it was recorded with, so that the quickstart's defaults can move on without it.
    "training.loss_weighting": "none", "sampling.timestep_spacing": "linspace", "sampling.eta": 0.0,
    "training.ema_decay": 0.995,
}


def flag(key: str, value: object) -> str:
    """--config.KEY=VALUE as the command line takes it; tuples as (a,b) or (a,)."""
    if isinstance(value, tuple):
        value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return f"--config.{key}={value}"


MODEL_FLAGS = [flag(k, v) for k, v in MODEL.items()]
FLAGS = [
    *MODEL_FLAGS, f"--config.training.num_train_steps={NUM_STEPS}", "--config.training.log_every_steps=10",
    f"--config.training.checkpoint_every_steps={NUM_STEPS}", f"--config.training.sample_every_steps={NUM_STEPS}",
]


def run_main(workdir: pathlib.Path, butterflies: str, *flags: str) -> subprocess.CompletedProcess:
    """Runs the CLI on 2 fake CPU devices with the default XLA flags, as a user would."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "ddpm_jax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
           f"--config.data.dataset={butterflies}", *FLAGS, *flags]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return result


def checkpoint_arrays(step_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every leaf of the saved train state, by key path, read with Orbax's raw restore (no target, no ddpm_jax)."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(step_dir / "state").item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    tree = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    flat = {}

    def visit(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k in sorted(node):
                visit(f"{prefix}/{k}" if prefix else str(k), node[k])
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                visit(f"{prefix}/{i}", v)
        elif node is not None:
            flat[prefix] = np.asarray(node)

    visit("", tree)
    return flat


def record(workdir: pathlib.Path, butterflies: str) -> dict[str, np.ndarray]:
    """Trains, samples, and returns {"state/<path>": leaf, "train_grid": uint8, "samples": uint8}."""
    run_main(workdir, butterflies)
    run_main(workdir, butterflies, "--mode=sample")
    samples_dir = workdir / "samples"
    arrays = {f"state/{k}": v for k, v in checkpoint_arrays(workdir / "checkpoints" / str(NUM_STEPS)).items()}
    arrays["train_grid"] = np.load(samples_dir / f"step_{NUM_STEPS:07d}.npz")["samples"]
    arrays["samples"] = np.load(samples_dir / f"step_{NUM_STEPS:07d}_ddim5_eta0.npz")["samples"]
    return arrays


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def machine() -> dict[str, str]:
    """What float results depend on: the CPU model and vector extensions, and the jax/jaxlib versions."""
    from importlib.metadata import version

    flags, model = "", platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma"))))
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": flags, "jax": version("jax"), "jaxlib": version("jaxlib")}


def main() -> None:
    """Records the reference run and writes the fixture."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--butterflies", default=str(REPO.parent / "shared" / "data" / "butterflies"))
    parser.add_argument("--workdir", default="/tmp/ddpm_jax_reference_run")
    parser.add_argument("--out", default=str(REPO / "tests" / "data" / "reference_run.npz"))
    parser.add_argument("--full", default="", help="also save every array (not only digests) to this .npz")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    if workdir.exists():
        sys.exit(f"error: {workdir} exists; give a new --workdir")
    arrays = record(workdir, os.path.abspath(args.butterflies))
    meta = {"machine": machine(), "digests": {k: digest(v) for k, v in arrays.items()},
            "flags": FLAGS, "num_steps": NUM_STEPS}
    # Leaf summaries for the tolerance comparison on other CPU kinds: mean and norm of every float leaf.
    stats = {k: [float(np.mean(v)), float(np.linalg.norm(v.astype(np.float64)))]
             for k, v in arrays.items() if k.startswith("state/")}
    np.savez_compressed(args.out, samples=arrays["samples"], meta=json.dumps(meta), stats=json.dumps(stats))
    if args.full:
        np.savez_compressed(args.full, **arrays)
    print(f"wrote {args.out}: {len(meta['digests'])} arrays recorded on {meta['machine']}")


if __name__ == "__main__":
    main()
