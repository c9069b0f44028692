"""Local folders, opened as `RawDataset`s: images found recursively (labels from first-level sub-folders) or
MNIST-style IDX files."""

from __future__ import annotations

import concurrent.futures
import gzip
import os
import pathlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ddpm_jax.data import decode, hints
from ddpm_jax.data.raw import RawDataset, file_stamp, fingerprint
from ddpm_jax.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
}


def looks_like_path(spec: str) -> bool:
    """True for values meant as file paths rather than TFDS names (which may contain '/' for configs)."""
    if spec.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in spec):
        return True
    # "data/images" is a path when "data" exists here; "celeb_a_hq/128" (a TFDS config) is not.
    return "/" in spec and not spec.startswith(hints.HF_PREFIX) and pathlib.Path(spec.split("/", 1)[0]).is_dir()


def find_idx_file(root: pathlib.Path, split: str) -> pathlib.Path | None:
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
        raise DataError(f"{path}: cannot read IDX file: {decode.reason(e)}") from e
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


def open_idx(path: pathlib.Path, image_size: int, split: str, process_index: int, process_count: int) -> RawDataset:
    """MNIST-style IDX images (and the label file beside them), opened: grayscale repeated to RGB, bicubic to S."""
    count = _read_idx_count(path)
    share = decode.host_share(count, process_index, process_count, str(path))
    labels, class_names = load_idx_labels(path, process_index, process_count)
    label_file = _label_file(path)
    stamps = [file_stamp(path)] + ([file_stamp(label_file)] if label_file is not None else [])

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        array = _read_idx(path)
        if array.ndim != 3:
            raise DataError(f"{path}: expected IDX images of shape (N, H, W), got {array.shape}")
        mine = array[share]
        n, h, w = mine.shape
        step = decode.CHUNK
        with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="ddpm_jax.idx") as pool:
            if (h, w) == (image_size, image_size):
                parts = (np.ascontiguousarray(mine[lo : lo + step]) for lo in range(0, n, step))
            elif h == w:
                parts = pool.map(lambda lo: _resize_square_gray_stack(mine[lo : lo + step], image_size),
                                 range(0, n, step))
            else:
                parts = (np.stack([decode.resize_center_crop(Image.fromarray(im, "L"), image_size)[:, :, 0]
                                   for im in mine[lo : lo + step]]) for lo in range(0, n, step))
            for lo, gray in zip(range(0, n, step), parts, strict=True):
                yield np.repeat(gray[..., None], 3, axis=3), (None if labels is None else labels[lo : lo + len(gray)])

    return RawDataset(name=str(path.parent), split=split, image_size=image_size, count=len(share), total=count,
                      class_names=class_names, fingerprint=fingerprint("idx", stamps), chunks=chunks)


def _label_file(images_file: pathlib.Path) -> pathlib.Path | None:
    """The IDX label file beside `images_file` (train-labels-idx1-ubyte[.gz]), or None."""
    name = images_file.name.replace("images", "labels").replace("idx3", "idx1")
    candidates = [images_file.with_name(name)]
    candidates.append(images_file.with_name(name[:-3] if name.endswith(".gz") else name + ".gz"))
    return next((c for c in candidates if c.is_file()), None)


def load_idx_labels(
    images_file: pathlib.Path, process_index: int, process_count: int
) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """Labels from the IDX label file beside `images_file` (train-labels-idx1-ubyte[.gz]); (None, None) if absent."""
    path = _label_file(images_file)
    if path is None:
        return None, None
    labels = _read_idx(path)
    count = _read_idx_count(images_file)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{path}: expected {count} labels for the {count} images of {images_file.name}, "
                        f"got an IDX array of shape {labels.shape}")
    # K from the whole file, so that every host agrees on it.
    class_names = tuple(str(k) for k in range(int(labels.max()) + 1))
    return labels[decode.host_share(len(labels), process_index, process_count, str(path))].astype(np.int32), class_names


def _read_idx_count(path: pathlib.Path) -> int:
    """The first dimension (number of items) in an IDX file's header, without reading the data."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(8)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file: {decode.reason(e)}") from e
    if len(header) < 4 or header[0] != 0 or header[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if len(header) < 8:
        raise DataError(f"{path}: truncated IDX header")
    return int(np.frombuffer(header, dtype=">u4")[1])


def folder_for_split(root: pathlib.Path, split: str) -> pathlib.Path:
    """`root/split` if it exists (train/ and test/ layouts), else `root` itself for the train split."""
    if (root / split).is_dir():
        return root / split
    if split == "train":
        return root
    raise DataError(f"data.split: folder {root} has no subfolder {split!r}; only split 'train' reads the whole folder")


def list_image_files(
    root: pathlib.Path, *, recursive: bool = True, extensions: frozenset[str] = IMAGE_EXTENSIONS
) -> list[pathlib.Path]:
    """Image files under `root` (only directly inside it unless recursive), sorted by relative path.

    Hidden files and folders (.ipynb_checkpoints, .git, ...) are ignored; `extensions` are lower-case with the dot.
    """
    found: list[tuple[str, pathlib.Path]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or not recursive:  # a symlink cycle, or below the top level
            dirnames[:] = []
        if real in seen:
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                full = pathlib.Path(dirpath) / name
                found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def open_folder(
    root: pathlib.Path, image_size: int, split: str, process_index: int, process_count: int, *,
    bare_name: bool = False,
) -> RawDataset:
    """Every image under `root`, opened; unreadable files are skipped with one warning when decoded.

    When every image sits in a first-level sub-folder, the sorted sub-folder names are the classes 0..K-1 and their
    labels come along; otherwise labels and class names are None.
    """
    paths = list_image_files(root)
    if not paths:
        hint = f" (to use the TFDS dataset {root.name!r}, run from another directory)" if bare_name else ""
        exts = "/".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise DataError(f"data.dataset: folder {root} contains no image files ({exts}){hint}")
    share = decode.host_share(len(paths), process_index, process_count, f"folder {root}")
    # Class names from every file (not this host's share), so that every host numbers the classes alike.
    folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
    class_names = None if None in folders else tuple(sorted(set(folders)))
    ids = {name: k for k, name in enumerate(class_names or ())}

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        items = ((str(paths[i]), paths[i], ids[folders[i]] if class_names else None) for i in share)
        return decode.decoded_chunks(items, len(share), lambda p: decode.load_image(p, image_size), str(root))

    return RawDataset(name=str(root), split=split, image_size=image_size, count=len(share), total=len(paths),
                      class_names=class_names,
                      fingerprint=fingerprint("folder", [file_stamp(p, root) for p in paths]), chunks=chunks)
