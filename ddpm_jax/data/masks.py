"""Inpainting masks: built-in shapes (deterministic from a seed) and PNG mask files.

Convention everywhere in ddpm_jax: a mask is a *keep* mask, bool (N, S, S), True where the pixel of the original is
kept and False where it is to be filled (RePaint's `gt_keep_mask`). In mask files white (>= 128) means keep and
black (< 128) means fill.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image, ImageOps

from ddpm_jax.data.local import list_image_files
from ddpm_jax.errors import DataError

HALF_SIDES = ("left", "right", "top", "bottom")
SHAPES = ("center", "half", *(f"half_{side}" for side in HALF_SIDES), "strokes")
MASK_FILE_EXTENSIONS = frozenset({".png"})


def center_mask(image_size: int) -> np.ndarray:
    """Keep mask (S, S) that fills the central box of side S/2 (rounded up), keeping the border."""
    side = -(-image_size // 2)
    lo = (image_size - side) // 2
    keep = np.ones((image_size, image_size), bool)
    keep[lo : lo + side, lo : lo + side] = False
    return keep


def half_mask(image_size: int, side: str) -> np.ndarray:
    """Keep mask (S, S) that fills the named half (left, right, top or bottom) and keeps the other."""
    if side not in HALF_SIDES:
        raise ValueError(f"unknown half {side!r}; accepted: {', '.join(HALF_SIDES)}")
    keep = np.ones((image_size, image_size), bool)
    half = image_size // 2
    region = {"left": np.s_[:, :half], "right": np.s_[:, half:], "top": np.s_[:half, :], "bottom": np.s_[half:, :]}
    keep[region[side]] = False
    return keep


def _segment_distance(py: np.ndarray, px: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points (py, px) to the segment a-b (each a (y, x) pair)."""
    d = b - a
    length2 = float(d @ d)
    u = np.zeros_like(py) if length2 == 0 else np.clip(((py - a[0]) * d[0] + (px - a[1]) * d[1]) / length2, 0, 1)
    return np.hypot(py - (a[0] + u * d[0]), px - (a[1] + u * d[1]))


def strokes_mask(image_size: int, rng: np.random.Generator, min_fill: float = 0.2, max_strokes: int = 8) -> np.ndarray:
    """Keep mask (S, S) with thick random brush strokes to fill, added until at least `min_fill` is covered."""
    s = image_size
    centers = np.arange(s) + 0.5
    py, px = np.meshgrid(centers, centers, indexing="ij")
    fill = np.zeros((s, s), bool)
    for _ in range(max_strokes):
        radius = rng.uniform(s / 16, s / 8) + 0.5  # At least half a pixel, so every stroke paints something.
        point = rng.uniform(0, s, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(rng.integers(2, 5)):  # A few connected segments with random turns.
            angle += rng.uniform(-np.pi / 2, np.pi / 2)
            end = np.clip(point + rng.uniform(s / 4, s / 2) * np.array([np.sin(angle), np.cos(angle)]), 0, s)
            fill |= _segment_distance(py, px, point, end) <= radius
            point = end
        if fill.mean() >= min_fill:
            break
    return ~fill


def make_masks(shape: str, num_images: int, image_size: int, seed: int) -> np.ndarray:
    """Keep masks (N, S, S) of a built-in shape; `half` and `strokes` differ per image, drawn from (seed, index)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown mask shape {shape!r}; accepted: {', '.join(SHAPES)}")
    masks = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        if shape == "center":
            masks.append(center_mask(image_size))
        elif shape == "half":
            masks.append(half_mask(image_size, HALF_SIDES[rng.integers(len(HALF_SIDES))]))
        elif shape.startswith("half_"):
            masks.append(half_mask(image_size, shape[len("half_") :]))
        else:
            masks.append(strokes_mask(image_size, rng))
    return np.stack(masks) if masks else np.zeros((0, image_size, image_size), bool)


def mask_files(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """The mask PNG at `path`, or the PNGs directly inside the folder `path` in name order; DataError if none."""
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        files = list_image_files(p, recursive=False, extensions=MASK_FILE_EXTENSIONS)
        if not files:
            raise DataError(f"inpaint.mask: folder {p} holds no .png mask files")
        return files
    if not p.exists():
        raise DataError(
            f"inpaint.mask: {p} is neither a mask file nor a folder, nor a built-in shape ({', '.join(SHAPES)})"
        )
    return [p]


def load_mask(path: str | os.PathLike[str], image_size: int, image_wh: tuple[int, int] | None = None) -> np.ndarray:
    """Reads a mask PNG as a keep mask (S, S): white (>= 128) keeps, black fills.

    The mask must be S x S, or the size (width, height) of its original image `image_wh`: it then goes through the same
    centre square crop and resize as the image (nearest neighbour, so it stays binary).
    """
    try:
        with Image.open(path) as img:
            img.load()
            gray = ImageOps.exif_transpose(img).convert("L")
    except Exception as e:  # PIL raises many types for files that are not images.
        raise DataError(f"inpaint.mask: {os.fspath(path)} is not a readable image ({type(e).__name__}: {e})") from e
    w, h = gray.size
    if (w, h) != (image_size, image_size):
        if image_wh is None or (w, h) != tuple(image_wh):
            other = f" or {image_wh[0]}x{image_wh[1]}, the size of its image" if image_wh else ""
            raise DataError(
                f"inpaint.mask: {os.fspath(path)} is {w}x{h}; a mask must be {image_size}x{image_size} "
                f"(data.image_size){other}"
            )
        side = min(w, h)
        box = ((w - side) / 2.0, (h - side) / 2.0, (w + side) / 2.0, (h + side) / 2.0)
        gray = gray.resize((image_size, image_size), Image.Resampling.NEAREST, box=box)
    return np.asarray(gray) >= 128


def load_masks(
    path: str | os.PathLike[str], num_images: int, image_size: int, image_whs: list[tuple[int, int]] | None = None
) -> np.ndarray:
    """Keep masks (N, S, S) from one PNG (used for every image) or a folder of PNGs (mask i for image i)."""
    files = mask_files(path)
    if len(files) > 1 and len(files) < num_images:
        raise DataError(
            f"inpaint.mask: folder {path} holds {len(files)} masks for {num_images} images; give one mask per image "
            "(matched in name order) or a single mask file for all"
        )
    whs = image_whs or [None] * num_images
    return np.stack([load_mask(files[i if len(files) > 1 else 0], image_size, whs[i]) for i in range(num_images)])
