"""Prepared caches: a dataset decoded once at data.image_size into ArrayRecord shards, then read by index.

A cache is one folder (under data.cache_dir, named after the source, split and size, unless data.cache_dir is itself
a cache):
    images-00000.array_record, ...   one record per image, S*S*3 raw uint8 bytes; group_size 1 for random access
    labels.npy                       int32 (N,), when the data has class labels
    manifest.json                    written last: the source, split, size, count, skipped items, classes, shards
                                     (records and bytes), the source's fingerprint and the sha256 of the content

A local cache is written into `<cache>.incomplete` under a lock file and renamed into place when complete, so an
interrupted prepare never leaves a folder that looks complete, and the next one restarts it. A gs:// cache is written
locally, then uploaded with the manifest last; array_record reads only local files, so a gs:// cache is read through
a local copy (under ~/.cache/ddpm_jax/datasets/copies).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from absl import logging
from etils import epath

from ddpm_jax import fileio
from ddpm_jax.data import local
from ddpm_jax.data.raw import RawDataset
from ddpm_jax.data.source import CachedSource
from ddpm_jax.errors import DataError

FORMAT = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
SHARD_BYTES = 256 * 2**20  # ~256 MiB shards: few files for ImageNet-64 (61), many readers for parallel reads
_OURS = re.compile(r"^(images-\d{5}\.array_record|labels\.npy)$")
LOCAL_COPIES = os.path.expanduser("~/.cache/ddpm_jax/datasets/copies")


def dataset_id(dataset: str | os.PathLike[str]) -> str:
    """How a cache names its source: the absolute path of a local folder (by any relative path), else the spec."""
    spec = os.fspath(dataset).strip()
    if os.path.isdir(os.path.expanduser(spec)) or local.looks_like_path(spec):
        return os.path.abspath(os.path.expanduser(spec))
    return spec


def cache_path(cache_dir: str, dataset: str, split: str, image_size: int) -> str:
    """The cache folder of (dataset_id, split, image_size): data.cache_dir itself if it holds a cache, else in it."""
    root = fileio.resolve(os.path.expanduser(cache_dir))
    if fileio.exists(f"{root}/{MANIFEST}"):
        return root
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(dataset.rstrip("/")) or dataset).strip("_.") or "data"
    key = hashlib.sha256(dataset.encode()).hexdigest()
    return f"{root}/{slug[:40]}-{split}-{image_size}px-{key[:8]}"


def read_manifest(path: str) -> dict | None:
    """The cache's manifest, or None when there is no complete cache at `path`."""
    try:
        return json.loads(fileio.read_text(f"{path}/{MANIFEST}"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"the cache at {path} has an unreadable {MANIFEST} ({e}); delete {path} and prepare it again "
                        "(--mode=prepare)") from e


def check(manifest: dict, path: str, dataset: str, split: str, image_size: int, raw: RawDataset | None) -> None:
    """DataError in one line when the cache at `path` was built from other data, or its source changed since."""
    fix = f"delete it (rm -r {path}) to prepare it again, or choose another --config.data.cache_dir"
    if manifest.get("format") != FORMAT:
        raise DataError(f"the cache at {path} has format {manifest.get('format')}, this version reads {FORMAT}; {fix}")
    built = (manifest["dataset"], manifest["split"], manifest["image_size"])
    if built != (dataset, split, image_size):
        raise DataError(f"the cache at {path} holds {built[0]} split {built[1]} at {built[2]}x{built[2]}, not "
                        f"{dataset} split {split} at {image_size}x{image_size}; {fix}")
    if raw is not None and raw.fingerprint != manifest["fingerprint"]:
        raise DataError(f"{dataset} changed since its cache at {path} was prepared ({manifest['total']} items then, "
                        f"{raw.total} now); {fix}")


def open_source(path: str, manifest: dict, process_index: int = 0, process_count: int = 1) -> CachedSource:
    """This host's share of the cache at `path` (copied locally first when it is in a bucket)."""
    folder = _local_copy(path, manifest) if fileio.is_remote(path) else path
    shards = [os.path.join(folder, s["file"]) for s in manifest["shards"]]
    for shard, entry in zip(shards, manifest["shards"], strict=True):
        size = os.path.getsize(shard) if os.path.isfile(shard) else None
        if size != entry["bytes"]:
            raise DataError(f"the cache at {path} is half-written or damaged: {entry['file']} has "
                            f"{'no file' if size is None else f'{size} bytes'}, its manifest says {entry['bytes']}; "
                            f"delete {path} and prepare it again (--mode=prepare)")
    labels = np.load(os.path.join(folder, LABELS)) if manifest["class_names"] is not None else None
    return CachedSource(shards, manifest["image_size"], manifest["count"], labels, manifest["class_names"],
                        process_index, process_count)


def prepare(raw: RawDataset, path: str, dataset: str) -> dict:
    """Decodes the whole of `raw` (one host's share of all: process 0 of 1) into a cache at `path`; its manifest.

    Returns the manifest of a complete cache another process finished meanwhile instead of building it twice.
    """
    if raw.count != raw.total:
        raise ValueError("prepare needs the whole dataset (process_index=0, process_count=1)")
    if fileio.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="ddpm_jax_prepare_") as staging:
            manifest = _write(raw, staging, dataset)
            _upload(staging, path, manifest)
        return manifest
    parent = os.path.dirname(path)
    _check_writable(parent, raw.share_bytes())
    with _locked(f"{path}.lock"):
        manifest = read_manifest(path)
        if manifest is not None:
            return manifest  # another process prepared it while this one waited for the lock
        if os.path.exists(path):
            _refuse_foreign(path)
            shutil.rmtree(path)  # an interrupted upload or copy of our own files only
        partial = f"{path}.incomplete"
        if os.path.exists(partial):
            logging.warning("data: removing %s, left by an interrupted prepare, and starting again", partial)
            shutil.rmtree(partial)
        try:
            manifest = _write(raw, partial, dataset)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.rename(partial, path)
    return manifest


def wait_for(path: str, poll_s: float = 10.0) -> dict:
    """The manifest of the cache that another process is preparing at `path`, once it is complete."""
    start = time.monotonic()
    while (manifest := read_manifest(path)) is None:
        logging.log_every_n_seconds(logging.INFO, "data: waiting for process 0 to prepare the cache %s (%.0f s)", 300,
                                    path, time.monotonic() - start)
        time.sleep(poll_s)
    return manifest


def _write(raw: RawDataset, folder: str, dataset: str) -> dict:
    """Writes shards, labels and (last) the manifest of `raw` into `folder`; returns the manifest."""
    from array_record.python import array_record_module  # lazy: only preparing a cache needs it

    os.makedirs(folder, exist_ok=True)
    s = raw.image_size
    per_shard = max(1, SHARD_BYTES // (s * s * 3))
    digest, shards, labels = hashlib.sha256(), [], []
    start, writer, in_shard = time.perf_counter(), None, 0
    try:
        for images, chunk_labels in raw.chunks():
            if chunk_labels is not None:
                labels.append(chunk_labels)
            for image in images:
                if writer is None:
                    shards.append({"file": f"images-{len(shards):05d}.array_record", "records": 0})
                    writer = array_record_module.ArrayRecordWriter(os.path.join(folder, shards[-1]["file"]),
                                                                   "group_size:1,uncompressed")
                record = image.tobytes()
                writer.write(record)
                digest.update(record)
                in_shard += 1
                if in_shard == per_shard:
                    writer.close()
                    shards[-1]["records"], writer, in_shard = in_shard, None, 0
            logging.log_every_n_seconds(logging.INFO, "data: prepared %d of %d images", 30,
                                        sum(e["records"] for e in shards) + in_shard, raw.total)
    finally:
        if writer is not None:
            writer.close()
            shards[-1]["records"] = in_shard
    count = sum(e["records"] for e in shards)
    for entry in shards:
        entry["bytes"] = os.path.getsize(os.path.join(folder, entry["file"]))
    if raw.class_names is not None:
        all_labels = np.concatenate(labels).astype(np.int32)
        digest.update(all_labels.tobytes())
        with open(os.path.join(folder, LABELS), "wb") as f:
            np.save(f, all_labels)
    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT, "dataset": dataset, "split": raw.split, "image_size": s, "count": count,
        "total": raw.total, "skipped": raw.total - count,
        "class_names": list(raw.class_names) if raw.class_names is not None else None,
        "fingerprint": raw.fingerprint, "sha256": digest.hexdigest(), "shards": shards,
        "prepare_seconds": round(seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fileio.write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    logging.info("data: prepared %d images of %s at %dx%d in %.1f s (%.0f images/s), %d skipped", count, raw.name,
                 s, s, seconds, count / max(seconds, 1e-9), raw.total - count)
    return manifest


def _check_writable(parent: str, needed_bytes: int) -> None:
    """DataError before any decoding when `parent` cannot hold a cache of needed_bytes."""
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
            pass
    except OSError as e:
        raise DataError(f"data.cache_dir: cannot write a cache in {parent} ({type(e).__name__}: {e.strerror or e}); "
                        "choose a writable folder with --config.data.cache_dir") from e
    free = shutil.disk_usage(parent).free
    if free < needed_bytes * 1.02:
        raise DataError(f"data.cache_dir: the cache needs {needed_bytes / 2**30:.2f} GiB but {parent} has "
                        f"{free / 2**30:.2f} GiB free; free space or choose another --config.data.cache_dir")


def _refuse_foreign(path: str) -> None:
    """DataError when `path` holds files that no prepare wrote: they are the user's, and nothing here deletes them."""
    foreign = sorted(n for n in os.listdir(path) if not _OURS.match(n))
    if foreign:
        raise DataError(f"data.cache_dir: {path} exists and holds files that are not a cache ({', '.join(foreign[:3])}"
                        "); move them away or choose another --config.data.cache_dir")
    logging.warning("data: %s holds an unfinished cache (no %s); preparing it again", path, MANIFEST)


@contextlib.contextmanager
def _locked(lock_path: str) -> Iterator[None]:
    """An exclusive lock between the processes preparing the same cache (flock on a file beside it)."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _upload(staging: str, path: str, manifest: dict) -> None:
    """Copies a finished cache to a bucket, the manifest last so that a reader never sees a partial one."""
    target = epath.Path(path)
    target.mkdir(parents=True, exist_ok=True)
    for name in _data_files(manifest):
        epath.Path(staging, name).copy(target / name, overwrite=True)
    fileio.write_bytes(f"{path}/{MANIFEST}", epath.Path(staging, MANIFEST).read_bytes())


def _local_copy(path: str, manifest: dict) -> str:
    """A local copy of a bucket's cache (reused while its manifest is the same), for array_record to read; the
    processes of one host make it once, under a lock."""
    copy = os.path.join(LOCAL_COPIES, hashlib.sha256(path.encode()).hexdigest()[:16])
    os.makedirs(LOCAL_COPIES, exist_ok=True)
    with _locked(f"{copy}.lock"):
        if read_manifest(copy) == manifest:
            return copy
        partial = f"{copy}.incomplete"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        logging.info("data: copying the cache %s to %s", path, copy)
        for name in _data_files(manifest):
            epath.Path(path, name).copy(epath.Path(partial, name))
        with open(os.path.join(partial, MANIFEST), "w") as f:
            f.write(json.dumps(manifest, indent=1))
        shutil.rmtree(copy, ignore_errors=True)
        os.rename(partial, copy)
    return copy


def _data_files(manifest: dict) -> list[str]:
    """The files of a cache besides its manifest: the shards, and the labels when there are classes."""
    return [s["file"] for s in manifest["shards"]] + ([LABELS] if manifest["class_names"] is not None else [])


def summary(manifest: dict, path: str) -> str:
    """One line on a cache: where, how many images at what size, in how many shards."""
    gib = sum(s["bytes"] for s in manifest["shards"]) / 2**30
    return (f"{path}: {manifest['count']} images of {manifest['dataset']} ({manifest['split']}) at "
            f"{manifest['image_size']}x{manifest['image_size']}, {len(manifest['shards'])} shards, {gib:.2f} GiB")

