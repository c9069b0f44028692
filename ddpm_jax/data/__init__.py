"""Datasets -> per-host uint8 image batches, with no TensorFlow and no iterator state: the one data interface.

Every source is decoded once into host memory as uint8 images at the target resolution (an `ArraySource`). The batch
for training step `s` is a pure function of (seed, step, this host's share of the data), so resuming at any step
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

import os
import pathlib
import time

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from ddpm_jax.data import hints, huggingface, local, tfds
from ddpm_jax.data.batching import batch_indices, train_batches
from ddpm_jax.data.decode import load_image
from ddpm_jax.data.local import IMAGE_EXTENSIONS
from ddpm_jax.data.source import ArraySource, ImageSource
from ddpm_jax.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS", "ArraySource", "DataError", "ImageSource", "batch_indices", "check_class_labels",
    "create_source", "load_image", "load_inputs", "source_from_config", "train_batches",
]


def create_source(
    dataset: str | os.PathLike[str],
    image_size: int,
    *,
    split: str = "train",
    tfds_data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> ArraySource:
    """Loads this host's share (examples i with i % process_count == process_index) of `dataset` into memory."""
    if not isinstance(image_size, int | np.integer) or image_size < 1:
        raise DataError(f"data.image_size must be a positive integer, got {image_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index must be in [0, process_count), got {process_index} of {process_count}")
    spec = os.fspath(dataset).strip() if dataset is not None else ""
    if not spec:
        raise DataError(f"data.dataset is empty; use {hints.ACCEPTED_FORMS}")
    image_size = int(image_size)
    shard = (process_index, process_count)
    start = time.perf_counter()

    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        idx_file = local.find_idx_file(path, split)
        if idx_file is not None:
            images = local.load_idx(idx_file, image_size, *shard)
            labels, class_names = local.load_idx_labels(idx_file, *shard)
        else:
            images, labels, class_names = local.load_folder(
                local.folder_for_split(path, split), image_size, *shard, bare_name=not local.looks_like_path(spec)
            )
    elif spec.startswith(hints.HF_PREFIX):
        repo_id = spec[len(hints.HF_PREFIX) :].strip()
        images, labels, class_names = huggingface.load_huggingface(repo_id, image_size, split, *shard)
    elif local.looks_like_path(spec):
        if path.exists():
            raise DataError(
                f"data.dataset: {spec} is a file, not a folder; point it at the folder that holds the images"
            )
        raise DataError(f"data.dataset: folder {spec} does not exist; use {hints.ACCEPTED_FORMS}")
    else:
        images, labels, class_names = tfds.load_tfds(spec, image_size, split, tfds_data_dir, *shard)

    logging.info(
        "data: %s (split %s, host %d of %d): %d images at %dx%d in %.1f s%s", spec, split, process_index,
        process_count, len(images), image_size, image_size, time.perf_counter() - start,
        f", {len(class_names)} classes" if class_names is not None else "",
    )
    return ArraySource(images, labels, class_names)


def source_from_config(
    config: ml_collections.ConfigDict, *, split: str | None = None, process_index: int = 0, process_count: int = 1
) -> ArraySource:
    """config.data's dataset at data.image_size, split `split` (default data.split), this host's share of it."""
    d = config.data
    return create_source(d.dataset, d.image_size, split=split or d.split, tfds_data_dir=d.tfds_data_dir or None,
                         process_index=process_index, process_count=process_count)


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
