"""Hugging Face parquet datasets: decoding, labels, the cached copy, and the offline errors."""

import json
import logging
import pathlib
import time

import numpy as np
import pytest
from helpers import absl_warnings

from ddpm_jax import data
from ddpm_jax.data import huggingface, network
from ddpm_jax.errors import DataError


@pytest.fixture
def empty_hf_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty Hugging Face cache under tmp_path (the hub reads HF_HOME at import, so patch its constant too)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return home / "hub"


def _write_parquet(path: pathlib.Path, cells: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(cells, type=image_type), "label": pa.array(range(len(cells)), pa.int64())})
    pq.write_table(table, path)


def test_read_parquet_images(
    tmp_path: pathlib.Path, butterfly_files: list[pathlib.Path], caplog: pytest.LogCaptureFixture
) -> None:
    files = butterfly_files[:3] + butterfly_files[-3:]  # includes 2000 px Smithsonian photos
    cells = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    cells.insert(2, {"bytes": b"garbage", "path": "bad.jpg"})
    _write_parquet(tmp_path / "a.parquet", cells[:4])
    _write_parquet(tmp_path / "b.parquet", cells[4:])
    with caplog.at_level(logging.WARNING):
        images = huggingface.read_parquet_images([tmp_path / "a.parquet", tmp_path / "b.parquet"], 32)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    for img, f in zip(images, files, strict=True):
        assert np.array_equal(img, data.load_image(f, 32))  # bytes and files share one conversion
    assert any(
        "skipped 1 of 7 parquet rows" in m and "a.parquet row 2: ValueError: not a recognised image" in m
        for m in absl_warnings(caplog)
    )

    # Rows are numbered across files for per-host sharding.
    parts = [
        huggingface.read_parquet_images([tmp_path / "a.parquet", tmp_path / "b.parquet"], 32, process_index=i,
                                        process_count=2)
        for i in (0, 1)
    ]
    # Host 0 has rows 0, 2 (the bad one), 4, 6; host 1 has rows 1, 3, 5.
    assert np.array_equal(parts[0], images[[0, 3, 5]]) and np.array_equal(parts[1], images[[1, 2, 4]])

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": [b"x"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match="no 'image' column"):
        huggingface.read_parquet_images([tmp_path / "other.parquet"], 32)


def test_huggingface_offline_fails_fast(empty_hf_cache: pathlib.Path, offline: None) -> None:
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        data.create_source("huggingface:huggan/smithsonian_butterflies_subset", 32)
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert message.startswith("cannot download huggingface:huggan/smithsonian_butterflies_subset")
    assert "local folder" in message and "--config.data.dataset=" in message
    assert not any(empty_hf_cache.glob("**/*.parquet"))


def test_huggingface_offline_flag_and_cached_copy(
    empty_hf_cache: pathlib.Path, butterfly_files: list[pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(network, "can_connect", lambda *a, **k: pytest.fail("must not touch the network when offline"))
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set.*local folder"):
        data.create_source("huggingface:someone/tiny_butterflies", 16)

    # A snapshot already in the hub cache is used without network, with the split picked by file name.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "datasets--someone--tiny_butterflies"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / "data"
    snapshot.mkdir(parents=True)
    cells = [{"bytes": f.read_bytes(), "path": None} for f in butterfly_files[:7]]
    _write_parquet(snapshot / "train-00000-of-00001.parquet", cells[:5])
    _write_parquet(snapshot / "test-00000-of-00001.parquet", cells[5:7])
    train = data.create_source("huggingface:someone/tiny_butterflies", 16)
    assert train.images.shape == (5, 16, 16, 3)
    assert np.array_equal(train.images[4], data.load_image(butterfly_files[4], 16))
    assert len(data.create_source("huggingface:someone/tiny_butterflies", 16, split="test")) == 2
    with pytest.raises(DataError, match="no parquet files for split 'validation'"):
        data.create_source("huggingface:someone/tiny_butterflies", 16, split="validation")


def test_labels_from_parquet(tmp_path, class_tree):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(class_tree.glob("[!.]*/*.jpg"))[:4]
    cells = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf_meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": ["cat", "dog", "owl"], "_type": "ClassLabel"}}}}).encode()}
    table = pa.table({"image": pa.array(cells, type=image_type), "label": pa.array([2, 0, 2, 1], pa.int64())})
    pq.write_table(table.replace_schema_metadata(hf_meta), tmp_path / "named.parquet")
    images, labels, names = huggingface.read_parquet([tmp_path / "named.parquet"], 8)
    assert names == ("cat", "dog", "owl") and labels.tolist() == [2, 0, 2, 1] and images.shape == (4, 8, 8, 3)
    strings = pa.table({"image": pa.array(cells, type=image_type), "label": ["zebra", "ant", "zebra", "bee"]})
    pq.write_table(strings, tmp_path / "strings.parquet")
    _, labels, names = huggingface.read_parquet([tmp_path / "strings.parquet"], 8, process_index=1, process_count=2)
    assert names == ("ant", "bee", "zebra") and labels.tolist() == [0, 1]  # rows 1 and 3: classes of all rows
