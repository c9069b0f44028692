"""A dataset before it is decoded: how many items a host's share holds, its decoded chunks, what identifies it.

Every source module opens its data as a `RawDataset` without decoding anything (a file listing, file headers,
parquet metadata). From there it is either decoded whole into memory (`load`, an `ArraySource`) or streamed once
into a prepared cache (`cache.prepare`), chunk by chunk, never whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ddpm_jax.data.source import ArraySource


@dataclasses.dataclass(frozen=True)
class RawDataset:
    """One host's share of a dataset, opened but not decoded.

    `chunks()` decodes it: (uint8 images (n, S, S, 3), int32 labels (n,) or None) in item order, unreadable items
    skipped (DataError when none can be read). `fingerprint` changes whenever the source's content may have (file
    names, sizes and times, a TFDS version, ...); it describes the whole dataset, not the share.
    """

    name: str
    split: str
    image_size: int
    count: int  # items in this host's share
    total: int  # items in the whole dataset
    class_names: tuple[str, ...] | None
    fingerprint: str
    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray | None]]]

    def share_bytes(self, hosts: int = 1) -> int:
        """Bytes the largest of `hosts` equal shares of the whole dataset takes decoded (before unreadable items are
        skipped): what every host compares with data.in_memory_max_gib, so that all decide alike."""
        return -(-self.total // hosts) * self.image_size * self.image_size * 3

    def load(self) -> ArraySource:
        """Decodes the whole share into memory, filling one preallocated array (no second copy of the data)."""
        s = self.image_size
        images = np.empty((self.count, s, s, 3), np.uint8)
        labels = np.empty(self.count, np.int32) if self.class_names is not None else None
        n = 0
        for chunk, chunk_labels in self.chunks():
            images[n : n + len(chunk)] = chunk
            if labels is not None:
                labels[n : n + len(chunk)] = chunk_labels
            n += len(chunk)
        if n < self.count:  # some items were unreadable and skipped
            images, labels = images[:n].copy(), (None if labels is None else labels[:n].copy())
        return ArraySource(images, labels, self.class_names)


def file_stamp(
    path: pathlib.Path, root: pathlib.Path | None = None, *, blob_links: bool = False
) -> tuple[str, int, int | str]:
    """(name or path relative to root, size, modification time in ns) of a file, for a fingerprint. With blob_links,
    a link (into a Hugging Face cache, whose blobs are named by their content hash) gives the blob's name instead of
    the time, which a new download of the same content changes."""
    st = path.stat()
    name = path.relative_to(root).as_posix() if root is not None else path.name
    if blob_links and path.is_symlink():
        return name, st.st_size, os.path.realpath(path).rsplit(os.sep, 1)[-1]
    return name, st.st_size, st.st_mtime_ns


def fingerprint(*parts: Any) -> str:
    """A short sha256 hex digest of JSON-serialisable parts (file names, sizes, times, versions, ...)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]
