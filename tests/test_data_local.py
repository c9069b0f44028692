"""Local folders: real butterfly photos, unreadable files, splits, labels from sub-folders; IDX files."""

import gzip
import logging
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest
from helpers import CLASSES, absl_warnings, image_mode
from PIL import Image

from ddpm_jax import data
from ddpm_jax.data import local
from ddpm_jax.errors import DataError

BICUBIC = Image.Resampling.BICUBIC


def test_folder_of_real_butterflies(butterflies_dir: pathlib.Path, butterfly_files: list[pathlib.Path]) -> None:
    source = data.create_source(str(butterflies_dir), 32)
    images = source.images
    assert isinstance(source, data.ArraySource) and isinstance(source, data.ImageSource)
    assert images.shape == (101, 32, 32, 3) and images.dtype == np.uint8 and len(source) == 101

    gray = [i for i, f in enumerate(butterfly_files) if image_mode(f) == "L"]
    assert len(gray) == 5
    for i in gray:
        assert np.array_equal(images[i, ..., 0], images[i, ..., 1]) and np.array_equal(
            images[i, ..., 0], images[i, ..., 2]
        )
    colour = [i for i in range(101) if i not in gray]
    assert all(not np.array_equal(images[i, ..., 0], images[i, ..., 2]) for i in colour)

    # Plausible photo statistics: not blank, not saturated, per-image contrast.
    assert 60 < images.mean() < 200
    assert images.reshape(101, -1).std(axis=1).min() > 10
    assert images.min() < 20 and images.max() > 235

    # Order is the sorted file order, and a 2000 px JPEG decoded at reduced scale (draft) stays close to a full decode
    # followed by "shorter side to 32, centre crop" -- this also checks the crop geometry.
    big = next(i for i, f in enumerate(butterfly_files) if "smithsonian" in f.parts)
    with Image.open(butterfly_files[big]) as img:
        w, h = img.size
        s = 32 / min(w, h)
        full = img.convert("RGB").resize((round(w * s), round(h * s)), BICUBIC)
    left, top = (full.width - 32) // 2, (full.height - 32) // 2
    reference = np.asarray(full.crop((left, top, left + 32, top + 32)), dtype=np.float32)
    assert np.abs(images[big].astype(np.float32) - reference).mean() < 8
    assert np.array_equal(images[big], data.load_image(butterfly_files[big], 32))
    assert np.array_equal(images[gray[0]], data.load_image(butterfly_files[gray[0]], 32))


def test_folder_skips_unreadable_files(
    tmp_path: pathlib.Path, butterfly_files: list[pathlib.Path], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for f in butterfly_files[:4]:
        shutil.copy(f, folder / f.name)
    shutil.copy(butterfly_files[5], folder / "sub" / "UPPER.JPG")  # nested, upper-case extension
    (folder / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(4000))
    big = next(f for f in butterfly_files if "smithsonian" in f.parts)
    encoded = big.read_bytes()
    (folder / "truncated.jpg").write_bytes(encoded[: len(encoded) // 3])
    (folder / "notes.txt").write_text("not an image, not counted")
    (folder / ".hidden.jpg").write_bytes(b"ignored: hidden files are not dataset images")

    with caplog.at_level(logging.WARNING):
        source = data.create_source(str(folder), 24)
    assert source.images.shape == (5, 24, 24, 3)
    warnings = [m for m in absl_warnings(caplog) if "skipped" in m]
    assert len(warnings) == 1, absl_warnings(caplog)
    assert f"skipped 2 of 7 files under {folder}" in warnings[0]
    assert "corrupt.jpg" in warnings[0]  # the first failure in sorted order, with its reason
    with pytest.raises(DataError, match="truncated.jpg"):
        data.load_image(folder / "truncated.jpg", 24)


def test_folder_errors(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="contains no image files"):
        data.create_source(str(empty), 32)
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="contains no image files"):
        data.create_source(str(empty), 32)

    missing = tmp_path / "does_not_exist"
    with pytest.raises(DataError, match=f"folder {missing} does not exist"):
        data.create_source(str(missing), 32)
    with pytest.raises(DataError, match="does not exist"):
        data.create_source("./no/such/folder", 32)
    with pytest.raises(DataError, match="is a file, not a folder"):
        data.create_source(str(empty / "readme.txt"), 32)

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.png"):
        (broken / name).write_bytes(b"definitely not an image")
    with pytest.raises(DataError, match=r"none of the 2 files under .*broken could be read as images"):
        data.create_source(str(broken), 32)


def test_folder_split_subfolders(tmp_path: pathlib.Path, butterfly_files: list[pathlib.Path]) -> None:
    for split, files in (("train", butterfly_files[:3]), ("test", butterfly_files[3:5])):
        (tmp_path / split).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / split / f.name)
    assert len(data.create_source(str(tmp_path), 16)) == 3
    assert len(data.create_source(str(tmp_path), 16, split="test")) == 2
    with pytest.raises(DataError, match="no subfolder 'validation'"):
        data.create_source(str(tmp_path), 16, split="validation")


def test_labels_from_sub_folder_names(class_tree, tmp_path):
    source = data.create_source(str(class_tree), 8)
    assert source.class_names == CLASSES
    files = sorted(p for p in class_tree.glob("[!.]*/*.jpg"))
    assert len(source) == len(files) == 18 and source.labels.dtype == np.int32
    for img, label, f in zip(source.images, source.labels, files, strict=True):
        assert CLASSES[label] == f.parent.name and np.array_equal(img, data.load_image(f, 8))

    # An unreadable file is skipped and the labels stay aligned with the images that remain.
    broken = tmp_path / "broken"
    for name in CLASSES[:2]:
        (broken / name).mkdir(parents=True)
    (broken / CLASSES[0] / "0.jpg").write_bytes(b"not a jpeg")
    os.symlink(files[0], broken / CLASSES[0] / "1.jpg")
    os.symlink(files[7], broken / CLASSES[1] / "2.jpg")
    skipped = data.create_source(str(broken), 8)
    assert skipped.labels.tolist() == [0, 1] and np.array_equal(skipped.images, source.images[[0, 7]])

    # Every host numbers the classes alike and holds the labels of its own share.
    halves = [data.create_source(str(class_tree), 8, process_index=i, process_count=2) for i in (0, 1)]
    assert all(h.class_names == CLASSES for h in halves)
    assert np.array_equal(np.concatenate([h.labels for h in halves]), source.labels[np.r_[0:18:2, 1:18:2]])

    # Batches carry the labels of their own images, as a pure function of the step.
    batches = data.train_batches(source, batch_size=5, seed=3, start_step=2, with_labels=True)
    batch = next(batches)
    batches.close()
    images, labels = batch["image"], batch["label"]
    indices = data.batch_indices(2, 5, 18, 3)
    assert np.array_equal(images, source.images[indices]) and np.array_equal(labels, source.labels[indices])

    # An image beside the class folders means the folder is not a labelled tree.
    os.symlink(files[0], broken / "loose.jpg")
    assert data.create_source(str(broken), 8).labels is None
    with pytest.raises(DataError, match="no class labels"):
        data.train_batches(data.create_source(str(broken), 8), batch_size=2, seed=0, start_step=0, with_labels=True)

    # Image listings: recursive for datasets; flat (for edit and inpaint inputs) and by extension.
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.png", "a.jpg", ".hidden.png", "notes.txt"):
        (flat / name).write_bytes(b"")
    (flat / "sub").mkdir()
    (flat / "sub" / "c.png").write_bytes(b"")
    assert [p.name for p in local.list_image_files(flat)] == ["a.jpg", "b.png", "c.png"]
    assert [p.name for p in local.list_image_files(flat, recursive=False)] == ["a.jpg", "b.png"]
    assert [p.name for p in local.list_image_files(flat, extensions=frozenset({".png"}))] == ["b.png", "c.png"]


def test_fashion_mnist_idx(fashion_mnist_dir: pathlib.Path) -> None:
    train = data.create_source(str(fashion_mnist_dir), 32)
    test = data.create_source(str(fashion_mnist_dir), 32, split="test")
    assert train.images.shape == (60000, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 32, 32, 3)
    assert np.array_equal(test.images[..., 0], test.images[..., 2])

    # Independent parse of the well-known layout (16-byte header) and a per-image PIL bicubic resize.
    with gzip.open(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(10000, 28, 28)
    for k in (0, 1, 4321, 9999):
        expected = np.asarray(Image.fromarray(raw[k], "L").resize((32, 32), BICUBIC))
        assert np.array_equal(test.images[k, ..., 1], expected)
    assert 50 < train.images.mean() < 110  # Fashion-MNIST: mostly dark background

    native = data.create_source(str(fashion_mnist_dir), 28, split="test")
    assert np.array_equal(native.images[..., 0], raw)


def test_hand_written_idx_file(tmp_path: pathlib.Path) -> None:
    pixels = np.arange(3 * 5 * 5, dtype=np.uint8).reshape(3, 5, 5) * 3
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x00000803, 3, 5, 5) + pixels.tobytes())
    source = data.create_source(str(tmp_path), 5)
    assert source.images.shape == (3, 5, 5, 3)
    for c in range(3):
        assert np.array_equal(source.images[..., c], pixels)
    assert np.array_equal(local._read_idx(tmp_path / "train-images-idx3-ubyte"), pixels)
    with pytest.raises(DataError, match="no t10k-images-idx3-ubyte"):
        data.create_source(str(tmp_path), 5, split="test")

    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x00000803, 4, 5, 5) + pixels.tobytes())
    with pytest.raises(DataError, match="IDX header says"):
        data.create_source(str(tmp_path), 5)
    bad_headers = {
        "float elements": (struct.pack(">IIII", 0x00000D03, 3, 5, 5), "element type 0x0d is not unsigned bytes"),
        "not IDX at all": (b"\x89PNG" + bytes(12), "not an IDX file"),
        "labels, not images": (struct.pack(">II", 0x00000801, 75), r"expected IDX images of shape \(N, H, W\)"),
    }
    for header, message in bad_headers.values():
        (tmp_path / "train-images-idx3-ubyte").write_bytes(header + pixels.tobytes())
        with pytest.raises(DataError, match=message):
            data.create_source(str(tmp_path), 5)


def test_labels_from_fashion_mnist_idx_files(tmp_path, fashion_mnist_dir):
    source = data.create_source(str(fashion_mnist_dir), 28, split="test")
    with gzip.open(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=8)  # the documented 8-byte header of a label file
    assert source.class_names == tuple(str(k) for k in range(10))
    assert np.array_equal(source.labels, raw) and np.bincount(source.labels).tolist() == [1000] * 10

    # A label file that does not match its images is an error, not a silent misalignment.
    pixels = np.zeros((3, 4, 4), np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 3, 4, 4) + pixels.tobytes())
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 2) + bytes([1, 0]))
    with pytest.raises(DataError, match="expected 3 labels for the 3 images"):
        data.create_source(str(tmp_path), 4)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 3) + bytes([2, 0, 2]))
    assert data.create_source(str(tmp_path), 4).labels.tolist() == [2, 0, 2]
