"""The diffusers peer: UNet2DModel + DDPMScheduler trained and sampled on the CPU with PyTorch, one preset per run.

Run by `benchmarks/run.py --peer` with a Python that has torch and diffusers (`pip install torch==2.13.0 diffusers`);
prints one JSON object. The train step is the diffusers tutorial's: noise, random timesteps, add_noise, forward,
MSE, backward, global-norm clipping at 1.0, AdamW, learning-rate schedule, then an EMA update (EMAModel, foreach).
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.optimization import get_constant_schedule_with_warmup  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from benchmarks import presets  # noqa: E402
from benchmarks.timing import run_times  # noqa: E402


def main() -> None:
    """Measures the peer's train throughput, sampling time per step and peak memory for one preset."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow to compile)")
    args = parser.parse_args()
    p = presets.get(args.preset)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    model = UNet2DModel(**presets.diffusers_unet_kwargs(p))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=500)
    ema = EMAModel(model.parameters(), decay=0.9999, foreach=True)
    forward = torch.compile(model) if args.compile else model
    images = torch.rand(p.batch_size, 3, p.image_size, p.image_size) * 2 - 1

    def train_step() -> None:
        noise = torch.randn_like(images)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (p.batch_size,))
        noisy = scheduler.add_noise(images, noise, t)
        loss = F.mse_loss(forward(noisy, t, return_dict=False)[0], noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    model.train()
    start = time.perf_counter()
    train_step()  # The first step: torch.compile's compilation when --compile, else allocator warm-up.
    first_step_s = time.perf_counter() - start
    train_step()
    train_s = statistics.median(run_times(train_step, p.train_repeats))

    model.eval()
    scheduler.set_timesteps(1000)
    timesteps = scheduler.timesteps[: p.sample_steps]

    @torch.no_grad()
    def sample_steps() -> None:
        x = torch.randn(p.batch_size, 3, p.image_size, p.image_size)
        for t in timesteps:
            x = scheduler.step(forward(x, t, return_dict=False)[0], t, x).prev_sample

    sample_steps()
    sample_s = statistics.median(run_times(sample_steps, 3)) / p.sample_steps

    print(json.dumps({
        "framework": f"diffusers {__import__('diffusers').__version__} / torch {torch.__version__}"
                     + (" (torch.compile)" if args.compile else " (eager)"),
        "params": sum(x.numel() for x in model.parameters()),
        "train_img_s": p.batch_size / train_s,
        "train_step_s": train_s,
        "sample_s_per_step": sample_s,
        "compile_s": first_step_s if args.compile else 0.0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
