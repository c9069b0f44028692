"""The benchmark UNets of DESIGN.md §5, described once and turned into a ddpm_jax config or diffusers arguments.

This module imports neither JAX nor PyTorch, so both benchmark processes (ours and the diffusers peer) read the same
description of the model they build.
"""

from __future__ import annotations

import argparse
import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark model: image size, channels per level, ResNet blocks per level, attention resolution, batch."""

    name: str
    image_size: int
    channels: tuple[int, ...]
    layers_per_block: int
    attention_resolution: int
    batch_size: int
    train_repeats: int  # Timed train steps (the median is reported); fewer for the slow presets.
    sample_steps: int  # Denoising steps per timed sampler call.

    @property
    def ch(self) -> int:
        """Base channel count of the UNet (its first level)."""
        return self.channels[0]

    @property
    def ch_mult(self) -> tuple[int, ...]:
        """Channel multiplier per level, relative to the first level."""
        if any(c % self.ch for c in self.channels):
            raise ValueError(f"preset {self.name}: channels {self.channels} are not multiples of {self.ch}")
        return tuple(c // self.ch for c in self.channels)


PRESETS = {
    # The Hugging Face "train a diffusion model" tutorial UNet (butterflies at 128x128).
    "tutorial": Preset("tutorial", 128, (128, 128, 256, 256, 512, 512), 2, 8, 4, train_repeats=3, sample_steps=2),
    "small64": Preset("small64", 64, (64, 128, 128, 256), 2, 16, 8, train_repeats=10, sample_steps=10),
    "tiny32": Preset("tiny32", 32, (32, 64, 64), 1, 8, 16, train_repeats=30, sample_steps=20),
    # Not a benchmark: the smallest UNet with every kind of layer, for checking the scripts (gpu_check --dry_run).
    "smoke": Preset("smoke", 16, (32, 32), 1, 8, 2, train_repeats=2, sample_steps=2),
}


def get(name: str) -> Preset:
    """The preset called `name`, or a ValueError that lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def diffusers_unet_kwargs(p: Preset) -> dict:
    """Arguments of diffusers.UNet2DModel for the same network: attention blocks at the preset's resolution."""
    levels = len(p.channels)
    attn_level = [p.image_size // 2**i for i in range(levels)].index(p.attention_resolution)
    down = ["AttnDownBlock2D" if i == attn_level else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if i == attn_level else "UpBlock2D" for i in reversed(range(levels))]
    return {
        "sample_size": p.image_size,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": p.layers_per_block,
        "block_out_channels": p.channels,
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "norm_num_groups": 32,
    }


def config_overrides(p: Preset) -> dict[str, object]:
    """Dotted ddpm_jax config keys that build the preset's UNet and batch (dropout off, as in diffusers)."""
    return {
        "data.image_size": p.image_size,
        "model.ch": p.ch,
        "model.ch_mult": p.ch_mult,
        "model.num_res_blocks": p.layers_per_block,
        "model.attn_resolutions": (p.attention_resolution,),
        "model.dropout": 0.0,
        "model.num_groups": 32,
        "training.batch_size": p.batch_size,
        "sampling.batch_size": p.batch_size,
    }


def from_argv(argv: list[str]) -> Preset | None:
    """The preset a script's `--preset NAME` argument names, or None without one (read before JAX starts)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # Another script's --p... is not --preset.
    pre.add_argument("--preset", choices=sorted(PRESETS))
    known, _ = pre.parse_known_args(argv)
    return None if known.preset is None else PRESETS[known.preset]
