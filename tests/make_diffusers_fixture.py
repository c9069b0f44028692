"""Writes tests/data/diffusers_multistep.npz: diffusers' DPM-Solver++ (2M, 3M) and UniPC (bh2) steps on fixed inputs.

Run once in a scratch environment with torch and diffusers (ddpm_jax never imports either):

    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 diffusers
    /tmp/peer/bin/python tests/make_diffusers_fixture.py

The network is replaced by fixed random outputs, one per step, so every step's result depends only on the scheduler's
arithmetic. tests/test_diffusion_multistep.py feeds the same outputs to ddpm_jax's solvers on the same timesteps.
"""

from __future__ import annotations

import pathlib

import diffusers
import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parent / "data" / "diffusers_multistep.npz"
NUM_STEPS = 6
SHAPE = (2, 4, 4, 3)


def run(scheduler: diffusers.SchedulerMixin, x: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scheduler's timesteps and the sample after each of its steps, fed outputs[i] at step i."""
    scheduler.set_timesteps(NUM_STEPS)
    sample = torch.from_numpy(x)
    samples = []
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(torch.from_numpy(outputs[i]), t, sample).prev_sample
        samples.append(sample.numpy().copy())
    return scheduler.timesteps.numpy().astype(np.int32), np.stack(samples)


def main() -> None:
    """Runs each scheduler on the same inputs and writes the fixture."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    outputs = rng.standard_normal((NUM_STEPS, *SHAPE)).astype(np.float32)
    common = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
              "prediction_type": "epsilon", "timestep_spacing": "linspace", "lower_order_final": True}
    arrays = {"x": x, "outputs": outputs}
    for name, order in (("dpmpp2m", 2), ("dpmpp3m", 3)):
        scheduler = diffusers.DPMSolverMultistepScheduler(
            **common, solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
            final_sigmas_type="zero", euler_at_final=False)
        arrays[f"{name}_timesteps"], arrays[f"{name}_samples"] = run(scheduler, x, outputs)
    scheduler = diffusers.UniPCMultistepScheduler(**common, solver_order=2, predict_x0=True, solver_type="bh2",
                                                  final_sigmas_type="zero")
    arrays["unipc_timesteps"], arrays["unipc_samples"] = run(scheduler, x, outputs)
    np.savez_compressed(OUT, diffusers_version=np.asarray(diffusers.__version__), **arrays)
    print(f"wrote {OUT} (diffusers {diffusers.__version__}): " + ", ".join(
        f"{k} {arrays[k].tolist()}" for k in arrays if k.endswith("_timesteps")))


if __name__ == "__main__":
    main()
