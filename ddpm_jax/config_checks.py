"""Checks a config before anything is compiled: one readable line per problem, naming the accepted values.

Also the environment variables that change what is compiled and are read while tracing (DDPM_JAX_KERNEL_GRADIENT).

Value rules only: no file or network I/O (files named by a config are checked by the code that reads them).
"""

from __future__ import annotations

import ml_collections

from ddpm_jax import builders
from ddpm_jax import config as default_config
from ddpm_jax.diffusion import likelihood, losses, samplers, schedule, timesteps
from ddpm_jax.diffusion.parameterization import PREDICTIONS
from ddpm_jax.errors import ConfigError
from ddpm_jax.models import conv_weight_grad

DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adam", "adamw")


def check_known_keys(config: ml_collections.ConfigDict) -> None:
    """Rejects keys the code never reads (typos in experiment configs), suggesting the closest known key."""
    for key in sorted(default_config.flat_keys(config) - default_config.flat_keys(default_config.get_config())):
        raise ConfigError(default_config.unknown_key_message(key))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
    """Raises ConfigError on the first value that cannot work on `num_devices` devices over `process_count` hosts."""
    check_known_keys(config)
    conv_weight_grad.form_override()  # The environment's override of the kernel gradients' form, if any.
    d, m, diff, o, t, s = (config.data, config.model, config.diffusion, config.optim, config.training, config.sampling)

    _require(config.seed >= 0, f"seed={config.seed} must be >= 0")
    _require(d.image_size > 0, f"data.image_size={d.image_size} must be positive")
    _require(d.in_memory_max_gib >= 0, f"data.in_memory_max_gib={d.in_memory_max_gib} must be >= 0 (0: always cache)")
    _require(bool(str(d.cache_dir).strip()), "data.cache_dir is empty; give a folder or gs://bucket/dir for caches")
    _require(d.num_workers >= 1, f"data.num_workers={d.num_workers} must be at least 1")
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
    _check_conditioning(config)

    _require(diff.schedule in schedule.SCHEDULES,
             f"unknown diffusion.schedule {diff.schedule!r}; accepted: {', '.join(schedule.SCHEDULES)}")
    _require(diff.num_timesteps > 1, f"diffusion.num_timesteps={diff.num_timesteps} must be at least 2")
    _require(diff.prediction in PREDICTIONS,
             f"unknown diffusion.prediction {diff.prediction!r}; accepted: {', '.join(PREDICTIONS)}")

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
    k = t.steps_per_dispatch
    _require(isinstance(k, int) and k >= 1, f"training.steps_per_dispatch={k} must be a positive integer")
    for key in ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "sample_every_steps",
                "fid_every_steps"):  # 0 turns sampling and FID off.
        _require(t[key] <= 0 or t[key] % k == 0, f"training.{key}={t[key]} must be a multiple of "
                                                 f"training.steps_per_dispatch={k} (training runs {k} steps per call)")
    _require(0.0 <= t.ema_decay < 1.0, f"training.ema_decay={t.ema_decay} must be in [0, 1)")
    _require(t.loss_weighting in losses.WEIGHTINGS, f"unknown training.loss_weighting {t.loss_weighting!r}; "
                                                    f"accepted: {', '.join(losses.WEIGHTINGS)}")
    _require(t.min_snr_gamma > 0 and t.p2_gamma > 0,
             f"training.min_snr_gamma={t.min_snr_gamma} and training.p2_gamma={t.p2_gamma} must be positive")

    _check_sampling(config)
    _require(s.eta >= 0, f"sampling.eta={s.eta} must be >= 0")
    _require(s.num_samples > 0 and s.batch_size > 0, "sampling.num_samples and sampling.batch_size must be positive")
    _require(s.num_intermediates >= 0, f"sampling.num_intermediates={s.num_intermediates} must be >= 0")

    ev = config.eval  # --mode=eval: bits per dimension.
    _require(isinstance(ev.split, str) and ev.split.strip() != "", f"eval.split={ev.split!r} must name a split")
    _require(ev.num_examples >= 0, f"eval.num_examples={ev.num_examples} must be >= 0 (0: the whole split)")
    _require(ev.batch_size > 0, f"eval.batch_size={ev.batch_size} must be positive")
    _require(ev.variance in likelihood.VARIANCES,
             f"unknown eval.variance {ev.variance!r}; accepted: {', '.join(likelihood.VARIANCES)}")
    _check_fid(config)
    _check_editing(config)


def _check_sampling(config: ml_collections.ConfigDict) -> None:
    """The method, its steps, spacing and order, and the grid they make (karras can run out of timesteps)."""
    s, diff = config.sampling, config.diffusion
    _require(s.method in samplers.METHODS,
             f"unknown sampling.method {s.method!r}; accepted: {', '.join(samplers.METHODS)}")
    _require(
        1 <= s.num_steps <= diff.num_timesteps,
        f"sampling.num_steps={s.num_steps} must be between 1 and diffusion.num_timesteps={diff.num_timesteps}",
    )
    _require(s.timestep_spacing in timesteps.SPACINGS, f"unknown sampling.timestep_spacing {s.timestep_spacing!r}; "
                                                       f"accepted: {', '.join(timesteps.SPACINGS)}")
    highest = {"dpm_solver++": 3, "unipc": 2}.get(s.method, 3)
    _require(isinstance(s.solver_order, int) and 1 <= s.solver_order <= highest,
             f"sampling.solver_order={s.solver_order} must be 1 to {highest} for sampling.method={s.method}")
    if s.method != "ddpm" and diff.schedule in schedule.SCHEDULES and diff.num_timesteps > 1:
        try:
            samplers.method_timesteps(builders.create_parameterization(config), s.method, s.num_steps,
                                      s.timestep_spacing)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def _check_editing(config: ml_collections.ConfigDict) -> None:
    """--mode=inpaint and --mode=edit keys (mask files and images are checked when those modes read them)."""
    inp, ed = config.inpaint, config.edit
    for key, value in (("inpaint.num_images", inp.num_images), ("inpaint.jump_length", inp.jump_length),
                       ("inpaint.resample_count", inp.resample_count), ("edit.num_images", ed.num_images)):
        _require(isinstance(value, int) and value >= 1, f"{key}={value} must be a positive integer")
    _require(str(inp.mask).strip() != "", "inpaint.mask is empty; give center, half, half_left, half_right, "
                                          "half_top, half_bottom, strokes, or a PNG mask file or folder")
    _require(inp.seed >= 0 and ed.seed >= 0, f"inpaint.seed={inp.seed} and edit.seed={ed.seed} must be >= 0")
    _require(0.0 <= ed.strength <= 1.0, f"edit.strength={ed.strength} must be in [0, 1] (0 keeps the input, "
                                        "1 starts from pure noise)")
    _require(ed.noise_sigma >= 0, f"edit.noise_sigma={ed.noise_sigma} must be >= 0 (0: edit at edit.strength)")


def _check_conditioning(config: ml_collections.ConfigDict) -> None:
    """Class-conditioning keys: counts, rates and the sampled class (the dataset's classes are checked in train)."""
    k, t, s = config.model.num_classes, config.training, config.sampling
    _require(isinstance(k, int) and k >= 0, f"model.num_classes={k} must be 0 (unconditional) or a class count")
    _require(0.0 <= t.label_dropout < 1.0, f"training.label_dropout={t.label_dropout} must be in [0, 1)")
    _require(s.guidance_scale >= 0, f"sampling.guidance_scale={s.guidance_scale} must be >= 0 (0: no guidance)")
    names = tuple(config.data.class_names)
    _require(all(isinstance(n, str) for n in names), f"data.class_names={names} must be a tuple of strings")
    if k == 0:
        _require(s.guidance_scale == 0, f"sampling.guidance_scale={s.guidance_scale} needs a class-conditional model; "
                                        "set model.num_classes to the dataset's class count, or guidance_scale=0")
        _require(s.class_label == -1, f"sampling.class_label={s.class_label} needs a class-conditional model; set "
                                      "model.num_classes to the dataset's class count, or class_label=-1")
        return
    _require(-1 <= s.class_label < k, f"sampling.class_label={s.class_label} must be -1 (one row per class) or a "
                                      f"class in [0, {k - 1}]")
    _require(not names or len(names) == k,
             f"data.class_names has {len(names)} names but model.num_classes={k}; give one name per class")


def _check_fid(config: ml_collections.ConfigDict) -> None:
    """FID/KID keys (the Inception weights file is checked where it is loaded, before anything compiles)."""
    ev, t = config.eval, config.training
    _require(t.fid_every_steps >= 0, f"training.fid_every_steps={t.fid_every_steps} must be >= 0 (0: off)")
    for key, n in (("eval.fid_num_samples", ev.fid_num_samples), ("training.fid_num_samples", t.fid_num_samples)):
        _require(n >= 2, f"{key}={n} must be at least 2 (a covariance needs two samples; the standard is 50000)")
    _require(ev.fid_batch_size > 0, f"eval.fid_batch_size={ev.fid_batch_size} must be positive")
    _require(str(ev.fid_cache_dir).strip() != "", "eval.fid_cache_dir must name a directory for reference statistics")
