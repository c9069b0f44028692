"""Image grids and PNG/NPZ files for samples (host-side, NumPy and Pillow)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ddpm_jax import fileio


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
    buffer = io.BytesIO()
    np.savez_compressed(buffer, samples=samples)
    return fileio.write_bytes(path, buffer.getvalue())
