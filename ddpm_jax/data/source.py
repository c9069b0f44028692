"""Random access to a host's images: the `ImageSource` protocol and the in-memory `ArraySource`."""

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
