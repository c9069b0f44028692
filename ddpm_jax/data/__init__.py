"""Datasets -> per-host uint8 image batches, with no TensorFlow and no iterator state: the one data interface.

Every source is opened without decoding (a `RawDataset`), then decoded once at the target resolution: into host memory
(an `ArraySource`) when it fits in data.in_memory_max_gib, else into a prepared cache of ArrayRecord shards that is
read by index (`cache`, a `CachedSource`); both hold uint8 images in the same order. The batch for training step `s`
is a pure function of (seed, step, this host's share of the data), so resuming at any step
reproduces the data order exactly from the step number alone (`batching`). Random flips and scaling to [-1, 1]
happen on the device in the train step; batches are dicts {"image": uint8 (B, S, S, 3)[, "label": int32 (B,)]}.

Accepted `data.dataset` forms, checked in this order, each read by its own module:
  * a local folder (`local`): Fashion-MNIST/MNIST IDX files (`train-images-idx3-ubyte[.gz]`), else images found
    recursively;
  * `huggingface:OWNER/NAME` (`huggingface`): the parquet files of a Hugging Face dataset repo (column `image`);
  * a TFDS name such as `cifar10`, `mnist` or `cifar10:3.0.2` (`tfds`), read from array_record files.

Class labels (int32, for class-conditional training) come along when the data has them: the sub-folder names of an
image folder whose images all sit in first-level sub-folders (sorted names -> 0..K-1), IDX label files beside IDX
images, a TFDS `label` ClassLabel feature, or an integer or string `label` column of parquet files.
"""

from __future__ import annotations

import functools
import os
import pathlib
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from ddpm_jax import fileio
from ddpm_jax.data import cache, hints, huggingface, local, tfds
from ddpm_jax.data.batching import batch_indices, train_batches
from ddpm_jax.data.decode import load_image
from ddpm_jax.data.local import IMAGE_EXTENSIONS
from ddpm_jax.data.raw import RawDataset
from ddpm_jax.data.source import ArraySource, CachedSource, ImageSource
from ddpm_jax.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS", "ArraySource", "CachedSource", "DataError", "ImageSource", "RawDataset", "batch_indices",
    "check_class_labels", "create_source", "load_image", "load_inputs", "open_dataset", "prepare_from_config",
    "source_from_config", "train_batches",
]


def open_dataset(
    dataset: str | os.PathLike[str],
    image_size: int,
    *,
    split: str = "train",
    tfds_data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> RawDataset:
    """Opens this host's share (examples i with i % process_count == process_index) of `dataset`, decoding nothing."""
    if not isinstance(image_size, int | np.integer) or image_size < 1:
        raise DataError(f"data.image_size must be a positive integer, got {image_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index must be in [0, process_count), got {process_index} of {process_count}")
    spec = os.fspath(dataset).strip() if dataset is not None else ""
    if not spec:
        raise DataError(f"data.dataset is empty; use {hints.ACCEPTED_FORMS}")
    image_size = int(image_size)
    shard = (process_index, process_count)
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        idx_file = local.find_idx_file(path, split)
        if idx_file is not None:
            return local.open_idx(idx_file, image_size, split, *shard)
        return local.open_folder(local.folder_for_split(path, split), image_size, split, *shard,
                                 bare_name=not local.looks_like_path(spec))
    if spec.startswith(hints.HF_PREFIX):
        return huggingface.open_huggingface(spec[len(hints.HF_PREFIX) :].strip(), image_size, split, *shard)
    if local.looks_like_path(spec):
        if path.exists():
            raise DataError(
                f"data.dataset: {spec} is a file, not a folder; point it at the folder that holds the images"
            )
        raise DataError(f"data.dataset: folder {spec} does not exist; use {hints.ACCEPTED_FORMS}")
    return tfds.open_tfds(spec, image_size, split, tfds_data_dir, *shard)


def create_source(
    dataset: str | os.PathLike[str],
    image_size: int,
    *,
    split: str = "train",
    tfds_data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> ArraySource:
    """Decodes this host's share (examples i with i % process_count == process_index) of `dataset` into memory."""
    start = time.perf_counter()
    raw = open_dataset(dataset, image_size, split=split, tfds_data_dir=tfds_data_dir, process_index=process_index,
                       process_count=process_count)
    return _decode_into_memory(raw, start, process_index, process_count)


def _decode_into_memory(raw: RawDataset, start: float, process_index: int, process_count: int) -> ArraySource:
    """raw.load(), logged with the count, the size and the time since `start`."""
    source = raw.load()
    logging.info(
        "data: %s (split %s, host %d of %d): %d images at %dx%d in %.1f s%s", raw.name, raw.split, process_index,
        process_count, len(source), raw.image_size, raw.image_size, time.perf_counter() - start,
        f", {len(source.class_names)} classes" if source.class_names is not None else "",
    )
    return source


def source_from_config(
    config: ml_collections.ConfigDict, *, split: str | None = None, process_index: int = 0, process_count: int = 1,
    whole: bool = False,
) -> ImageSource:
    """config.data's dataset at data.image_size, split `split` (default data.split): this host's share, or all of it
    when `whole` (process_index and process_count then only say which process may write a bucket's cache).

    A prepared cache of the same data is read when there is one; otherwise data whose decoded share exceeds
    data.in_memory_max_gib is prepared into a cache first and streamed from it, and smaller data is decoded into
    memory. The log says which and why.
    """
    d = config.data
    share = (0, 1) if whole else (process_index, process_count)
    start = time.perf_counter()
    path, manifest, raw, opened = _cache_and_source(config, split or d.split, *share)
    if manifest is not None:
        logging.info("data: reading the prepared cache %s", cache.summary(manifest, path))
        return cache.open_source(path, manifest, *share)
    share_gib = raw.share_bytes(share[1]) / 2**30
    if share_gib <= d.in_memory_max_gib:
        logging.info("data: %s decoded is %.3g GiB per host, within data.in_memory_max_gib=%g: decoding it into "
                     "memory", raw.name, share_gib, d.in_memory_max_gib)
        return _decode_into_memory(raw, start, *share)
    logging.info("data: %s decoded is %.3g GiB per host, over data.in_memory_max_gib=%g: preparing a cache at %s "
                 "and streaming from it", raw.name, share_gib, d.in_memory_max_gib, path)
    if fileio.is_remote(path) and process_index != 0:
        manifest = cache.wait_for(path)  # process 0 writes a bucket's cache; the others wait for its manifest
    else:
        manifest = cache.prepare(raw if share[1] == 1 else opened(), path, cache.dataset_id(d.dataset))
    return cache.open_source(path, manifest, *share)


def prepare_from_config(config: ml_collections.ConfigDict, split: str | None = None) -> tuple[str, dict, bool]:
    """Prepares the cache of config.data's dataset and split (whatever its size): (path, manifest, newly built)."""
    path, manifest, raw, _ = _cache_and_source(config, split or config.data.split, 0, 1)
    if manifest is not None:
        return path, manifest, False
    return path, cache.prepare(raw, path, cache.dataset_id(config.data.dataset)), True


def _cache_and_source(
    config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> tuple[str, dict | None, RawDataset | None, Callable[[], RawDataset]]:
    """The cache folder, its checked manifest (None if there is no complete cache), the opened source (None only
    when it cannot be opened but its cache can be read) and how to open the whole source."""
    d = config.data
    dataset = cache.dataset_id(d.dataset)
    path = cache.cache_path(d.cache_dir, dataset, split, d.image_size)
    manifest = cache.read_manifest(path)
    opened = functools.partial(open_dataset, d.dataset, d.image_size, split=split,
                               tfds_data_dir=d.tfds_data_dir or None)
    try:
        raw = opened(process_index=process_index, process_count=process_count)
    except DataError as e:
        if manifest is None:
            raise
        logging.warning("data: cannot open %s here (%s); reading its prepared cache as it is", d.dataset, e)
        raw = None
    if manifest is not None:
        cache.check(manifest, path, dataset, split, d.image_size, raw)
    return path, manifest, raw, opened


def check_class_labels(config: ml_collections.ConfigDict, source: ImageSource) -> tuple[str, ...] | None:
    """Checks model.num_classes against the dataset's labels; returns the class names (None when unconditional).

    Raises DataError when a class-conditional model meets data without labels, and ConfigError when the counts
    differ, naming the classes found. Called after loading the data and before anything is compiled.
    """
    k = config.model.num_classes
    if k == 0:
        return None
    found = getattr(source, "class_names", None)
    if found is None or getattr(source, "labels", None) is None:
        raise DataError(
            f"model.num_classes={k} needs class labels, but data.dataset={config.data.dataset} has none. Labels come "
            "from the sub-folder names of an image folder (all images in first-level sub-folders, one per class), "
            "IDX label files, a TFDS 'label' feature or a parquet 'label' column; or set model.num_classes=0"
        )
    if len(found) != k:
        shown = ", ".join(found[:12]) + (f", ... ({len(found) - 12} more)" if len(found) > 12 else "")
        raise ConfigError(
            f"model.num_classes={k} but data.dataset={config.data.dataset} has {len(found)} classes ({shown}); "
            f"set --config.model.num_classes={len(found)}"
        )
    names = tuple(config.data.class_names)
    return names if names else tuple(found)


def input_files(spec: str, key: str) -> list[pathlib.Path]:
    """Image files named by `spec`: the images directly inside a folder (in name order) or a comma-separated list."""
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        files = local.list_image_files(path, recursive=False)
        if not files:
            exts = "/".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
            raise DataError(f"{key}: folder {path} holds no image files ({exts})")
        return files
    files = [pathlib.Path(p.strip()).expanduser() for p in spec.split(",") if p.strip()]
    for f in files:
        if not f.is_file():
            raise DataError(
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
    if not spec:
        source = source_from_config(config)
        return source.get_batch(np.arange(min(num_images, len(source)))), None
    files = input_files(spec, key)[:num_images]
    images = np.stack([load_image(f, config.data.image_size) for f in files])
    return images, [_oriented_size(f) for f in files]
