"""Random access to a host's images: the `ImageSource` protocol, the in-memory `ArraySource` and the cached one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ddpm_jax.errors import DataError


@runtime_checkable
class ImageSource(Protocol):
    """Random access to a host's images: uint8 (len(indices), S, S, 3) for any integer index array."""

    def __len__(self) -> int:
        """Number of examples this host holds."""
        ...

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """The uint8 images at `indices`, shape (len(indices), S, S, 3)."""
        ...


class _LabelledImages:
    """What both sources share: their `.labels` (int32 per image, or None) and `.class_names` (or None)."""

    labels: np.ndarray | None
    class_names: tuple[str, ...] | None
    image_size: int

    def get_labels(self, indices: np.ndarray) -> np.ndarray:
        """The int32 class labels at `indices`; DataError when the data has none."""
        if self.labels is None:
            raise DataError("this dataset has no class labels")
        return np.take(self.labels, np.asarray(indices), axis=0)

    def __repr__(self) -> str:
        """Short description with count, size and classes."""
        classes = f", {len(self.class_names)} classes" if self.class_names is not None else ""
        return f"{type(self).__name__}({len(self)} images, {self.image_size}x{self.image_size}{classes})"


class ArraySource(_LabelledImages):
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



class CachedSource(_LabelledImages):
    """`ImageSource` over a prepared cache's ArrayRecord shards: this host's images read by index, never held whole.

    The cache holds the whole dataset in order; this host's share is every example i with i % process_count ==
    process_index, the same share and order as an in-memory `ArraySource` of the same data, so batches are equal.
    `.labels` (int32, this host's) and `.class_names` are None for data without class labels.
    """

    def __init__(
        self, shard_paths: Sequence[str], image_size: int, count: int, labels: np.ndarray | None,
        class_names: Sequence[str] | None, process_index: int = 0, process_count: int = 1,
    ) -> None:
        """Opens the shards (one record of S*S*3 uint8 bytes per image, `count` in all) for random access."""
        from array_record.python import array_record_data_source  # lazy: ~0.1 s, and only cached data needs it

        self._records = array_record_data_source.ArrayRecordDataSource(list(shard_paths))
        if len(self._records) != count:
            raise DataError(f"the cache's shards hold {len(self._records)} images, its manifest says {count}; "
                            f"it is damaged: delete {shard_paths[0].rsplit('/', 1)[0]} and prepare it again")
        self._ids = np.arange(process_index, count, process_count, dtype=np.int64)
        self._size = int(image_size)
        self.labels = None if labels is None else np.asarray(labels, np.int32)[self._ids]
        self.class_names = None if class_names is None else tuple(str(n) for n in class_names)

    @property
    def image_size(self) -> int:
        """Side length S of the square images."""
        return self._size

    def __len__(self) -> int:
        """Number of images in this host's share."""
        return int(self._ids.shape[0])

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """Reads the images at `indices` (positions in this host's share) into a new uint8 array (n, S, S, 3)."""
        keys = self._ids[np.asarray(indices, np.int64)]
        s = self._size
        out = np.empty((len(keys), s, s, 3), np.uint8)
        for i, record in enumerate(self._records.__getitems__(keys.tolist())):
            out[i] = np.frombuffer(record, np.uint8).reshape(s, s, 3)
        return out
