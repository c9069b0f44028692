"""Hugging Face dataset repos (`huggingface:OWNER/NAME`): their parquet files, downloaded once into the HF cache."""

from __future__ import annotations

import json
import os
import pathlib
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from ddpm_jax.data import decode, hints, network
from ddpm_jax.data.raw import RawDataset, file_stamp, fingerprint
from ddpm_jax.errors import DataError


def _env_flag(name: str) -> bool:
    """Hugging Face's convention for boolean environment variables."""
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_download(repo_id: str) -> pathlib.Path:
    """Local snapshot folder of the repo's parquet files: from the cache when offline, else downloaded."""
    # Lazy: a slow import that only this route needs.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    name = f"{hints.HF_PREFIX}{repo_id}"
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if _env_flag("HF_HUB_OFFLINE"):
        why = "HF_HUB_OFFLINE is set"
    elif not network.reachable(host, port):
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
                f"Download it elsewhere, or {hints.LOCAL_FOLDER_HINT}"
            ) from e
        except Exception as e:
            raise DataError(f"cannot read {name} from the Hugging Face cache ({why}): {decode.reason(e)}") from e
        logging.info("%s: %s; using the cached copy in %s", name, why, root)
        return pathlib.Path(root)
    try:
        return pathlib.Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, HTTP and disk errors
        raise DataError(
            f"cannot download {name}: {decode.reason(e)}. Check the name (private or gated repos need HF_TOKEN), "
            f"or {hints.LOCAL_FOLDER_HINT}"
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


def open_huggingface(repo_id: str, image_size: int, split: str, process_index: int, process_count: int) -> RawDataset:
    """A Hugging Face dataset repo (parquet, column `image`) with its labels, if any, opened (downloaded once)."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise DataError(f"data.dataset: {hints.HF_PREFIX}{repo_id!r} is not of the form {hints.HF_PREFIX}OWNER/NAME")
    root = _hf_download(repo_id)
    files = sorted(root.rglob("*.parquet"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"{hints.HF_PREFIX}{repo_id} has no parquet files; {hints.LOCAL_FOLDER_HINT}")
    files = _select_split_files(files, root, split, f"{hints.HF_PREFIX}{repo_id}")
    return open_parquet(files, image_size, split=split, process_index=process_index, process_count=process_count,
                        name=f"{hints.HF_PREFIX}{repo_id}")


def _decode_hf_image(value: Any, image_size: int) -> np.ndarray:
    """Decodes one cell of a Hugging Face `image` column ({"bytes", "path"} struct, or raw bytes)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None:
            if path and os.path.isfile(path):
                return decode.load_image(path, image_size)
            raise ValueError(f"image cell has no bytes (path={path!r})")
    else:
        data = value
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image cell is a {type(data).__name__}, not encoded image bytes")
    return decode.image_from_bytes(bytes(data), image_size)


def read_parquet_images(
    files: Sequence[str | os.PathLike], image_size: int, *, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
    """Decodes the `image` column of parquet files (rows numbered across files in order) -> uint8 (N, S, S, 3)."""
    return read_parquet(files, image_size, process_index=process_index, process_count=process_count)[0]


def read_parquet(
    files: Sequence[str | os.PathLike], image_size: int, *, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """This host's decoded images of the `image` column, with their labels and the class names when there are any."""
    source = open_parquet(files, image_size, process_index=process_index, process_count=process_count).load()
    return source.images, source.labels, source.class_names


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


def open_parquet(
    files: Sequence[str | os.PathLike], image_size: int, *, split: str = "train", process_index: int = 0,
    process_count: int = 1, name: str | None = None,
) -> RawDataset:
    """This host's rows of the `image` column of parquet files, opened, with their labels and class names if any."""
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
    mine = decode.host_share(total, process_index, process_count, f"parquet files ({files[0].parent})")
    labels, class_names = _read_parquet_labels(files)  # every row: hosts must agree on the classes

    def rows() -> Iterator[tuple[str, Any, int | None]]:
        row = 0
        for f in files:
            in_file = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["image"]):
                n = batch.num_rows
                keep = np.nonzero((row + np.arange(n)) % process_count == process_index)[0]
                cells = batch.column(0).take(pa.array(keep)).to_pylist()  # only this host's rows are copied
                for k, cell in zip(keep, cells, strict=True):
                    label = None if labels is None else int(labels[row + int(k)])
                    yield f"{f} row {in_file + int(k)}", cell, label
                row += n
                in_file += n

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        return decode.decoded_chunks(rows(), len(mine), lambda v: _decode_hf_image(v, image_size),
                                     str(files[0].parent), kind="parquet rows")

    stamp = fingerprint("parquet", [file_stamp(f, blob_links=True) for f in files])
    return RawDataset(name=name or str(files[0].parent), split=split, image_size=image_size, count=len(mine),
                      total=total, class_names=class_names, fingerprint=stamp, chunks=chunks)
