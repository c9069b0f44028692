"""Inpainting (RePaint) and denoising/editing (SDEdit) with a trained DDPM, each as one compiled `lax.scan`.

Both walk a path of timesteps built on the host: a sequence of moves (t, t_next). A move down (t_next < t) is one
reverse step of the sampler (DDPM ancestral over all T steps, or DDIM over respaced steps); a move up (t_next > t)
adds forward noise, q(x_t_next | x_t). t = -1 stands for the clean image. The scan runs over that array, so compile
time does not depend on its length.

* RePaint (Lugmayr et al., 2022): after every move down the kept pixels are replaced by the original noised to the
  new level, q_sample(x_0, t_next) (the original itself at t_next = -1), and the filled pixels come from the model.
  Its jump schedule goes back up `jump_length` steps and descends again, `resample_count` times per stretch, so the
  filled region has time to agree with the kept one.
* SDEdit (Meng et al., 2022): the input is noised to `t_start` with q_sample and denoised back to t = -1. An input
  that already carries Gaussian noise of known sigma is mapped onto the diffusion path instead (`noisy_to_x_t`).
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from ddpm_jax import config_checks, fileio, images, input_pipeline, masks, parallel, sampling
from ddpm_jax import schedule as sch

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
DOWN, UP = -1, 1


# --------------------------------------------------------------------------------------------------------------------
# Paths of timesteps, built on the host.


def jump_schedule(num_steps: int, jump_length: int, resample_count: int) -> np.ndarray:
    """RePaint's jump schedule over step indices K-1 .. 0: int32 (M, 2) rows of (index, direction DOWN or UP).

    The walk starts at index K-1 and ends with the move down from index 0 to the clean image. Each time it arrives
    (going down) at an index in 0, j, 2j, ... below K - j, it goes back up j indices, r - 1 times per index. So it makes
    K + j (r - 1) len(range(0, K - j, j)) moves down and j (r - 1) len(range(0, K - j, j)) moves up; j = r = 1 is
    the plain descent. Same walk as `get_schedule_jump` of the official RePaint code (without its extra jump levels).
    """
    if num_steps < 1 or jump_length < 1 or resample_count < 1:
        raise ValueError(
            f"need num_steps, jump_length and resample_count >= 1, got {num_steps}, {jump_length}, {resample_count}"
        )
    jumps_left = dict.fromkeys(range(0, num_steps - jump_length, jump_length), resample_count - 1)
    moves = []
    k = num_steps - 1
    while k >= 0:
        moves.append((k, DOWN))
        k -= 1
        if jumps_left.get(k, 0) > 0:
            jumps_left[k] -= 1
            for _ in range(jump_length):
                moves.append((k, UP))
                k += 1
    return np.asarray(moves, np.int32).reshape(-1, 2)


def step_grid(num_timesteps: int, method: str, num_steps: int | None) -> np.ndarray:
    """Ascending timesteps the sampler visits: all of 0..T-1 for "ddpm", the respaced DDIM steps for "ddim"."""
    if method == "ddpm":
        return np.arange(num_timesteps, dtype=np.int32)
    if method == "ddim":
        return sampling.ddim_timesteps(num_timesteps, num_steps or num_timesteps)[::-1].copy()
    raise ValueError(f"unknown sampling method {method!r}; accepted: {', '.join(sampling.METHODS)}")


def timestep_moves(index_moves: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Maps (index, direction) moves onto timesteps: int32 (M, 2) rows of (t, t_next), index -1 being t = -1."""
    padded = np.append(grid, -1).astype(np.int32)  # padded[-1] == -1: the move down from index 0 ends at t = -1.
    k, direction = index_moves[:, 0], index_moves[:, 1]
    return np.stack([padded[k], padded[k + direction]], axis=1).astype(np.int32)


def descent_moves(t_start: int, grid: np.ndarray) -> np.ndarray:
    """Moves straight down from t_start: t_start, then every grid timestep below it, then -1 (int32 (M, 2)).

    t_start = -1 (already clean) gives no moves.
    """
    if t_start < 0:
        return np.zeros((0, 2), np.int32)
    path = np.concatenate([[t_start], grid[grid < t_start][::-1], [-1]]).astype(np.int32)
    return np.stack([path[:-1], path[1:]], axis=1)


def start_timestep(strength: float, num_timesteps: int) -> int:
    """SDEdit start: the input goes through round(strength T) forward steps, so x lands at t = that count - 1."""
    return int(round(strength * num_timesteps)) - 1


def noise_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sqrt((1 - abar_t) / abar_t): the std of Gaussian noise on x_0 that x_t / sqrt(abar_t) carries."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - abar) / abar)


def timestep_for_sigma(alphas_cumprod: np.ndarray, sigma: float) -> int:
    """The first timestep whose noise level sqrt((1 - abar_t) / abar_t) reaches sigma; ValueError if none does."""
    sigmas = noise_sigmas(alphas_cumprod)
    if not 0 < sigma <= sigmas[-1]:
        raise ValueError(f"noise sigma {sigma} must be in (0, {sigmas[-1]:.4g}], the noise levels of this schedule")
    return int(np.searchsorted(sigmas, sigma, side="left"))


# --------------------------------------------------------------------------------------------------------------------
# The compiled walk.


def noisy_to_x_t(sched: sch.Schedule, y: jnp.ndarray, t: int, sigma: float, noise: jnp.ndarray) -> jnp.ndarray:
    """Puts an image with Gaussian noise of std sigma, y = x_0 + sigma z, onto the diffusion path at step t.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z', so x_t / sqrt(abar_t) is x_0 plus noise of std
    sigma_t = sqrt((1 - abar_t) / abar_t). With t the first step where sigma_t >= sigma, the missing noise of variance
    sigma_t^2 - sigma^2 is added and the sum scaled by sqrt(abar_t): the result is distributed exactly as x_t.
    """
    abar = sched.alphas_cumprod[t]
    top_up = jnp.sqrt(jnp.maximum((1.0 - abar) / abar - sigma**2, 0.0))
    return jnp.sqrt(abar) * (y + top_up * noise)


def _abar(sched: sch.Schedule, t: jnp.ndarray) -> jnp.ndarray:
    """abar_t, with abar_{-1} = 1 for the clean image."""
    return jnp.where(t >= 0, sched.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def walk(
    denoise_fn: DenoiseFn,
    sched: sch.Schedule,
    rng: jax.Array,
    x: jnp.ndarray,
    moves: np.ndarray,
    *,
    known: jnp.ndarray | None = None,
    keep: jnp.ndarray | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
    prediction: str = "eps",
    clip_denoised: bool = True,
    constrain: Callable[[jnp.ndarray], jnp.ndarray] = lambda v: v,
) -> jnp.ndarray:
    """Runs the moves (t, t_next) from x at moves[0, 0] as one lax.scan; returns x at the last t_next.

    Moves down are reverse steps: the DDPM posterior (method "ddpm"; unit steps only) or DDIM with `eta` between any
    two timesteps. Moves up sample q(x_t_next | x_t). With `known` (clean images) and `keep` (1 where kept, broadcast
    against x), every move down ends by replacing the kept pixels with q_sample(known, t_next), or known at t_next = -1.
    """
    moves = np.asarray(moves, np.int32).reshape(-1, 2)
    if method == "ddpm" and np.any((moves[:, 1] < moves[:, 0]) & (moves[:, 1] != moves[:, 0] - 1)):
        raise ValueError("method 'ddpm' walks unit steps only; use 'ddim' for respaced steps")
    if method not in sampling.METHODS:
        raise ValueError(f"unknown sampling method {method!r}; accepted: {', '.join(sampling.METHODS)}")
    if len(moves) == 0:
        return x
    batch = x.shape[0]

    def down(x: jnp.ndarray, t: jnp.ndarray, t_next: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
        step_rng, known_rng = jax.random.split(rng)
        noise = constrain(jax.random.normal(step_rng, x.shape, x.dtype))
        x0, eps = sampling.predict_x0_and_eps(sched, denoise_fn, x, t, prediction, clip_denoised)
        if method == "ddpm":
            mean, _, log_var = sch.q_posterior(sched, x0, x, jnp.full((batch,), t, jnp.int32))
            x = mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * noise
        else:
            abar, abar_next = _abar(sched, t), _abar(sched, t_next)
            sigma = eta * jnp.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
            x = jnp.sqrt(abar_next) * x0 + jnp.sqrt(jnp.maximum(1 - abar_next - sigma**2, 0.0)) * eps + sigma * noise
        if known is not None:
            known_noise = constrain(jax.random.normal(known_rng, x.shape, x.dtype))
            abar_next = _abar(sched, t_next)
            known_t = jnp.sqrt(abar_next) * known + jnp.sqrt(1 - abar_next) * known_noise
            x = keep * known_t + (1 - keep) * x
        return constrain(x)

    def up(x: jnp.ndarray, t: jnp.ndarray, t_next: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
        ratio = _abar(sched, t_next) / _abar(sched, t)  # q(x_t_next | x_t) = N(sqrt(ratio) x_t, (1 - ratio) I)
        noise = constrain(jax.random.normal(rng, x.shape, x.dtype))
        return constrain(jnp.sqrt(ratio) * x + jnp.sqrt(1 - ratio) * noise)

    def body(x: jnp.ndarray, xs: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, None]:
        i, t, t_next = xs
        # lax.cond runs only the taken branch: moves up never pay for a network evaluation.
        return jax.lax.cond(t_next < t, down, up, x, t, t_next, jax.random.fold_in(rng, i)), None

    xs = (jnp.arange(len(moves)), jnp.asarray(moves[:, 0]), jnp.asarray(moves[:, 1]))
    x, _ = jax.lax.scan(body, constrain(x), xs)
    return x


def inpaint(
    denoise_fn: DenoiseFn,
    sched: sch.Schedule,
    rng: jax.Array,
    x0: jnp.ndarray,
    keep: jnp.ndarray,
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    jump_length: int = 10,
    resample_count: int = 10,
    prediction: str = "eps",
    clip_denoised: bool = True,
    constrain: Callable[[jnp.ndarray], jnp.ndarray] = lambda v: v,
) -> jnp.ndarray:
    """RePaint: fills the pixels of x0 (in [-1, 1]) where keep == 0 so they agree with the kept ones.

    `keep` is 1 where x0 is kept, broadcast against x0 (e.g. (B, H, W, 1)). method "ddpm" walks all T steps, "ddim"
    `num_steps` respaced steps with stochasticity `eta`; `jump_length` and `resample_count` are RePaint's j and r.
    The kept pixels of the result equal x0.
    """
    grid = step_grid(sched.num_timesteps, method, num_steps)
    moves = timestep_moves(jump_schedule(len(grid), jump_length, resample_count), grid)
    keep = keep.astype(x0.dtype)
    init_rng, walk_rng = jax.random.split(rng)
    noise_known, noise_free = jax.random.normal(init_rng, (2, *x0.shape), x0.dtype)
    t_top = jnp.full((x0.shape[0],), grid[-1], jnp.int32)
    x = keep * sch.q_sample(sched, x0, t_top, noise_known) + (1 - keep) * noise_free
    return walk(denoise_fn, sched, walk_rng, x, moves, known=x0, keep=keep, method=method, eta=eta,
                prediction=prediction, clip_denoised=clip_denoised, constrain=constrain)


def denoise_from(
    denoise_fn: DenoiseFn,
    sched: sch.Schedule,
    rng: jax.Array,
    x_t: jnp.ndarray,
    t_start: int,
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    prediction: str = "eps",
    clip_denoised: bool = True,
    constrain: Callable[[jnp.ndarray], jnp.ndarray] = lambda v: v,
) -> jnp.ndarray:
    """Runs the reverse process from x_t at step t_start (-1: already clean, returned as is) down to x_0.

    "ddpm" takes every step t_start .. 0; "ddim" goes to the largest respaced step below t_start, then along the
    respaced steps, about (t_start + 1) / T * num_steps network evaluations.
    """
    if not -1 <= t_start < sched.num_timesteps:
        raise ValueError(f"t_start={t_start} must be in [-1, {sched.num_timesteps - 1}]")
    moves = descent_moves(t_start, step_grid(sched.num_timesteps, method, num_steps))
    return walk(denoise_fn, sched, rng, x_t, moves, method=method, eta=eta, prediction=prediction,
                clip_denoised=clip_denoised, constrain=constrain)


def sdedit(
    denoise_fn: DenoiseFn,
    sched: sch.Schedule,
    rng: jax.Array,
    x0: jnp.ndarray,
    t_start: int,
    **kwargs: Any,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """SDEdit: noises x0 to step t_start with q_sample and denoises it back; returns (x_t_start, edited x_0).

    t_start = -1 returns x0 unchanged; t_start = T - 1 starts from (nearly) pure noise, so the result hardly depends
    on x0. Keyword arguments go to `denoise_from` (method, num_steps, eta, prediction, clip_denoised, constrain).
    """
    noise_rng, walk_rng = jax.random.split(rng)
    if t_start < 0:
        return x0, x0
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_t = sch.q_sample(sched, x0, jnp.full((x0.shape[0],), t_start, jnp.int32), noise)
    return x_t, denoise_from(denoise_fn, sched, walk_rng, x_t, t_start, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# --mode=inpaint and --mode=edit: inputs, the compiled device-sharded walk, and the output files.


def _input_files(spec: str, key: str) -> list[pathlib.Path]:
    """Image files named by `spec`: the images directly inside a folder (in name order) or a comma-separated list."""
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in input_pipeline.IMAGE_EXTENSIONS)
        if not files:
            exts = "/".join(sorted(e[1:] for e in input_pipeline.IMAGE_EXTENSIONS))
            raise input_pipeline.DataError(f"{key}: folder {path} holds no image files ({exts})")
        return files
    files = [pathlib.Path(p.strip()).expanduser() for p in spec.split(",") if p.strip()]
    for f in files:
        if not f.is_file():
            raise input_pipeline.DataError(
                f"{key}: {f} is not an image file or a folder; give a folder or image files separated by commas"
            )
    return files


def _oriented_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of an image file as it is displayed, i.e. after its EXIF rotation."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def load_inputs(
    config: ml_collections.ConfigDict, spec: str, num_images: int, key: str
) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
    """The first num_images input images as uint8 (N, S, S, 3), and their original sizes when read from files.

    `spec` is a folder, or image files separated by commas; "" takes the first images of config.data.dataset. Images
    are resized and centre-cropped exactly as for training.
    """
    size = config.data.image_size
    if not spec:
        d = config.data
        source = input_pipeline.create_source(d.dataset, size, split=d.split, tfds_data_dir=d.tfds_data_dir or None)
        return source.get_batch(np.arange(min(num_images, len(source)))), None
    files = _input_files(spec, key)[:num_images]
    images = np.stack([input_pipeline.load_image(f, size) for f in files])
    return images, [_oriented_size(f) for f in files]


def comparison_grid(rows: list[np.ndarray], ncols: int = 8) -> np.ndarray:
    """Grid of uint8 image rows shown one above the other (e.g. original / input / result), ncols images wide.

    Longer rows wrap into blocks: the first ncols of every row, then the next ncols of every row, and so on.
    """
    n = len(rows[0])
    ncols = min(ncols, n)
    blank = np.full_like(rows[0][0], 255)
    tiles = []
    for start in range(0, n, ncols):
        for row in rows:
            block = list(row[start : start + ncols])
            tiles += block + [blank] * (ncols - len(block))
    return images.make_grid(np.stack(tiles), ncols=ncols)


def save_arrays(path: str, **arrays: np.ndarray) -> str:
    """Writes named arrays to a compressed .npz (local or gs://, never half-written); returns the path."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return fileio.write_bytes(path, buffer.getvalue())


def _sampler_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The reverse-step settings shared with --mode=sample: method, steps, eta, prediction target and clipping."""
    s = config.sampling
    return {"method": s.method, "num_steps": s.num_steps, "eta": s.eta,
            "prediction": config.diffusion.prediction, "clip_denoised": s.clip_denoised}


def _run_sharded(
    fn: Callable[..., Any], params: Any, rng: jax.Array, arrays: list[np.ndarray], batch_size: int,
    mesh: jax.sharding.Mesh,
) -> list[np.ndarray]:
    """Runs fn(params, rng, *chunks) over the inputs in chunks split over the devices; returns host outputs."""
    n = len(arrays[0])
    chunk = -(-min(batch_size, n) // mesh.size) * mesh.size  # A multiple of the device count.
    sharding = parallel.batch_sharded(mesh)
    outs: list[list[np.ndarray]] = []
    for i, start in enumerate(range(0, n, chunk)):
        parts = []
        for a in arrays:
            part = a[start : start + chunk]
            part = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])  # Pad with copies.
            # Every host holds all inputs, so each device's slice is cut from the host copy (works multi-host).
            parts.append(jax.make_array_from_callback(part.shape, sharding, lambda idx, p=part: p[idx]))
        results = fn(params, jax.random.fold_in(rng, i), *parts)
        outs.append([parallel.fetch(r)[: n - start] for r in results])
    return [np.concatenate(group) for group in zip(*outs, strict=True)]


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, jax.sharding.Mesh]:
    """The resolved workdir (absolute, or a gs:// URL) and the device mesh, after checking the config."""
    mesh = parallel.make_mesh()
    config_checks.validate(config, num_devices=mesh.size, process_count=jax.process_count())
    return fileio.resolve(workdir), mesh


def inpaint_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """`--mode=inpaint`: fills masked regions of images with RePaint and writes a grid and an .npz under samples/."""
    from ddpm_jax import generation, train  # Local import: train imports generation, which is heavy to load.

    workdir, mesh = _prepare(config, workdir)
    c, size = config.inpaint, config.data.image_size
    sched = train.create_schedule(config)
    kwargs = _sampler_kwargs(config)
    grid = step_grid(sched.num_timesteps, kwargs["method"], kwargs["num_steps"])
    if c.resample_count > 1 and c.jump_length >= len(grid):
        raise config_checks.ConfigError(
            f"inpaint.jump_length={c.jump_length} must be below the {len(grid)} steps of sampling.method="
            f"{kwargs['method']} for resample_count={c.resample_count} to resample anything"
        )
    originals, sizes = load_inputs(config, c.images, c.num_images, "inpaint.images")
    if c.mask in masks.SHAPES:
        keep = masks.make_masks(c.mask, len(originals), size, c.seed)
    else:
        keep = masks.load_masks(c.mask, len(originals), size, sizes)
    if keep.all():
        logging.warning("inpaint.mask keeps every pixel: there is nothing to fill")

    model, ema_params, step = generation.restore_ema_params(config, workdir, mesh)
    moves = jump_schedule(len(grid), c.jump_length, c.resample_count)
    logging.info("inpainting %d images with %s: %d steps, jump length %d, %d resamplings: %d network evaluations",
                 len(originals), kwargs["method"], len(grid), c.jump_length, c.resample_count,
                 int((moves[:, 1] == DOWN).sum()))
    constrain = _constrain(mesh)

    @functools.partial(jax.jit, out_shardings=(parallel.batch_sharded(mesh),))
    def run(params: Any, rng: jax.Array, images_u8: jax.Array, keep_mask: jax.Array) -> tuple[jax.Array]:
        x0 = images_u8.astype(jnp.float32) / 127.5 - 1.0
        out = inpaint(_denoiser(model, params), sched, rng, x0, keep_mask[..., None], jump_length=c.jump_length,
                      resample_count=c.resample_count, constrain=constrain, **kwargs)
        return (sampling.to_uint8(out),)

    (results,) = _run_sharded(run, ema_params, jax.random.PRNGKey(c.seed), [originals, keep],
                              config.sampling.batch_size, mesh)
    masked = np.where(keep[..., None], originals, np.uint8(128))  # The fill region shown in mid-grey.
    paths: dict[str, str] = {}
    if jax.process_index() == 0:
        name = os.path.join(workdir, "samples", f"inpaint_step_{step:07d}")
        paths["inpainting grid (originals / masked inputs / results)"] = images.save_png(
            name + ".png", comparison_grid([originals, masked, results]))
        paths["inpainting arrays (originals, keep_masks, results)"] = save_arrays(
            name + ".npz", originals=originals, keep_masks=keep, results=results)
        logging.info("wrote %d inpainted images from the EMA weights at step %d", len(results), step)
    return paths


def edit_from_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """`--mode=edit`: SDEdit (noise to edit.strength, denoise back) or denoising of images with known noise."""
    from ddpm_jax import generation, train  # Local import: train imports generation, which is heavy to load.

    workdir, mesh = _prepare(config, workdir)
    c = config.edit
    sched = train.create_schedule(config)
    kwargs = _sampler_kwargs(config)
    if c.noise_sigma > 0:
        try:
            t_start = timestep_for_sigma(np.asarray(sched.alphas_cumprod), c.noise_sigma)
        except ValueError as e:
            raise config_checks.ConfigError(f"edit.noise_sigma: {e}") from e
        what = f"denoising images with noise sigma {c.noise_sigma:g} from step {t_start}"
    else:
        t_start = start_timestep(c.strength, sched.num_timesteps)
        what = f"editing images at strength {c.strength:g}: noised to step {t_start}"
    originals, _ = load_inputs(config, c.images, c.num_images, "edit.images")

    model, ema_params, step = generation.restore_ema_params(config, workdir, mesh)
    num_evals = len(descent_moves(t_start, step_grid(sched.num_timesteps, kwargs["method"], kwargs["num_steps"])))
    logging.info("%s, %d network evaluations with %s", what, num_evals, kwargs["method"])
    constrain = _constrain(mesh)
    out_shardings = (parallel.batch_sharded(mesh),) * 2

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def run(params: Any, rng: jax.Array, images_u8: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images_u8.astype(jnp.float32) / 127.5 - 1.0
        denoise = _denoiser(model, params)
        if c.noise_sigma > 0:
            noise_rng, walk_rng = jax.random.split(rng)
            x_t = noisy_to_x_t(sched, x, t_start, c.noise_sigma, jax.random.normal(noise_rng, x.shape))
            out = denoise_from(denoise, sched, walk_rng, x_t, t_start, constrain=constrain, **kwargs)
        else:
            x_t, out = sdedit(denoise, sched, rng, x, t_start, constrain=constrain, **kwargs)
        return sampling.to_uint8(x_t), sampling.to_uint8(out)

    started, results = _run_sharded(run, ema_params, jax.random.PRNGKey(c.seed), [originals],
                                    config.sampling.batch_size, mesh)
    paths: dict[str, str] = {}
    if jax.process_index() == 0:
        name = os.path.join(workdir, "samples", f"edit_step_{step:07d}")
        rows, label = ([originals, results], "noisy inputs / denoised") if c.noise_sigma > 0 else (
            [originals, started, results], f"inputs / noised to step {t_start} / results")
        paths[f"edit grid ({label})"] = images.save_png(name + ".png", comparison_grid(rows))
        paths["edit arrays (originals, starts, results)"] = save_arrays(
            name + ".npz", originals=originals, starts=started, results=results, t_start=np.int32(t_start))
        logging.info("wrote %d edited images from the EMA weights at step %d", len(results), step)
    return paths


def _denoiser(model: Any, params: Any) -> DenoiseFn:
    """The UNet as a denoise_fn(x_t, t) -> network output."""
    return lambda x, t: model.apply({"params": params}, x, t, train=False)


def _constrain(mesh: jax.sharding.Mesh) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Keeps arrays split along the batch over the mesh inside the scan."""
    sharding = parallel.batch_sharded(mesh)
    return lambda v: jax.lax.with_sharding_constraint(v, sharding)
