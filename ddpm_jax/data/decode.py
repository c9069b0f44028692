"""Decoding any image (file, bytes or array) to uint8 (S, S, 3) one way: RGB, shorter side resized to S, centre-cropped.

Also the parallel decode loop every source streams through, and the per-host share of a dataset.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from ddpm_jax.errors import DataError

CHUNK = 1024  # items handed to the decode pool at a time: bounds queued futures and in-flight encoded bytes


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Reads one image file as uint8 (S, S, 3): RGB, shorter side resized to S (upscaled if smaller), centre-cropped.

    Raises DataError naming the file and the reason when it cannot be read as an image.
    """
    try:
        with Image.open(path) as img:
            return to_square_rgb(img, image_size)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, zlib.error, bomb errors ...)
        raise DataError(f"{os.fspath(path)}: {reason(e)}") from e


def reason(e: BaseException) -> str:
    """One-line description of an exception."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def to_square_rgb(img: Image.Image, image_size: int) -> np.ndarray:
    """Decodes an opened PIL image and returns uint8 (S, S, 3): RGB, shorter side resized to S, centre-cropped."""
    # JPEG can decode at 1/2, 1/4 or 1/8 scale while keeping both sides >= S: much faster for large photos.
    img.draft("RGB", (image_size, image_size))
    img.load()
    img = ImageOps.exif_transpose(img)
    return resize_center_crop(rgb8(img), image_size)


def rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB version of any PIL mode; transparency is composited onto white, 16-bit values scaled by 1/257."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Rescale the full 16-bit range (65535 -> 255); PIL's own convert("L") would clip at 255 instead.
        a = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a  # floats in [0, 1] are the common convention
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def resize_center_crop(img: Image.Image, image_size: int) -> np.ndarray:
    """Bicubic (antialiased) resize of the central square so the shorter side becomes S; upsamples small images."""
    w, h = img.size
    side = min(w, h)
    # Resizing just the central square box equals resize-then-crop (without rounding the crop offset to whole pixels)
    # and touches fewer pixels of large images.
    box = ((w - side) / 2.0, (h - side) / 2.0, (w + side) / 2.0, (h + side) / 2.0)
    if (w, h) == (image_size, image_size):
        out = img
    else:
        out = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def image_from_bytes(data: bytes, image_size: int) -> np.ndarray:
    """Decodes encoded image bytes (JPEG, PNG, ...) to uint8 (S, S, 3)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:  # PIL's own message only names an anonymous BytesIO object
        raise ValueError(f"not a recognised image format ({len(data)} bytes)") from e
    with img:
        return to_square_rgb(img, image_size)


def array_to_square_rgb(array: np.ndarray, image_size: int) -> np.ndarray:
    """A decoded (H, W[, C]) image array -> uint8 (S, S, 3) via the same conversion as files."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16:
        img = (
            Image.fromarray(array, "I;16")
            if array.ndim == 2
            else Image.fromarray(np.rint(array / 257.0).astype(np.uint8))
        )
    else:
        img = Image.fromarray(array.astype(np.uint8) if array.dtype != np.uint8 else array)
    return resize_center_crop(rgb8(img), image_size)


def decoded_chunks(
    items: Iterable[tuple[str, Any, int | None]], total: int, decode: Callable[[Any], np.ndarray], what: str,
    kind: str = "files",
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Decodes (name, payload, label) items CHUNK at a time in a thread pool (PIL releases the GIL).

    Yields (uint8 images (n, S, S, 3), int32 labels (n,) or None) for the items that decoded, in their order.
    Unreadable items are skipped and reported once at the end, which raises DataError when none of the `total`
    items could be read.
    """
    failures: list[tuple[str, str]] = []

    def attempt(payload: Any) -> np.ndarray | str:
        try:
            return decode(payload)
        except DataError as e:
            return str(e)
        except Exception as e:  # a bad file is skipped and reported, never fatal on its own
            return reason(e)

    seen = 0
    with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="ddpm_jax.decode") as pool:
        for chunk in chunks(items, CHUNK):
            seen += len(chunk)
            results = pool.map(attempt, [payload for _, payload, _ in chunk])
            images, labels = [], []
            for (name, _, label), result in zip(chunk, results, strict=True):
                if isinstance(result, np.ndarray):
                    images.append(result)
                    labels.append(label)
                else:
                    failures.append((name, result))
            if images:
                yield np.stack(images), (None if labels[0] is None else np.asarray(labels, np.int32))
    if seen != total:
        raise AssertionError(f"expected {total} items, got {seen}")
    report_failures(what, total, failures, kind)


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most `size` items."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def report_failures(what: str, total: int, failures: list[tuple[str, str]], kind: str = "files") -> None:
    """Warns once about skipped items, or raises DataError when nothing could be read."""
    if not failures:
        return
    first_name, first_reason = failures[0]
    first = first_reason if first_reason.startswith(first_name) else f"{first_name}: {first_reason}"
    if len(failures) == total:
        raise DataError(f"none of the {total} {kind} under {what} could be read as images (first: {first})")
    logging.warning(
        "skipped %d of %d %s under %s that could not be read as images (first: %s)",
        len(failures),
        total,
        kind,
        what,
        first,
    )


def host_share(count: int, process_index: int, process_count: int, what: str) -> range:
    """Positions i < count with i % process_count == process_index; DataError if this host would get none."""
    mine = range(process_index, count, process_count)
    if len(mine) == 0:
        raise DataError(
            f"{what} has {count} examples, too few to give host {process_index} of {process_count} any; "
            "use more data or fewer hosts"
        )
    return mine
