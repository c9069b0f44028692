"""Workdir paths that are local folders or bucket URLs (gs://): resolving them and writing whole files safely.

Checkpoints go through Orbax, which speaks gs:// itself; everything else a run writes (config, pictures, arrays,
metrics) goes through here. Bucket access needs the `gcs` extra: pip install "ddpm_jax[gcs]".
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Mapping

import numpy as np
from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as gs://bucket/dir, False for local paths."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """A local path made absolute (Orbax needs that), or a URL with its trailing slash removed."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Writes a whole file, creating its folder; a reader never sees it half-written. Returns the path."""
    path = os.fspath(path)
    if is_remote(path):
        epath.Path(path).write_bytes(data)  # An object store swaps in a whole object at once.
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> str:
    """write_bytes for UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"))


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], compress: bool = True) -> str:
    """Writes named arrays as an .npz (compressed unless told otherwise) with write_bytes; returns the path."""
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def read_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8 text; FileNotFoundError if it does not exist."""
    return epath.Path(os.fspath(path)).read_text()


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or folder exists at path."""
    return epath.Path(os.fspath(path)).exists()


def is_dir(path: str | os.PathLike) -> bool:
    """Whether path is a folder (a prefix holding objects, in a bucket)."""
    return epath.Path(os.fspath(path)).is_dir()
