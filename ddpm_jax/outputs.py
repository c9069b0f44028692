"""What a run writes for people: sample grids, denoising strips, comparison grids, .npz arrays, class captions.

Host-side NumPy and Pillow; every file is written whole through fileio (local or gs://), never half-written.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from ddpm_jax import fileio

CLASSES_FILE = "classes.json"  # Written into the workdir at training time: captions for --mode=sample.
MIN_TILE = 64  # Pictures show each image at least this many pixels wide (nearest neighbour); arrays keep the size.


def enlarge(images: np.ndarray, min_side: int = MIN_TILE) -> np.ndarray:
    """uint8 images (..., H, W, C) repeated k x k times (k the smallest whole factor with k * min(H, W) >= min_side)."""
    k = max(1, math.ceil(min_side / min(images.shape[-3:-1])))
    return np.repeat(np.repeat(images, k, axis=-3), k, axis=-2) if k > 1 else images


def make_grid(images: np.ndarray, ncols: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles uint8 images (N,H,W,C) into one (rows*H', cols*W', C) image with `padding` pixels between tiles."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = img
    return grid


def make_strip(frames: np.ndarray, num_rows: int = 8) -> np.ndarray:
    """Denoising strip: frames (F,N,H,W,C) -> a grid whose rows are samples and columns go from noise to image."""
    f, n = frames.shape[:2]
    rows = min(num_rows, n)
    tiles = np.transpose(frames[:, :rows], (1, 0, 2, 3, 4)).reshape(rows * f, *frames.shape[2:])
    return make_grid(tiles, ncols=f)


def save_png(path: str, image: np.ndarray) -> str:
    """Writes a uint8 (H,W,3) or (H,W,1) array as PNG (local or gs://), creating the folder; returns the path."""
    if image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return fileio.write_bytes(path, buffer.getvalue())  # Never a half-written picture under the final name.


def save_npz(path: str, samples: np.ndarray) -> str:
    """Writes uint8 samples (N,H,W,3) to an .npz (local or gs://) under the key 'samples'; returns the path."""
    return fileio.write_npz(path, {"samples": samples})


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
    return make_grid(np.stack(tiles), ncols=ncols)


def grid_columns(labels: np.ndarray | None) -> int | None:
    """Columns of the sample grid: one row per class for a per-class grid, else None (the default layout)."""
    if labels is None or len(np.unique(labels)) < 2:
        return None
    return len(labels) // len(np.unique(labels))


def write_captions(
    path: str, labels: np.ndarray, class_names: Sequence[str], guidance_scale: float, columns: int | None
) -> str:
    """Writes a JSON caption beside a sample grid and logs it: each row's class (per-class grids), every label, w."""
    labels = np.asarray(labels)
    caption: dict[str, Any] = {"guidance_scale": float(guidance_scale), "class_names": list(class_names)}
    if columns:
        caption["rows"] = [class_names[int(c)] for c in labels[::columns]]
        for r, name in enumerate(caption["rows"]):
            logging.info("grid row %d: %s", r, name)
    else:
        caption["classes"] = [class_names[int(c)] for c in np.unique(labels)]
        logging.info("grid of class %s", ", ".join(caption["classes"]))
    caption["labels"] = labels.tolist()
    return fileio.write_text(path, json.dumps(caption, indent=1))


def save_class_names(workdir: str, class_names: Sequence[str]) -> str:
    """Writes the class names into workdir/classes.json, for captions when sampling later; returns the path."""
    text = json.dumps({"class_names": list(class_names)}, indent=2)
    return fileio.write_text(os.path.join(workdir, CLASSES_FILE), text)


def load_class_names(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, ...]:
    """Class names for captions: data.class_names, else those saved at training time, else the class numbers."""
    k = config.model.num_classes
    if config.data.class_names:
        return tuple(config.data.class_names)
    path = os.path.join(workdir, CLASSES_FILE)
    if fileio.exists(path):
        names = tuple(json.loads(fileio.read_text(path)).get("class_names", ()))
        if len(names) == k:
            return names
        logging.warning("%s lists %d classes but model.num_classes=%d: captions use class numbers", path, len(names), k)
    return tuple(str(c) for c in range(k))


def sampler_label(config: ml_collections.ConfigDict) -> str:
    """The sampler in file names: ddpm<T>, ddim<N>_eta<eta>, heun<N>, dpmpp<k>m<N>, unipc<k>_<N>; then _<spacing>
    unless linspace, and _w<guidance> for class-conditional models."""
    s = config.sampling
    label = {
        "ddpm": f"ddpm{config.diffusion.num_timesteps}", "ddim": f"ddim{s.num_steps}_eta{s.eta:g}",
        "heun": f"heun{s.num_steps}", "dpm_solver++": f"dpmpp{s.solver_order}m{s.num_steps}",
        "unipc": f"unipc{s.solver_order}_{s.num_steps}",
    }[s.method]
    if s.method != "ddpm" and s.timestep_spacing != "linspace":
        label += f"_{s.timestep_spacing}"
    return label + (f"_w{s.guidance_scale:g}" if config.model.num_classes > 0 else "")


def write_samples(
    directory: str, name: str, samples: np.ndarray, frames: np.ndarray,
    labels: np.ndarray | None = None, class_names: tuple[str, ...] | None = None, guidance_scale: float = 0.0,
) -> dict[str, str]:
    """Writes the grid PNG, the uint8 .npz and (if frames were recorded) the denoising-strip PNG; returns paths.

    Small images are enlarged in the PNGs (`enlarge`: at least MIN_TILE pixels a side); the .npz keeps their size.

    With the samples' class labels and names, a per-class grid has one row per class and `<name>_classes.json`
    captions it.
    """
    columns = grid_columns(labels)
    paths = {
        "grid": save_png(os.path.join(directory, f"{name}.png"), make_grid(enlarge(samples), ncols=columns)),
        "npz": save_npz(os.path.join(directory, f"{name}.npz"), samples),
    }
    if frames.shape[0]:
        paths["strip"] = save_png(os.path.join(directory, f"{name}_strip.png"), make_strip(enlarge(frames)))
    if labels is not None:
        paths["classes"] = write_captions(
            os.path.join(directory, f"{name}_classes.json"), labels, class_names, guidance_scale, columns
        )
    return paths
