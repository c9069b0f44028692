"""Prepared caches: ArrayRecord shards that read back as the in-memory data, the automatic choice, atomic writes,
every kind of bad cache refused in one line with nothing lost, and streamed training that resumes exactly."""

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import pathlib
import shutil

import fault_injection as fi
import numpy as np
import pytest
from helpers import tiny_config

from ddpm_jax import data
from ddpm_jax.data import cache
from ddpm_jax.errors import DataError


def _config(dataset, cache_dir, image_size=8, max_gib=0.0):
    config = tiny_config(str(dataset), image_size)
    config.data.cache_dir, config.data.in_memory_max_gib = str(cache_dir), max_gib
    return config


def _cache_folders(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.iterdir() if (p / cache.MANIFEST).is_file())


def test_a_cache_reads_back_as_the_decoded_data_in_every_host_share(class_tree, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_BYTES", 8 * 8 * 3 * 5)  # 5 images per shard: reads cross shard boundaries
    config = _config(class_tree, tmp_path / "caches")
    path, manifest, built = data.prepare_from_config(config)
    assert built and _cache_folders(tmp_path / "caches") == [pathlib.Path(path)]
    memory = data.create_source(str(class_tree), 8)
    assert manifest["count"] == len(memory) == 18 and manifest["skipped"] == 0
    assert [s["records"] for s in manifest["shards"]] == [5, 5, 5, 3]
    assert manifest["class_names"] == list(memory.class_names)
    expected = hashlib.sha256(memory.images.tobytes() + memory.labels.astype(np.int32).tobytes()).hexdigest()
    assert manifest["sha256"] == expected
    for share in ((0, 1), (0, 2), (1, 2), (2, 3)):
        streamed = cache.open_source(path, manifest, *share)
        in_memory = data.create_source(str(class_tree), 8, process_index=share[0], process_count=share[1])
        order = np.random.default_rng(0).permutation(len(in_memory))
        assert len(streamed) == len(in_memory)
        assert np.array_equal(streamed.get_batch(order), in_memory.get_batch(order))
        assert np.array_equal(streamed.get_labels(order), in_memory.get_labels(order))
        assert streamed.class_names == in_memory.class_names
    # Prepared again: kept, not rebuilt.
    assert data.prepare_from_config(config)[1:] == (manifest, False)


def test_source_from_config_chooses_memory_or_cache_by_size_and_logs_why(butterflies_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    small = data.source_from_config(_config(butterflies_dir, tmp_path, max_gib=1.0))
    assert isinstance(small, data.ArraySource) and not list(tmp_path.iterdir())
    assert "within data.in_memory_max_gib=1: decoding it into memory" in caplog.text
    # 101 images of 8x8x3 over 2 hosts: the larger share, 51 images, is 9.12e-6 GiB; every host decides by it.
    large = data.source_from_config(_config(butterflies_dir, tmp_path, max_gib=9e-6), process_index=1,
                                    process_count=2)
    assert "decoded is 9.12e-06 GiB per host, over data.in_memory_max_gib=9e-06: preparing a cache" in caplog.text
    assert isinstance(large, data.CachedSource) and len(large) == 50 and len(_cache_folders(tmp_path)) == 1
    memory = data.create_source(str(butterflies_dir), 8, process_index=1, process_count=2)
    assert np.array_equal(large.get_batch(np.arange(50)), memory.images)
    caplog.clear()
    # Once prepared, the cache is read whatever the size.
    assert isinstance(data.source_from_config(_config(butterflies_dir, tmp_path, max_gib=1.0)), data.CachedSource)
    assert "reading the prepared cache" in caplog.text


def test_batches_from_the_cache_equal_batches_from_memory_with_any_worker_count(butterflies_dir, tmp_path):
    config = _config(butterflies_dir, tmp_path)
    streamed, memory = data.source_from_config(config), data.create_source(str(butterflies_dir), 8)
    one = data.train_batches(memory, batch_size=16, seed=3, start_step=5)
    three = data.train_batches(streamed, batch_size=16, seed=3, start_step=5, workers=3, prefetch=6)
    for _ in range(20):  # 320 images: more than three epochs of 101
        assert np.array_equal(next(one)["image"], next(three)["image"])
    one.close()
    three.close()


def test_an_interrupted_prepare_never_looks_complete_and_the_next_one_restarts(butterflies_dir, tmp_path, caplog):
    config = _config(butterflies_dir, tmp_path)
    path = cache.cache_path(config.data.cache_dir, config.data.dataset, "train", 8)
    raw = data.open_dataset(str(butterflies_dir), 8)

    def dies_after_the_first_chunk():
        chunks = raw.chunks()
        yield next(chunks)
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of writing

    broken = dataclasses.replace(raw, chunks=dies_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare(broken, path, config.data.dataset)
    assert not os.path.exists(path) and not os.path.exists(f"{path}.incomplete")
    # A SIGKILL leaves the partial folder behind: shards, no manifest, under the .incomplete name.
    os.makedirs(f"{path}.incomplete")
    pathlib.Path(f"{path}.incomplete/images-00000.array_record").write_bytes(b"\0" * 100)
    assert cache.read_manifest(path) is None
    caplog.set_level(logging.INFO)
    source = data.source_from_config(config)
    assert "left by an interrupted prepare" in caplog.text and len(source) == 101
    assert not os.path.exists(f"{path}.incomplete")


def _prepared(dataset, tmp_path, image_size=8):
    config = _config(dataset, tmp_path / "caches", image_size)
    path, manifest, _ = data.prepare_from_config(config)
    return config, pathlib.Path(path), manifest


def _listing(folder: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def test_a_cache_of_another_resolution_or_of_changed_data_is_refused_in_one_line(butterflies_dir, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(butterflies_dir / "smithsonian", folder)
    config, path, _ = _prepared(folder, tmp_path)
    before = _listing(path)
    config.data.cache_dir = str(path)  # pointed at the cache itself
    config.data.image_size = 16
    with pytest.raises(DataError, match=r"holds .* at 8x8, not .* at 16x16; delete it") as e:
        data.source_from_config(config)
    assert "\n" not in str(e.value)
    config.data.image_size = 8
    shutil.copy(next(folder.glob("*.jpg")), folder / "new.jpg")
    with pytest.raises(DataError, match=r"changed since its cache .* was prepared \(10 items then, 11 now\)"):
        data.source_from_config(config)
    with pytest.raises(DataError, match="changed since"):
        data.prepare_from_config(config)
    assert _listing(path) == before  # nothing prepared was lost or rewritten


def test_a_half_written_or_damaged_cache_is_refused_in_one_line(butterflies_dir, tmp_path):
    config, path, manifest = _prepared(butterflies_dir, tmp_path)
    shard = path / manifest["shards"][0]["file"]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(DataError, match=r"half-written or damaged: images-00000.array_record has \d+ bytes"):
        data.source_from_config(config)
    (path / cache.MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest.json"):
        data.source_from_config(config)


def test_an_unwritable_cache_dir_or_a_folder_of_other_files_is_refused_before_decoding(butterflies_dir, tmp_path,
                                                                                        monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    raw = data.open_dataset(str(butterflies_dir), 8)
    never = dataclasses.replace(raw, chunks=lambda: pytest.fail("decoded before the check"))
    monkeypatch.setattr(data, "open_dataset", lambda *a, **k: never)
    with pytest.raises(DataError, match=r"data.cache_dir: cannot write a cache in .*a_file.*choose a writable"):
        data.source_from_config(_config(butterflies_dir, blocker / "caches"))
    config = _config(butterflies_dir, tmp_path / "caches")
    path = pathlib.Path(cache.cache_path(config.data.cache_dir, config.data.dataset, "train", 8))
    path.mkdir(parents=True)
    (path / "my_notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds files that are not a cache \(my_notes.txt\)"):
        data.source_from_config(config)
    assert (path / "my_notes.txt").read_text() == "mine"


def test_unreadable_files_are_skipped_and_counted_and_the_cache_serves_when_its_source_is_gone(butterflies_dir,
                                                                                                tmp_path, caplog):
    folder = tmp_path / "images"
    shutil.copytree(butterflies_dir / "caltech101", folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    config, _, manifest = _prepared(folder, tmp_path)
    assert manifest["skipped"] == 1 and manifest["total"] == 92
    with pytest.MonkeyPatch.context() as mp:  # The same folder by a relative path: the same cache.
        mp.chdir(tmp_path)
        relative = _config("images", tmp_path / "caches")
        assert data.prepare_from_config(relative)[1:] == (manifest, False)
    shutil.rmtree(folder)
    caplog.set_level(logging.WARNING)
    source = data.source_from_config(config)
    assert len(source) == manifest["count"] == 91 and "reading its prepared cache as it is" in caplog.text


def test_prepare_mode_prints_the_cache_and_refuses_a_cache_of_other_data_in_one_line(butterflies_dir, class_tree,
                                                                                      tmp_path):
    result = fi.run_main(tmp_path / "wd", str(butterflies_dir), mode="prepare",
                         **{"data.cache_dir": str(tmp_path / "caches")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cache: " in result.stdout and "101 images of" in result.stdout and "at 8x8, 1 shards" in result.stdout
    assert "prepared: " in result.stdout and "images/s" in result.stdout
    (cache_folder,) = _cache_folders(tmp_path / "caches")
    manifest = json.loads((cache_folder / cache.MANIFEST).read_text())
    assert manifest["dataset"] == str(butterflies_dir) and manifest["image_size"] == 8
    result = fi.run_main(tmp_path / "wd", str(class_tree), mode="prepare", **{"data.cache_dir": str(cache_folder)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: the cache at ")
    assert f"holds {butterflies_dir} split train at 8x8, not {class_tree}" in result.stderr
    assert not (tmp_path / "wd").exists()


def test_sigkill_then_rerun_streamed_from_the_cache_equals_the_in_memory_reference_run(
        tmp_path, butterflies_dir, reference_run_arrays):
    """Streamed from a cache (prepared by the first run), killed, rerun: bitwise the reference run, which trained on
    the same data decoded into memory and was never interrupted."""
    caches = tmp_path / "caches"
    fi.scenario_sigkill_exact_resume(tmp_path, str(butterflies_dir), straight=reference_run_arrays[0],
                                     **{"data.in_memory_max_gib": 0.0, "data.cache_dir": str(caches)})
    (folder,) = _cache_folders(caches)
    assert json.loads((folder / cache.MANIFEST).read_text())["count"] == 101


def _write_idx(folder: pathlib.Path, count: int, size: int) -> pathlib.Path:
    """A synthetic MNIST-style IDX images file of `count` random size x size grayscale images."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "train-images-idx3-ubyte", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([count, size, size], ">u4").tobytes())
        for lo in range(0, count, 5000):
            f.write(rng.integers(0, 256, (min(5000, count - lo), size, size), np.uint8).tobytes())
    return folder


def _peak_rss_mib(result) -> float:
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stderr.rsplit("peak_rss_mib: ", 1)[1].split()[0])


def test_training_from_a_cache_of_40000_images_holds_far_less_than_the_dataset(tmp_path, monkeypatch):
    """40,000 images of 64x64 (469 MiB decoded) streamed from their cache: the whole --mode=train process peaks
    less than 150 MiB above the same run on 1,000 images in memory (11.7 MiB), so the images are never all resident.
    Decoded into memory they alone would add 469 MiB."""
    big, small = _write_idx(tmp_path / "big", 40_000, 64), _write_idx(tmp_path / "small", 1_000, 64)
    run = {"data.image_size": 64, "model.attn_resolutions": (), "training.num_train_steps": 6,
           "training.checkpoint_every_steps": 6, "data.cache_dir": str(tmp_path / "caches")}
    launcher = (str(pathlib.Path(__file__).with_name("peak_rss.py")),)
    monkeypatch.setenv("DDPM_JAX_COMPILATION_CACHE", "")  # Both runs compile: a cache hit would peak lower.
    prepared = fi.run_main(tmp_path / "prepare", str(big), mode="prepare", **run)
    assert prepared.returncode == 0 and "40000 images of" in prepared.stdout, prepared.stderr[-3000:]
    memory = fi.run_main(tmp_path / "memory", str(small), launcher=launcher, **run)
    assert "decoding it into memory" in memory.stderr
    streamed = fi.run_main(tmp_path / "streamed", str(big), launcher=launcher, **run)
    assert "reading the prepared cache" in streamed.stderr and "step 6/6" in streamed.stderr
    growth = _peak_rss_mib(streamed) - _peak_rss_mib(memory)
    print(f"peak RSS: {_peak_rss_mib(memory):.0f} MiB in memory (1,000 images), {_peak_rss_mib(streamed):.0f} MiB "
          f"streamed (40,000 images): +{growth:.0f} MiB")
    assert growth < 150


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """gs:// served from a local folder through fsspec, as gcsfs would serve a bucket; returns that folder."""
    from etils.epath import backend
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "bucket_store"
    root.mkdir()

    class Bucket(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            return path.split("://", 1)[1] if "://" in path else path

    for name in ("gs", "gcs"):  # undone after the test: test_fileio needs gs:// to fail without gcsfs
        monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, name, Bucket)
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setattr(cache, "LOCAL_COPIES", str(tmp_path / "copies"))
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_a_bucket_cache_is_uploaded_manifest_last_and_read_through_a_local_copy(butterflies_dir, tmp_path, fake_bucket,
                                                                                caplog):
    config = _config(butterflies_dir, "gs://bucket/caches")
    caplog.set_level(logging.INFO)
    source = data.source_from_config(config, process_index=0, process_count=2)
    (folder,) = (fake_bucket / "bucket" / "caches").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["images-00000.array_record", "labels.npy", cache.MANIFEST]
    assert "copying the cache gs://bucket/caches/" in caplog.text
    memory = data.create_source(str(butterflies_dir), 8, process_index=0, process_count=2)
    assert np.array_equal(source.get_batch(np.arange(len(source))), memory.images)
    # Another process of the job, and a restart: the manifest is there, and the local copy is reused.
    caplog.clear()
    other = data.source_from_config(config, process_index=1, process_count=2)
    assert len(other) == 50 and "reading the prepared cache gs://bucket/caches/" in caplog.text
    assert "copying the cache" not in caplog.text


def test_waiting_for_a_bucket_cache_ends_when_its_manifest_appears(tmp_path):
    import threading

    folder = tmp_path / "cache"
    folder.mkdir()
    writer = threading.Timer(0.3, lambda: (folder / cache.MANIFEST).write_text(json.dumps({"count": 3})))
    writer.start()
    assert cache.wait_for(str(folder), poll_s=0.05) == {"count": 3}
    writer.join()
