"""Checks a config before anything is compiled: one readable line per problem, naming the accepted values."""

from __future__ import annotations

import difflib
import importlib.util
import pathlib
from typing import Any

import ml_collections

from ddpm_jax import losses, sampling, schedule

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adam", "adamw")


class ConfigError(ValueError):
    """A config value that cannot work, with what is wrong and what is accepted."""


def _flat_keys(cfg: Any, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict | dict):
            keys |= _flat_keys(v, name + ".")
        else:
            keys.add(name)
    return keys


def check_known_keys(config: ml_collections.ConfigDict) -> None:
    """Rejects keys the code never reads (typos in experiment configs), suggesting the closest known key."""
    if not DEFAULT_CONFIG.is_file():  # An installed copy without the repository's configs/: nothing to compare.
        return
    spec = importlib.util.spec_from_file_location("ddpm_jax_default_config", DEFAULT_CONFIG)
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    known = _flat_keys(default.get_config())
    for key in sorted(_flat_keys(config) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown config key {key}{hint}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
    """Raises ConfigError on the first value that cannot work on `num_devices` devices over `process_count` hosts."""
    check_known_keys(config)
    d, m, diff, o, t, s = (config.data, config.model, config.diffusion, config.optim, config.training, config.sampling)

    _require(config.seed >= 0, f"seed={config.seed} must be >= 0")
    _require(d.image_size > 0, f"data.image_size={d.image_size} must be positive")
    ch_mult = tuple(m.ch_mult)
    _require(len(ch_mult) > 0 and all(c > 0 for c in ch_mult), f"model.ch_mult={ch_mult} needs positive multipliers")
    factor = 2 ** (len(ch_mult) - 1)
    _require(
        d.image_size % factor == 0,
        f"data.image_size={d.image_size} is not divisible by {factor}, the UNet's total downsampling with "
        f"model.ch_mult={ch_mult}; use a multiple of {factor} or fewer levels",
    )
    reached = [d.image_size // 2**i for i in range(len(ch_mult))]
    for r in m.attn_resolutions:
        _require(r in reached, f"model.attn_resolutions has {r}, a resolution this UNet never reaches; "
                               f"accepted: {', '.join(map(str, reached))}")
    _require(m.ch > 0 and m.num_res_blocks > 0, "model.ch and model.num_res_blocks must be positive")
    _require(m.num_groups > 0, f"model.num_groups={m.num_groups} must be positive")
    for c in {m.ch * k for k in ch_mult}:
        _require(c % m.num_groups == 0, f"model.num_groups={m.num_groups} does not divide the channel count {c} "
                                        f"(model.ch={m.ch} times model.ch_mult); choose a divisor of {m.ch}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    _require(m.dtype in DTYPES, f"model.dtype={m.dtype!r} is not supported; accepted: {', '.join(DTYPES)}")

    _require(diff.schedule in schedule.SCHEDULES,
             f"unknown diffusion.schedule {diff.schedule!r}; accepted: {', '.join(schedule.SCHEDULES)}")
    _require(diff.num_timesteps > 1, f"diffusion.num_timesteps={diff.num_timesteps} must be at least 2")
    _require(diff.prediction in losses.PREDICTIONS,
             f"unknown diffusion.prediction {diff.prediction!r}; accepted: {', '.join(losses.PREDICTIONS)}")

    _require(o.optimizer in OPTIMIZERS, f"unknown optim.optimizer {o.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
    _require(o.learning_rate > 0, f"optim.learning_rate={o.learning_rate} must be positive")
    _require(o.warmup_steps >= 0 and o.grad_clip_norm >= 0, "optim.warmup_steps and optim.grad_clip_norm must be >= 0")

    _require(t.batch_size > 0, f"training.batch_size={t.batch_size} must be positive")
    _require(
        t.batch_size % num_devices == 0,
        f"training.batch_size={t.batch_size} (the global batch) is not divisible by the {num_devices} devices; "
        f"use a multiple of {num_devices}",
    )
    _require(t.batch_size % process_count == 0,
             f"training.batch_size={t.batch_size} is not divisible by the {process_count} processes")
    for key in ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _require(t[key] > 0, f"training.{key}={t[key]} must be positive")
    _require(t.sample_every_steps >= 0, f"training.sample_every_steps={t.sample_every_steps} must be >= 0 (0: off)")
    _require(0.0 <= t.ema_decay < 1.0, f"training.ema_decay={t.ema_decay} must be in [0, 1)")

    _require(s.method in sampling.METHODS,
             f"unknown sampling.method {s.method!r}; accepted: {', '.join(sampling.METHODS)}")
    _require(
        1 <= s.num_steps <= diff.num_timesteps,
        f"sampling.num_steps={s.num_steps} must be between 1 and diffusion.num_timesteps={diff.num_timesteps}",
    )
    _require(s.eta >= 0, f"sampling.eta={s.eta} must be >= 0")
    _require(s.num_samples > 0 and s.batch_size > 0, "sampling.num_samples and sampling.batch_size must be positive")
    _require(s.num_intermediates >= 0, f"sampling.num_intermediates={s.num_intermediates} must be >= 0")
