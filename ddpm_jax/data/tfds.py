"""TFDS datasets (`cifar10`, `mnist`, ...), read from array_record files without TensorFlow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ddpm_jax.data import decode, hints, network
from ddpm_jax.data.raw import RawDataset, fingerprint
from ddpm_jax.errors import DataError


def _prepared_builder(tfds: Any, name: str, data_dir: str | None, where: str) -> Any:
    """The dataset's builder, prepared as array_record first if needed and possible; DataError in one line if not."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        what = "is neither an existing folder nor a TFDS dataset" if "/" in name else "is not a known TFDS dataset"
        raise DataError(f"data.dataset: {name!r} {what}; use {hints.ACCEPTED_FORMS}") from e
    except Exception as e:  # bad version or config, unparsable name
        raise DataError(
            f"data.dataset: cannot use TFDS dataset {name!r}: {decode.reason(e)}; use {hints.ACCEPTED_FORMS}"
        ) from e
    if builder.is_prepared():
        return builder
    # tfds retries an unreachable download for minutes; decide in seconds instead.
    if not network.reachable("storage.googleapis.com"):
        raise DataError(
            f"cannot download TFDS dataset {name!r}: no network connection to storage.googleapis.com and "
            f"{where} has no prepared copy. Prepare it where there is network "
            f"(tfds.builder({name!r}).download_and_prepare(file_format='array_record')) and copy that data dir "
            f"here with --config.data.tfds_data_dir=/path/to/tensorflow_datasets, or {hints.LOCAL_FOLDER_HINT}"
        )
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:
        raise DataError(
            f"cannot prepare TFDS dataset {name!r} in {where}: {decode.reason(e)}. Prepare it elsewhere and pass "
            f"--config.data.tfds_data_dir, or {hints.LOCAL_FOLDER_HINT}"
        ) from e
    return builder


def _image_source(tfds: Any, builder: Any, name: str, split: str, where: str) -> tuple[Any, bool]:
    """The split's random-access source (images left encoded when they are) and whether they are encoded."""
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
        return builder.as_data_source(split=split, decoders=decoders), encoded
    except Exception as e:  # typically a copy prepared as tfrecord, which needs TensorFlow to read
        raise DataError(
            f"cannot read TFDS dataset {name!r} from {where} without TensorFlow ({decode.reason(e)}); re-prepare it "
            f"with file_format='array_record' (tfds build {name} --file_format=array_record), or "
            f"{hints.LOCAL_FOLDER_HINT}"
        ) from e


def open_tfds(
    name: str, image_size: int, split: str, data_dir: str | None, process_index: int, process_count: int
) -> RawDataset:
    """A TFDS dataset's images and `label` ClassLabels, if any, opened; prepared as array_record first if needed."""
    import tensorflow_datasets as tfds  # Here, not at the top: ~1 s to import, and only this route needs it.

    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    builder = _prepared_builder(tfds, name, data_dir, where)
    source, encoded = _image_source(tfds, builder, name, split, where)
    features = builder.info.features
    mine = decode.host_share(len(source), process_index, process_count, f"TFDS {name} split {split}")
    class_label = features["label"] if "label" in features else None
    has_labels = isinstance(class_label, tfds.features.ClassLabel) and class_label.num_classes

    def records() -> Iterator[tuple[str, Any, int | None]]:
        for chunk in decode.chunks(mine, decode.CHUNK):
            # Batched array_record reads where the source supports them.
            examples = source.__getitems__(chunk) if hasattr(source, "__getitems__") else [source[i] for i in chunk]
            for i, example in zip(chunk, examples, strict=True):
                yield f"{name}[{split}][{i}]", example["image"], int(example["label"]) if has_labels else None

    def decode_image(value: Any) -> np.ndarray:
        if encoded:  # PNG/JPEG bytes: same conversion (and JPEG draft decoding) as image files
            return decode.image_from_bytes(value, image_size)
        return decode.array_to_square_rgb(np.asarray(value), image_size)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        return decode.decoded_chunks(records(), len(mine), decode_image, f"TFDS {name} split {split}", "examples")

    stamp = fingerprint("tfds", builder.info.full_name, split, len(source))
    return RawDataset(name=name, split=split, image_size=image_size, count=len(mine), total=len(source),
                      class_names=tuple(class_label.names) if has_labels else None, fingerprint=stamp, chunks=chunks)
