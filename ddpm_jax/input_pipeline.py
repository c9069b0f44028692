"""Datasets -> per-host uint8 image batches, with no TensorFlow and no iterator state.

Every source is decoded once into host memory as uint8 images at the target resolution (an `ArraySource`). The batch
for training step `s` is a pure function of (seed, step, this host's share of the data), so resuming at any step
reproduces the data order exactly from the step number alone. Random flips and scaling to [-1, 1] happen on the
device in the train step; this module yields uint8 (B, S, S, 3).

Accepted `data.dataset` forms, checked in this order:
  * a local folder: Fashion-MNIST/MNIST IDX files (`train-images-idx3-ubyte[.gz]`), else images found recursively;
  * `huggingface:OWNER/NAME`: the parquet files of a Hugging Face dataset repo (column `image`);
  * a TFDS name such as `cifar10`, `mnist` or `cifar10:3.0.2`, read from array_record files (no TensorFlow).

Class labels (int32, for class-conditional training) come along when the data has them: the sub-folder names of an
image folder whose images all sit in first-level sub-folders (sorted names -> 0..K-1), IDX label files beside IDX
images, a TFDS `label` ClassLabel feature, or an integer or string `label` column of parquet files.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gzip
import io
import json
import os
import pathlib
import queue
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from absl import logging
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
HF_PREFIX = "huggingface:"
_LOCAL_FOLDER_HINT = "point data.dataset at a local folder of images: --config.data.dataset=/path/to/images"
_ACCEPTED_FORMS = (
    "a TFDS name (cifar10, mnist, cifar10:3.0.2), huggingface:OWNER/NAME, "
    "or a local folder of images (or of MNIST-style IDX files)"
)
_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
}
_CHUNK = 1024  # items handed to the decode pool at a time: bounds queued futures and in-flight encoded bytes


class DataError(ValueError):
    """Raised with one readable line: what is wrong with the data and how to fix it."""


@runtime_checkable
class ImageSource(Protocol):
    """Random access to a host's images: uint8 (len(indices), S, S, 3) for any integer index array."""

    def __len__(self) -> int:
        """Number of examples this host holds."""
        ...

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """The uint8 images at `indices`, shape (len(indices), S, S, 3)."""
        ...


class ArraySource:
    """In-memory `ImageSource` over a uint8 (N, S, S, 3) array, kept in `.images`.

    `.labels` (int32 (N,) in [0, K)) and `.class_names` (K names) are None for data without class labels.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray | None = None, class_names: Sequence[str] | None = None
    ) -> None:
        """Wraps `images` (uint8, shape (N, S, S, 3), N >= 1) and optional labels with their K class names."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"ArraySource needs uint8 images of shape (N, S, S, 3), got {images.dtype} {images.shape}")
        if images.shape[0] == 0:
            raise ValueError("ArraySource needs at least one image")
        if (labels is None) != (class_names is None):
            raise ValueError("ArraySource needs labels and class_names together, or neither")
        if labels is not None:
            labels = np.asarray(labels, np.int32)
            if labels.shape != images.shape[:1] or labels.min() < 0 or labels.max() >= len(class_names):
                raise ValueError(f"ArraySource needs one label in [0, {len(class_names)}) per image")
            class_names = tuple(str(n) for n in class_names)
        self.images = images
        self.labels = labels
        self.class_names = class_names

    @property
    def image_size(self) -> int:
        """Side length S of the square images."""
        return int(self.images.shape[1])

    def __len__(self) -> int:
        """Number of images held."""
        return int(self.images.shape[0])

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """Gathers the images at `indices` into a new uint8 array (len(indices), S, S, 3)."""
        return np.take(self.images, np.asarray(indices), axis=0)

    def get_labels(self, indices: np.ndarray) -> np.ndarray:
        """The int32 class labels at `indices`; DataError when the data has none."""
        if self.labels is None:
            raise DataError("this dataset has no class labels")
        return np.take(self.labels, np.asarray(indices), axis=0)

    def __repr__(self) -> str:
        """Short description with count, size and classes."""
        classes = f", {len(self.class_names)} classes" if self.class_names is not None else ""
        return f"ArraySource({len(self)} images, {self.image_size}x{self.image_size}{classes})"


# --------------------------------------------------------------------------------------------------------------------
# Public entry points.


def create_source(
    dataset: str | os.PathLike[str],
    image_size: int,
    *,
    split: str = "train",
    tfds_data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> ImageSource:
    """Loads this host's share (examples i with i % process_count == process_index) of `dataset` into memory."""
    if not isinstance(image_size, int | np.integer) or image_size < 1:
        raise DataError(f"data.image_size must be a positive integer, got {image_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index must be in [0, process_count), got {process_index} of {process_count}")
    spec = os.fspath(dataset).strip() if dataset is not None else ""
    if not spec:
        raise DataError(f"data.dataset is empty; use {_ACCEPTED_FORMS}")
    image_size = int(image_size)
    shard = (process_index, process_count)
    start = time.perf_counter()

    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        idx_file = _find_idx_file(path, split)
        if idx_file is not None:
            images = _load_idx(idx_file, image_size, *shard)
            labels, class_names = _load_idx_labels(idx_file, *shard)
        else:
            images, labels, class_names = _load_folder(
                _folder_for_split(path, split), image_size, *shard, bare_name=not _looks_like_path(spec)
            )
    elif spec.startswith(HF_PREFIX):
        images, labels, class_names = _load_huggingface(spec[len(HF_PREFIX) :].strip(), image_size, split, *shard)
    elif _looks_like_path(spec):
        if path.exists():
            raise DataError(
                f"data.dataset: {spec} is a file, not a folder; point it at the folder that holds the images"
            )
        raise DataError(f"data.dataset: folder {spec} does not exist; use {_ACCEPTED_FORMS}")
    else:
        images, labels, class_names = _load_tfds(spec, image_size, split, tfds_data_dir, *shard)

    logging.info(
        "data: %s (split %s, host %d of %d): %d images at %dx%d in %.1f s%s",
        spec,
        split,
        process_index,
        process_count,
        len(images),
        image_size,
        image_size,
        time.perf_counter() - start,
        f", {len(class_names)} classes" if class_names is not None else "",
    )
    return ArraySource(images, labels, class_names)


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Reads one image file as uint8 (S, S, 3): RGB, shorter side resized to S (upscaled if smaller), centre-cropped.

    Raises DataError naming the file and the reason when it cannot be read as an image.
    """
    try:
        with Image.open(path) as img:
            return _to_square_rgb(img, image_size)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, zlib.error, bomb errors ...)
        raise DataError(f"{os.fspath(path)}: {_reason(e)}") from e


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Example indices for `step`: positions step*B .. step*B+B-1 of an endless stream of seeded epoch permutations."""
    if step < 0 or batch_size < 1 or num_examples < 1 or seed < 0:
        raise ValueError(
            "batch_indices needs step >= 0, batch_size >= 1, num_examples >= 1 and seed >= 0, got "
            f"step={step}, batch_size={batch_size}, num_examples={num_examples}, seed={seed}"
        )
    positions = int(step) * int(batch_size) + np.arange(batch_size, dtype=np.int64)
    epochs = positions // num_examples
    offsets = positions % num_examples
    out = np.empty(batch_size, dtype=np.int64)
    # A batch touches one or two epochs (more only when batch_size > num_examples).
    for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
        mask = epochs == epoch
        out[mask] = _epoch_permutation(int(seed), epoch, int(num_examples))[offsets[mask]]
    return out


def train_batches(
    source: ImageSource, *, batch_size: int, seed: int, start_step: int, prefetch: int = 2, with_labels: bool = False
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields this host's uint8 batches for steps start_step, start_step + 1, ... forever, built ahead in a thread.

    With `with_labels`, each item is (images, int32 labels) of the same examples (the source must have labels).
    """
    if batch_size < 1 or prefetch < 1 or start_step < 0:
        raise ValueError(
            f"need batch_size >= 1, prefetch >= 1, start_step >= 0; got {batch_size}, {prefetch}, {start_step}"
        )
    num_examples = len(source)
    if num_examples < 1:
        raise DataError("the data source is empty")
    if with_labels and getattr(source, "labels", None) is None:
        raise DataError("the data source has no class labels")
    return _prefetching_batches(source, batch_size, seed, start_step, prefetch, num_examples, with_labels)


# --------------------------------------------------------------------------------------------------------------------
# Batching and prefetch.


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of epoch `epoch`; cached because consecutive steps reuse the same one or two epochs."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False  # shared by the cache: nobody may modify it
    return perm


def _prefetching_batches(
    source: ImageSource, batch_size: int, seed: int, start_step: int, prefetch: int, num_examples: int,
    with_labels: bool = False,
) -> Iterator[Any]:
    """Generator behind `train_batches`: a daemon producer thread fills a bounded queue until stopped."""
    q: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: tuple[Any, BaseException | None]) -> bool:
        # Poll so that a producer blocked on a full queue notices a closed consumer.
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        step = start_step
        try:
            while not stop.is_set():
                indices = batch_indices(step, batch_size, num_examples, seed)
                batch = source.get_batch(indices)
                if with_labels:
                    batch = (batch, source.get_labels(indices))
                if not put((batch, None)):
                    return
                step += 1
        except BaseException as e:  # handed to the consumer, which re-raises it
            put((None, e))

    thread = threading.Thread(target=produce, name="ddpm_jax.train_batches", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = q.get()
            if error is not None:
                raise error
            yield batch
    finally:
        stop.set()
        thread.join(timeout=10.0)


# --------------------------------------------------------------------------------------------------------------------
# Per-image conversion shared by every route.


def _reason(e: BaseException) -> str:
    """One-line description of an exception."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _to_square_rgb(img: Image.Image, image_size: int) -> np.ndarray:
    """Decodes an opened PIL image and returns uint8 (S, S, 3): RGB, shorter side resized to S, centre-cropped."""
    # JPEG can decode at 1/2, 1/4 or 1/8 scale while keeping both sides >= S: much faster for large photos.
    img.draft("RGB", (image_size, image_size))
    img.load()
    img = ImageOps.exif_transpose(img)
    return _resize_center_crop(_rgb8(img), image_size)


def _rgb8(img: Image.Image) -> Image.Image:
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


def _resize_center_crop(img: Image.Image, image_size: int) -> np.ndarray:
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


def _image_from_bytes(data: bytes, image_size: int) -> np.ndarray:
    """Decodes encoded image bytes (JPEG, PNG, ...) to uint8 (S, S, 3)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:  # PIL's own message only names an anonymous BytesIO object
        raise ValueError(f"not a recognised image format ({len(data)} bytes)") from e
    with img:
        return _to_square_rgb(img, image_size)


def _decode_parallel(
    items: Iterable[tuple[str, Any]], count: int, decode: Callable[[Any], np.ndarray], image_size: int
) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray]:
    """Decodes (name, payload) items in a thread pool (PIL releases the GIL).

    Returns the images, the failures, and the positions of the decoded items (to keep their labels aligned).
    """
    out = np.empty((count, image_size, image_size, 3), np.uint8)
    ok = np.zeros(count, bool)
    failures: list[tuple[str, str]] = []

    def attempt(payload: Any) -> np.ndarray | str:
        try:
            return decode(payload)
        except DataError as e:
            return str(e)
        except Exception as e:  # a bad file is skipped and reported, never fatal on its own
            return _reason(e)

    i = 0
    with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="ddpm_jax.decode") as pool:
        for chunk in _chunks(items, _CHUNK):
            names = [name for name, _ in chunk]
            for j, result in enumerate(pool.map(attempt, [payload for _, payload in chunk])):
                if isinstance(result, np.ndarray):
                    out[i + j] = result
                    ok[i + j] = True
                else:
                    failures.append((names[j], result))
            i += len(chunk)
    if i != count:
        raise AssertionError(f"expected {count} items, got {i}")
    return (out if ok.all() else out[ok]), failures, np.flatnonzero(ok)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most `size` items."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _report_failures(what: str, total: int, failures: list[tuple[str, str]], kind: str = "files") -> None:
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


def _host_share(count: int, process_index: int, process_count: int, what: str) -> range:
    """Positions i < count with i % process_count == process_index; DataError if this host would get none."""
    mine = range(process_index, count, process_count)
    if len(mine) == 0:
        raise DataError(
            f"{what} has {count} examples, too few to give host {process_index} of {process_count} any; "
            "use more data or fewer hosts"
        )
    return mine


# --------------------------------------------------------------------------------------------------------------------
# Local folders: IDX files or images.


def _looks_like_path(spec: str) -> bool:
    """True for values meant as file paths rather than TFDS names (which may contain '/' for configs)."""
    if spec.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in spec):
        return True
    # "data/images" is a path when "data" exists here; "celeb_a_hq/128" (a TFDS config) is not.
    return "/" in spec and not spec.startswith(HF_PREFIX) and pathlib.Path(spec.split("/", 1)[0]).is_dir()


def _find_idx_file(root: pathlib.Path, split: str) -> pathlib.Path | None:
    """The IDX images file for `split` if `root` is an MNIST-style folder, else None."""
    candidates = [root / (name + ext) for names in _IDX_NAMES.values() for name in names for ext in ("", ".gz")]
    if not any(c.is_file() for c in candidates):
        return None
    if split not in _IDX_NAMES:
        raise DataError(f"data.split: {root} holds IDX files, which have the splits 'train' and 'test', not {split!r}")
    for name in _IDX_NAMES[split]:
        for ext in ("", ".gz"):
            if (root / (name + ext)).is_file():
                return root / (name + ext)
    raise DataError(f"data.split: {root} holds IDX files but no {_IDX_NAMES[split][0]}[.gz] for split {split!r}")


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """Parses an IDX file of unsigned bytes (magic 0x00000803 for images) into a uint8 array of its dims."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file: {_reason(e)}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x} is not unsigned bytes (0x08)")
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX header says {dims} = {expected} bytes but the file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _resize_square_gray_stack(images: np.ndarray, image_size: int) -> np.ndarray:
    """PIL bicubic resize of many square grayscale images at once; bit-identical to resizing each one.

    PIL resizes in two separable passes (horizontal, then vertical, rounding to uint8 in between). Rows are
    independent in the first pass and columns in the second, so stacking the images vertically for the first pass and
    side by side for the second gives the same pixels with two C calls instead of thousands of Python-level ones.
    """
    n, h, w = images.shape
    tall = Image.fromarray(np.ascontiguousarray(images).reshape(n * h, w), "L")
    rows = np.asarray(tall.resize((image_size, n * h), Image.Resampling.BICUBIC)).reshape(n, h, image_size)
    wide = Image.fromarray(np.ascontiguousarray(rows.transpose(1, 0, 2)).reshape(h, n * image_size), "L")
    cols = np.asarray(wide.resize((n * image_size, image_size), Image.Resampling.BICUBIC))
    return cols.reshape(image_size, n, image_size).transpose(1, 0, 2)


def _load_idx(path: pathlib.Path, image_size: int, process_index: int, process_count: int) -> np.ndarray:
    """MNIST-style IDX images -> uint8 (N, S, S, 3): grayscale repeated to RGB, bicubic-resized to S."""
    array = _read_idx(path)
    if array.ndim != 3:
        raise DataError(f"{path}: expected IDX images of shape (N, H, W), got {array.shape}")
    mine = array[_host_share(len(array), process_index, process_count, str(path))]
    n, h, w = mine.shape
    if (h, w) == (image_size, image_size):
        gray = np.ascontiguousarray(mine)
    elif h == w:
        with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="ddpm_jax.idx") as pool:
            parts = pool.map(
                lambda lo: _resize_square_gray_stack(mine[lo : lo + _CHUNK], image_size), range(0, n, _CHUNK)
            )
            gray = np.concatenate(list(parts))
    else:
        gray = np.stack([_resize_center_crop(Image.fromarray(im, "L"), image_size)[:, :, 0] for im in mine])
    return np.repeat(gray[..., None], 3, axis=3)


def _load_idx_labels(
    images_file: pathlib.Path, process_index: int, process_count: int
) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """Labels from the IDX label file beside `images_file` (train-labels-idx1-ubyte[.gz]); (None, None) if absent."""
    name = images_file.name.replace("images", "labels").replace("idx3", "idx1")
    candidates = [images_file.with_name(name)]
    candidates.append(images_file.with_name(name[:-3] if name.endswith(".gz") else name + ".gz"))
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return None, None
    labels = _read_idx(path)
    count = _read_idx_count(images_file)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{path}: expected {count} labels for the {count} images of {images_file.name}, "
                        f"got an IDX array of shape {labels.shape}")
    # K from the whole file, so that every host agrees on it.
    class_names = tuple(str(k) for k in range(int(labels.max()) + 1))
    return labels[_host_share(len(labels), process_index, process_count, str(path))].astype(np.int32), class_names


def _read_idx_count(path: pathlib.Path) -> int:
    """The first dimension (number of items) in an IDX file's header, without reading the data."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        return int(np.frombuffer(f.read(8), dtype=">u4")[1])


def _folder_for_split(root: pathlib.Path, split: str) -> pathlib.Path:
    """`root/split` if it exists (train/ and test/ layouts), else `root` itself for the train split."""
    if (root / split).is_dir():
        return root / split
    if split == "train":
        return root
    raise DataError(f"data.split: folder {root} has no subfolder {split!r}; only split 'train' reads the whole folder")


def _list_image_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Image files under `root`, recursively, sorted by relative path; hidden files and folders are ignored."""
    found: list[tuple[str, pathlib.Path]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .ipynb_checkpoints, .git, ...
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                full = pathlib.Path(dirpath) / name
                found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def _load_folder(
    root: pathlib.Path, image_size: int, process_index: int, process_count: int, *, bare_name: bool = False
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """Every readable image under `root` -> uint8 (N, S, S, 3); unreadable files are skipped with one warning.

    When every image sits in a first-level sub-folder, the sorted sub-folder names are the classes 0..K-1 and their
    labels come along; otherwise labels and class names are None.
    """
    paths = _list_image_files(root)
    if not paths:
        hint = f" (to use the TFDS dataset {root.name!r}, run from another directory)" if bare_name else ""
        exts = "/".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise DataError(f"data.dataset: folder {root} contains no image files ({exts}){hint}")
    share = _host_share(len(paths), process_index, process_count, f"folder {root}")
    mine = [paths[i] for i in share]
    images, failures, kept = _decode_parallel(
        ((str(p), p) for p in mine), len(mine), lambda p: load_image(p, image_size), image_size
    )
    _report_failures(str(root), len(mine), failures)
    # Class names from every file (not this host's share), so that every host numbers the classes alike.
    folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
    if None in folders:
        return images, None, None
    class_names = tuple(sorted(set(folders)))
    ids = {name: k for k, name in enumerate(class_names)}
    labels = np.array([ids[folders[i]] for i in share], np.int32)[kept]
    return images, labels, class_names


# --------------------------------------------------------------------------------------------------------------------
# Network checks.


def _can_connect(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    """True if a TCP connection to host:port opens within timeout_s; DNS failures count as unreachable."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:  # socket.gaierror, timeouts and refusals are all OSError
        return False


def _reachable(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    """Like `_can_connect`, but through the configured HTTPS proxy when there is one (direct sockets may be blocked)."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return _can_connect(parsed.hostname, parsed.port or 8080, timeout_s)
    return _can_connect(host, port, timeout_s)


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face parquet datasets.


def _env_flag(name: str) -> bool:
    """Hugging Face's convention for boolean environment variables."""
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_download(repo_id: str) -> pathlib.Path:
    """Local snapshot folder of the repo's parquet files: from the cache when offline, else downloaded."""
    # Lazy: a slow import that only this route needs.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    name = f"{HF_PREFIX}{repo_id}"
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if _env_flag("HF_HUB_OFFLINE"):
        why = "HF_HUB_OFFLINE is set"
    elif not _reachable(host, port):
        why = f"no network connection to {host}"
    else:
        why = None
    kwargs = {"repo_type": "dataset", "allow_patterns": ["*.parquet"]}
    if why is not None:
        # Checked before downloading because the hub client would otherwise retry for a long time.
        try:
            root = snapshot_download(repo_id, local_files_only=True, **kwargs)
        except LocalEntryNotFoundError as e:
            raise DataError(
                f"cannot download {name}: {why} and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}). "
                f"Download it elsewhere, or {_LOCAL_FOLDER_HINT}"
            ) from e
        except Exception as e:
            raise DataError(f"cannot read {name} from the Hugging Face cache ({why}): {_reason(e)}") from e
        logging.info("%s: %s; using the cached copy in %s", name, why, root)
        return pathlib.Path(root)
    try:
        return pathlib.Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, HTTP and disk errors
        raise DataError(
            f"cannot download {name}: {_reason(e)}. Check the name (private or gated repos need HF_TOKEN), "
            f"or {_LOCAL_FOLDER_HINT}"
        ) from e


def _select_split_files(files: list[pathlib.Path], root: pathlib.Path, split: str, name: str) -> list[pathlib.Path]:
    """Parquet files of `split`: named `split-*.parquet` / `split_*` / `split.parquet` or inside a `split/` folder."""
    pattern = re.compile(rf"^{re.escape(split)}(?:[-_.]|$)")
    chosen = [f for f in files if pattern.match(f.name) or split in f.relative_to(root).parts[:-1]]
    if chosen:
        return chosen
    known = re.compile(r"^(train|test|validation|valid|val|eval|dev)(?:[-_.]|$)")

    def named_for_a_split(f: pathlib.Path) -> bool:
        return any(known.match(part) for part in f.relative_to(root).parts)

    if split == "train" and not any(named_for_a_split(f) for f in files):
        return files  # a repo without split naming is all training data
    listing = ", ".join(f.relative_to(root).as_posix() for f in files[:5])
    raise DataError(f"data.split: {name} has no parquet files for split {split!r} (files: {listing})")


def _load_huggingface(
    repo_id: str, image_size: int, split: str, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """Images (uint8 (N, S, S, 3)) and labels, if any, of a Hugging Face dataset repo (parquet, column `image`)."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise DataError(f"data.dataset: {HF_PREFIX}{repo_id!r} is not of the form {HF_PREFIX}OWNER/NAME")
    root = _hf_download(repo_id)
    files = sorted(root.rglob("*.parquet"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"{HF_PREFIX}{repo_id} has no parquet files; {_LOCAL_FOLDER_HINT}")
    files = _select_split_files(files, root, split, f"{HF_PREFIX}{repo_id}")
    return _read_parquet(files, image_size, process_index=process_index, process_count=process_count)


def _decode_hf_image(value: Any, image_size: int) -> np.ndarray:
    """Decodes one cell of a Hugging Face `image` column ({"bytes", "path"} struct, or raw bytes)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None:
            if path and os.path.isfile(path):
                return load_image(path, image_size)
            raise ValueError(f"image cell has no bytes (path={path!r})")
    else:
        data = value
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image cell is a {type(data).__name__}, not encoded image bytes")
    return _image_from_bytes(bytes(data), image_size)


def _read_parquet_images(
    files: Sequence[str | os.PathLike], image_size: int, *, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
    """Decodes the `image` column of parquet files (rows numbered across files in order) -> uint8 (N, S, S, 3)."""
    return _read_parquet(files, image_size, process_index=process_index, process_count=process_count)[0]


def _read_parquet_labels(files: Sequence[pathlib.Path]) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """All rows' class ids and the class names from a `label` column, or (None, None) when there is no usable one.

    Names come from the Hugging Face ClassLabel metadata when present; string labels are numbered in sorted order;
    plain integers are named by their value. Rows with a missing or negative label (unlabelled) disable labels.
    """
    import pyarrow.parquet as pq  # lazy: only the Hugging Face route needs it

    if not all("label" in pq.read_schema(f).names for f in files):
        return None, None
    column = [v for f in files for v in pq.read_table(f, columns=["label"]).column("label").to_pylist()]
    features = json.loads((pq.read_schema(files[0]).metadata or {}).get(b"huggingface", b"{}"))
    names = features.get("info", {}).get("features", {}).get("label", {}).get("names")
    if any(v is None for v in column):
        logging.info("parquet column 'label' has missing values: no class labels")
        return None, None
    if all(isinstance(v, str) for v in column):
        class_names, labels = np.unique(np.array(column), return_inverse=True)
        return labels.astype(np.int32), tuple(str(n) for n in class_names)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in column) or min(column) < 0:
        logging.info("parquet column 'label' is not made of class ids >= 0: no class labels")
        return None, None
    labels = np.array(column, np.int64)
    if names and int(labels.max()) < len(names):
        return labels.astype(np.int32), tuple(str(n) for n in names)
    return labels.astype(np.int32), tuple(str(k) for k in range(int(labels.max()) + 1))


def _read_parquet(
    files: Sequence[str | os.PathLike], image_size: int, *, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """This host's decoded images of the `image` column, with their labels and the class names when there are any."""
    import pyarrow as pa  # lazy: only the Hugging Face route needs it
    import pyarrow.parquet as pq

    files = [pathlib.Path(f) for f in files]
    if not files:
        raise DataError("no parquet files to read")
    total = 0
    for f in files:
        schema = pq.read_schema(f)
        if "image" not in schema.names:
            raise DataError(f"{f}: no 'image' column (columns: {', '.join(schema.names)}); expected an image dataset")
        total += pq.ParquetFile(f).metadata.num_rows
    mine = _host_share(total, process_index, process_count, f"parquet files ({files[0].parent})")

    def rows() -> Iterator[tuple[str, Any]]:
        row = 0
        for f in files:
            in_file = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["image"]):
                n = batch.num_rows
                keep = np.nonzero((row + np.arange(n)) % process_count == process_index)[0]
                cells = batch.column(0).take(pa.array(keep)).to_pylist()  # only this host's rows are copied
                for k, cell in zip(keep, cells, strict=True):
                    yield f"{f} row {in_file + int(k)}", cell
                row += n
                in_file += n

    images, failures, kept = _decode_parallel(
        rows(), len(mine), lambda v: _decode_hf_image(v, image_size), image_size
    )
    _report_failures(str(files[0].parent), len(mine), failures, kind="parquet rows")
    labels, class_names = _read_parquet_labels(files)  # every row: hosts must agree on the classes
    if labels is not None:
        labels = labels[np.asarray(mine)][kept]
    return images, labels, class_names


# --------------------------------------------------------------------------------------------------------------------
# TFDS (array_record files, read without TensorFlow).


def _load_tfds(
    name: str, image_size: int, split: str, data_dir: str | None, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """Images (uint8 (N, S, S, 3)) and `label` ClassLabels, if any, of a TFDS dataset.

    The dataset is prepared as array_record first if needed and possible.
    """
    import tensorflow_datasets as tfds  # lazy: ~1 s import, only this route needs it

    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        what = "is neither an existing folder nor a TFDS dataset" if "/" in name else "is not a known TFDS dataset"
        raise DataError(f"data.dataset: {name!r} {what}; use {_ACCEPTED_FORMS}") from e
    except Exception as e:  # bad version or config, unparsable name
        raise DataError(f"data.dataset: cannot use TFDS dataset {name!r}: {_reason(e)}; use {_ACCEPTED_FORMS}") from e

    if not builder.is_prepared():
        # tfds retries an unreachable download for minutes; decide in seconds instead.
        if not _reachable("storage.googleapis.com"):
            raise DataError(
                f"cannot download TFDS dataset {name!r}: no network connection to storage.googleapis.com and "
                f"{where} has no prepared copy. Prepare it where there is network "
                f"(tfds.builder({name!r}).download_and_prepare(file_format='array_record')) and copy that data dir "
                f"here with --config.data.tfds_data_dir=/path/to/tensorflow_datasets, or {_LOCAL_FOLDER_HINT}"
            )
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:
            raise DataError(
                f"cannot prepare TFDS dataset {name!r} in {where}: {_reason(e)}. Prepare it elsewhere and pass "
                f"--config.data.tfds_data_dir, or {_LOCAL_FOLDER_HINT}"
            ) from e

    splits = list(builder.info.splits.keys())
    if split.split("[", 1)[0] not in splits:
        raise DataError(f"data.split: TFDS dataset {name!r} has no split {split!r}; available: {', '.join(splits)}")
    features = builder.info.features
    if features is None or "image" not in features:
        keys = ", ".join(features.keys()) if features is not None else "none"
        raise DataError(f"TFDS dataset {name!r} has no 'image' feature (features: {keys})")
    encoded = isinstance(features["image"], tfds.features.Image)
    decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
    try:
        source = builder.as_data_source(split=split, decoders=decoders)
    except Exception as e:  # typically a copy prepared as tfrecord, which needs TensorFlow to read
        raise DataError(
            f"cannot read TFDS dataset {name!r} from {where} without TensorFlow ({_reason(e)}); re-prepare it with "
            f"file_format='array_record' (tfds build {name} --file_format=array_record), or {_LOCAL_FOLDER_HINT}"
        ) from e

    mine = _host_share(len(source), process_index, process_count, f"TFDS {name} split {split}")
    class_label = features["label"] if "label" in features else None
    has_labels = isinstance(class_label, tfds.features.ClassLabel) and class_label.num_classes
    raw_labels: list[int] = []

    def records() -> Iterator[tuple[str, Any]]:
        for chunk in _chunks(mine, _CHUNK):
            # Batched array_record reads where the source supports them.
            examples = source.__getitems__(chunk) if hasattr(source, "__getitems__") else [source[i] for i in chunk]
            for i, example in zip(chunk, examples, strict=True):
                if has_labels:
                    raw_labels.append(int(example["label"]))
                yield f"{name}[{split}][{i}]", example["image"]

    def decode(value: Any) -> np.ndarray:
        if encoded:  # PNG/JPEG bytes: same conversion (and JPEG draft decoding) as image files
            return _image_from_bytes(value, image_size)
        return _array_to_square_rgb(np.asarray(value), image_size)

    images, failures, kept = _decode_parallel(records(), len(mine), decode, image_size)
    _report_failures(f"TFDS {name} split {split}", len(mine), failures, kind="examples")
    if not has_labels:
        return images, None, None
    return images, np.array(raw_labels, np.int32)[kept], tuple(class_label.names)


def _array_to_square_rgb(array: np.ndarray, image_size: int) -> np.ndarray:
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
    return _resize_center_crop(_rgb8(img), image_size)
