"""The diffusers peer: UNet2DModel + DDPMScheduler trained and sampled on the CPU with PyTorch, one preset per run.

Run by `benchmarks/run.py --peer` with a Python that has torch and diffusers (`pip install torch==2.13.0 diffusers`);
prints one JSON object. The train step is the diffusers tutorial's: noise, random timesteps, add_noise, forward,
MSE, backward, global-norm clipping at 1.0, AdamW, learning-rate schedule, then an EMA update (EMAModel, foreach).
With --profile N (for benchmarks/profile_ops.py) it prints, instead of timings, torch.profiler's per-op rows of N train
steps and of the sampling steps: each aten op's self CPU time, in the pass (forward, backward, update) it ran in.
"""

from __future__ import annotations

import argparse
import contextlib
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

from benchmarks import op_profile, presets  # noqa: E402
from benchmarks.timing import median_after_warmup, run_times  # noqa: E402

PASS_MARK = "ddpm_jax:"  # record_function names that mark a pass; every op below one belongs to it.


def profile_rows(events, per: int) -> tuple[list[dict], float]:
    """op_profile rows (ms per step) of torch.profiler events (self CPU time by pass, op, shapes), and ops per step."""
    sums: dict[tuple[str, str, str], float] = {}
    count = 0
    for event in events:
        if event.name.startswith(PASS_MARK):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(PASS_MARK):
            parent = parent.cpu_parent
        if parent is None:
            continue
        shapes = ",".join(str(list(s)) for s in (event.input_shapes or [])[:2] if s)
        key = (parent.name[len(PASS_MARK):], event.name, shapes)
        sums[key] = sums.get(key, 0.0) + event.self_cpu_time_total / 1e3
        count += 1
    rows = [{"name": name, "category": op_profile.torch_category(name), "pass": pass_, "label": "", "shape": shapes,
             "ms": ms / per} for (pass_, name, shapes), ms in sums.items()]
    return rows, count / per


def profile(train_step, sample_steps, steps: int, num_sample_steps: int, skip_sampling: bool) -> dict:
    """torch.profiler rows of `steps` train steps and one sampling call (per denoising step), with wall times."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    out = {}
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            train_step(record_function)
    rows, ops = profile_rows(prof.events(), steps)
    out["train"] = {"rows": rows, "ops": ops, "wall_ms": 1e3 * statistics.median(run_times(train_step, 3))}
    if not skip_sampling:
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            with record_function(PASS_MARK + "sample"):
                sample_steps()
        rows, ops = profile_rows(prof.events(), num_sample_steps)
        out["sample"] = {"rows": rows, "ops": ops,
                         "wall_ms": 1e3 * statistics.median(run_times(sample_steps, 2)) / num_sample_steps}
    return out


def conv_kernels(c: dict) -> dict | None:
    """The forward, input-gradient and weight-gradient calls of one conv_layers.py convolution in PyTorch (NCHW), or
    None for one not in NHWC or dilated. An uneven padding (a stride-2 downsampling's) is applied to the input
    beforehand, so the kernels pad nothing (equal FLOPs)."""
    if not c["nhwc"] or c["lhs_dilation"] != [1, 1] or c["rhs_dilation"] != [1, 1]:
        return None
    b, h, w, cin = c["lhs"]
    kh, kw, kin, cout = c["rhs"]
    (top, bottom), (left, right) = c["padding"]
    x = F.pad(torch.randn(b, cin, h, w), (left, right, top, bottom))
    weight = torch.randn(cout, kin, kh, kw)
    stride, groups = list(c["strides"]), c["groups"]
    g = torch.randn_like(F.conv2d(x, weight, stride=stride, groups=groups))

    def backward(mask: list[bool]):
        return lambda: torch.ops.aten.convolution_backward(g, x, weight, None, stride, [0, 0], [1, 1], False, [0, 0],
                                                            groups, mask)

    return {"forward": lambda: F.conv2d(x, weight, stride=stride, groups=groups),
            "input grad": backward([True, False, False]), "weight grad": backward([False, True, False])}


def time_conv_layers(convs: list[dict], repeats: int) -> list[dict | None]:
    """Milliseconds of each convolution's kernels (conv_kernels) in PyTorch: medians of `repeats` calls after one."""
    with torch.no_grad():
        return [None if kernels is None
                else {name: 1e3 * median_after_warmup(fn, repeats) for name, fn in kernels.items()}
                for kernels in map(conv_kernels, convs)]


def _no_mark(_name: str):
    return contextlib.nullcontext()


def main() -> None:
    """Measures the peer's train throughput, sampling time per step and peak memory for one preset."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow to compile)")
    parser.add_argument("--profile", type=int, default=0, help="print per-op profile rows of this many train steps")
    parser.add_argument("--skip_sampling", action="store_true", help="with --profile: the train step only")
    parser.add_argument("--conv_layers", default="", help="time these convolutions instead (conv_layers.py's JSON)")
    parser.add_argument("--repeats", type=int, default=10, help="with --conv_layers: timed calls per kernel")
    args = parser.parse_args()
    p = presets.get(args.preset)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.conv_layers:
        print(json.dumps({"framework": f"torch {torch.__version__}",
                          "conv_layers": time_conv_layers(json.loads(args.conv_layers), args.repeats)}))
        return

    model = UNet2DModel(**presets.diffusers_unet_kwargs(p))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=500)
    ema = EMAModel(model.parameters(), decay=0.9999, foreach=True)
    forward = torch.compile(model) if args.compile else model
    images = torch.rand(p.batch_size, 3, p.image_size, p.image_size) * 2 - 1

    def train_step(mark=_no_mark) -> None:
        with mark(PASS_MARK + "update"):  # Noising is outside the network, as in ddpm_jax's update pass.
            noise = torch.randn_like(images)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (p.batch_size,))
            noisy = scheduler.add_noise(images, noise, t)
        with mark(PASS_MARK + "forward"):
            loss = F.mse_loss(forward(noisy, t, return_dict=False)[0], noise)
        with mark(PASS_MARK + "backward"):
            loss.backward()
        with mark(PASS_MARK + "update"):
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
    if args.profile:
        model.train()
        train_step()
        framework = f"diffusers {__import__('diffusers').__version__} / torch {torch.__version__} (eager)"
        print(json.dumps({"framework": framework, **profile(train_step, sample_steps, args.profile, p.sample_steps,
                                                              args.skip_sampling)}))
        return
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
