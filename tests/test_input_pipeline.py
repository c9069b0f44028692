"""Tests for ddpm_jax.input_pipeline on real data: butterfly photos, Fashion-MNIST IDX files, a tiny TFDS dataset."""

import gzip
import logging
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import input_pipeline as ip

BICUBIC = Image.Resampling.BICUBIC
FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def butterfly_files(butterflies_dir: pathlib.Path) -> list[pathlib.Path]:
    """The butterfly JPEGs in the order the folder route loads them (sorted relative paths)."""
    files = sorted(butterflies_dir.rglob("*.jpg"), key=lambda p: p.relative_to(butterflies_dir).as_posix())
    assert len(files) == 101
    return files


@pytest.fixture(scope="module")
def butterfly_rgb(butterfly_files: list[pathlib.Path]) -> Image.Image:
    """A real RGB butterfly photo at 64x64, the base for the conversion tests."""
    with Image.open(butterfly_files[0]) as img:
        return img.convert("RGB").resize((64, 64), BICUBIC)


@pytest.fixture(scope="module")
def fashion_mnist_dir() -> pathlib.Path:
    """Debian's Fashion-MNIST IDX files; installed with apt-get when missing and allowed, else the test is skipped."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"{FASHION_MNIST} missing; install the Debian package dataset-fashion-mnist")
        result = subprocess.run(
            ["apt-get", "install", "-y", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0 or not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
            pytest.skip(f"apt-get install dataset-fashion-mnist failed: {result.stderr.strip()[-300:]}")
    return FASHION_MNIST


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guarantees the offline code paths: real sockets here (no network), simulated where a network exists."""
    if ip._can_connect("storage.googleapis.com", timeout_s=2.0) or ip._can_connect("huggingface.co", timeout_s=2.0):
        monkeypatch.setattr(ip, "_can_connect", lambda *args, **kwargs: False)


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


def _mode(path: pathlib.Path) -> str:
    with Image.open(path) as img:
        return img.mode


def _absl_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "absl"]


def _write_parquet(path: pathlib.Path, cells: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(cells, type=image_type), "label": pa.array(range(len(cells)), pa.int64())})
    pq.write_table(table, path)


# --------------------------------------------------------------------------------------------------------------------
# Image folder route.


def test_folder_of_real_butterflies(butterflies_dir: pathlib.Path, butterfly_files: list[pathlib.Path]) -> None:
    source = ip.create_source(str(butterflies_dir), 32)
    images = source.images
    assert isinstance(source, ip.ArraySource) and isinstance(source, ip.ImageSource)
    assert images.shape == (101, 32, 32, 3) and images.dtype == np.uint8 and len(source) == 101

    gray = [i for i, f in enumerate(butterfly_files) if _mode(f) == "L"]
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
    assert np.array_equal(images[big], ip.load_image(butterfly_files[big], 32))
    assert np.array_equal(images[gray[0]], ip.load_image(butterfly_files[gray[0]], 32))


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
    data = big.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image, not counted")
    (folder / ".hidden.jpg").write_bytes(b"ignored: hidden files are not dataset images")

    with caplog.at_level(logging.WARNING):
        source = ip.create_source(str(folder), 24)
    assert source.images.shape == (5, 24, 24, 3)
    warnings = [m for m in _absl_warnings(caplog) if "skipped" in m]
    assert len(warnings) == 1, _absl_warnings(caplog)
    assert f"skipped 2 of 7 files under {folder}" in warnings[0]
    assert "corrupt.jpg" in warnings[0]  # the first failure in sorted order, with its reason
    with pytest.raises(ip.DataError, match="truncated.jpg"):
        ip.load_image(folder / "truncated.jpg", 24)


def test_folder_errors(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ip.DataError, match="contains no image files"):
        ip.create_source(str(empty), 32)
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(ip.DataError, match="contains no image files"):
        ip.create_source(str(empty), 32)

    missing = tmp_path / "does_not_exist"
    with pytest.raises(ip.DataError, match=f"folder {missing} does not exist"):
        ip.create_source(str(missing), 32)
    with pytest.raises(ip.DataError, match="does not exist"):
        ip.create_source("./no/such/folder", 32)
    with pytest.raises(ip.DataError, match="is a file, not a folder"):
        ip.create_source(str(empty / "readme.txt"), 32)

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.png"):
        (broken / name).write_bytes(b"definitely not an image")
    with pytest.raises(ip.DataError, match=r"none of the 2 files under .*broken could be read as images"):
        ip.create_source(str(broken), 32)


def test_folder_split_subfolders(tmp_path: pathlib.Path, butterfly_files: list[pathlib.Path]) -> None:
    for split, files in (("train", butterfly_files[:3]), ("test", butterfly_files[3:5])):
        (tmp_path / split).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / split / f.name)
    assert len(ip.create_source(str(tmp_path), 16)) == 3
    assert len(ip.create_source(str(tmp_path), 16, split="test")) == 2
    with pytest.raises(ip.DataError, match="no subfolder 'validation'"):
        ip.create_source(str(tmp_path), 16, split="validation")


# --------------------------------------------------------------------------------------------------------------------
# Per-image conversions.


def test_rgba_and_la_transparency_become_white(tmp_path: pathlib.Path, butterfly_rgb: Image.Image) -> None:
    rgba = np.dstack([np.asarray(butterfly_rgb), np.full((64, 64), 255, np.uint8)])
    rgba[:, :32] = 0  # black *and* fully transparent: only compositing onto white gives white here
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = ip.load_image(tmp_path / "rgba.png", 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:, :14] == 255).all()
    assert out[:, 18:].mean() < 240

    gray = np.asarray(butterfly_rgb.convert("L"))
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:32] = 0
    la = np.dstack([gray, alpha])
    la[:32, :, 0] = 0  # black where transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = ip.load_image(tmp_path / "la.png", 32)
    assert (out[:14] == 255).all()
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert out[18:].mean() < 240


def test_palette_images(tmp_path: pathlib.Path, butterfly_rgb: Image.Image) -> None:
    pal = butterfly_rgb.quantize(colors=200)
    pal.save(tmp_path / "pal.png")
    pal.convert("RGB").save(tmp_path / "pal_as_rgb.png")
    assert _mode(tmp_path / "pal.png") == "P"
    assert np.array_equal(ip.load_image(tmp_path / "pal.png", 32), ip.load_image(tmp_path / "pal_as_rgb.png", 32))

    # A palette image with a transparent index: transparent pixels become white, not the palette colour.
    idx = np.array(pal)
    idx[:, :32] = 250
    palette = pal.getpalette() + [0] * (768 - len(pal.getpalette()))
    palette[250 * 3 : 250 * 3 + 3] = [0, 0, 0]
    transparent = Image.fromarray(idx, "P")
    transparent.putpalette(palette)
    transparent.save(tmp_path / "pal_t.png", transparency=250)
    out = ip.load_image(tmp_path / "pal_t.png", 32)
    assert (out[:, :14] == 255).all() and out[:, 18:].mean() < 240

    # GIF goes through the same palette path.
    transparent.save(tmp_path / "pal_t.gif", transparency=250)
    assert (ip.load_image(tmp_path / "pal_t.gif", 32)[:, :14] == 255).all()


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: pathlib.Path) -> None:
    values = np.zeros((64, 64), np.uint16)
    values[:, :21] = 65535
    values[:, 21:43] = 128 * 257  # midtone
    values[:, 43:] = 77 * 257 + 100  # 77.39 -> 77
    Image.fromarray(values).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as img:
        assert img.mode.startswith("I")
    out = ip.load_image(tmp_path / "gray16.png", 32)
    assert (out[:, :8] == 255).all()
    assert np.abs(out[:, 13:19].astype(int) - 128).max() <= 1
    assert np.abs(out[:, 25:].astype(int) - 77).max() <= 1

    # Every 16-bit mode PIL produces scales the same way.
    big_endian = Image.frombytes("I;16B", (64, 64), values.astype(">u2").tobytes())
    int32 = Image.fromarray(values.astype(np.int32))
    expected = np.rint(values / 257).astype(np.uint8)
    with Image.open(tmp_path / "gray16.png") as png:
        png.load()
    for img in (big_endian, int32, png):
        converted = np.asarray(ip._rgb8(img))
        assert converted.shape == (64, 64, 3) and np.array_equal(converted[..., 0], expected), img.mode


def test_small_and_non_square_images(tmp_path: pathlib.Path) -> None:
    tiny = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)  # 8 wide, 6 high
    Image.fromarray(tiny).save(tmp_path / "tiny.png")
    out = ip.load_image(tmp_path / "tiny.png", 32)  # upscaled, not padded
    assert out.shape == (32, 32, 3) and out.std() > 20
    # The central 6x6 square is what gets upscaled: columns 1..6 of the source.
    expected = np.asarray(Image.fromarray(tiny).resize((32, 32), BICUBIC, box=(1, 0, 7, 6)))
    assert np.array_equal(out, expected)

    thirds = np.zeros((30, 90, 3), np.uint8)
    thirds[:, :30, 0] = 255
    thirds[:, 30:60, 1] = 255
    thirds[:, 60:, 2] = 255
    Image.fromarray(thirds).save(tmp_path / "wide.png")
    Image.fromarray(thirds.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        out = ip.load_image(tmp_path / name, 16).astype(int)
        green = (out[..., 1] > 200) & (out[..., 0] < 60) & (out[..., 2] < 60)
        assert green.mean() > 0.9, name
        assert (out[2:-2, 2:-2, 1] == 255).all() and (out[2:-2, 2:-2, [0, 2]] == 0).all(), name


def test_exif_orientation_is_applied(tmp_path: pathlib.Path) -> None:
    stored = np.zeros((48, 48, 3), np.uint8)
    stored[:24] = (255, 0, 0)  # red on top as stored
    stored[24:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display -> top goes to the right
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = ip.load_image(tmp_path / "rotated.jpg", 16).astype(int)
    assert out[:, 12:, 0].mean() > 200 and out[:, 12:, 2].mean() < 60  # red on the right
    assert out[:, :4, 2].mean() > 200 and out[:, :4, 0].mean() < 60  # blue on the left


# --------------------------------------------------------------------------------------------------------------------
# IDX route.


def test_fashion_mnist_idx(fashion_mnist_dir: pathlib.Path) -> None:
    train = ip.create_source(str(fashion_mnist_dir), 32)
    test = ip.create_source(str(fashion_mnist_dir), 32, split="test")
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

    native = ip.create_source(str(fashion_mnist_dir), 28, split="test")
    assert np.array_equal(native.images[..., 0], raw)


def test_hand_written_idx_file(tmp_path: pathlib.Path) -> None:
    pixels = np.arange(3 * 5 * 5, dtype=np.uint8).reshape(3, 5, 5) * 3
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x00000803, 3, 5, 5) + pixels.tobytes())
    source = ip.create_source(str(tmp_path), 5)
    assert source.images.shape == (3, 5, 5, 3)
    for c in range(3):
        assert np.array_equal(source.images[..., c], pixels)
    assert np.array_equal(ip._read_idx(tmp_path / "train-images-idx3-ubyte"), pixels)
    with pytest.raises(ip.DataError, match="no t10k-images-idx3-ubyte"):
        ip.create_source(str(tmp_path), 5, split="test")

    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x00000803, 4, 5, 5) + pixels.tobytes())
    with pytest.raises(ip.DataError, match="IDX header says"):
        ip.create_source(str(tmp_path), 5)
    bad_headers = {
        "float elements": (struct.pack(">IIII", 0x00000D03, 3, 5, 5), "element type 0x0d is not unsigned bytes"),
        "not IDX at all": (b"\x89PNG" + bytes(12), "not an IDX file"),
        "labels, not images": (struct.pack(">II", 0x00000801, 75), r"expected IDX images of shape \(N, H, W\)"),
    }
    for header, message in bad_headers.values():
        (tmp_path / "train-images-idx3-ubyte").write_bytes(header + pixels.tobytes())
        with pytest.raises(ip.DataError, match=message):
            ip.create_source(str(tmp_path), 5)


# --------------------------------------------------------------------------------------------------------------------
# TFDS route (array_record, no TensorFlow, no network).


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory: pytest.TempPathFactory, butterfly_files: list[pathlib.Path]) -> tuple[str, list]:
    """A tiny real TFDS dataset of 12 butterflies (40x40 PNG) prepared as array_record; returns (data_dir, images)."""
    import tensorflow_datasets as tfds

    images = []
    for f in butterfly_files[:12]:
        with Image.open(f) as img:
            images.append(img.convert("RGB").resize((40, 40), BICUBIC))

    class ButterfliesTestDs(tfds.core.GeneratorBasedBuilder):
        """Twelve butterflies."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self) -> tfds.core.DatasetInfo:
            features = {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=2),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):  # tfds signature
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, img in enumerate(images):
                yield i, {"image": img, "label": i % 2}  # PIL images are PNG-encoded without TensorFlow

    data_dir = tmp_path_factory.mktemp("tfds")
    ButterfliesTestDs(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return str(data_dir), [np.asarray(img) for img in images]


def test_tfds_prepared_dataset(tfds_dir: tuple[str, list]) -> None:
    data_dir, originals = tfds_dir
    source = ip.create_source("butterflies_test_ds", 32, tfds_data_dir=data_dir)
    assert source.images.shape == (12, 32, 32, 3) and source.images.dtype == np.uint8
    # tfds stores examples in a hashed order: compare as a set, each against the same PIL conversion.
    expected = [np.asarray(Image.fromarray(o).resize((32, 32), BICUBIC)) for o in originals]
    for img in source.images:
        assert any(np.array_equal(img, e) for e in expected)
    assert len({img.tobytes() for img in source.images}) == 12

    halves = [
        ip.create_source("butterflies_test_ds", 32, tfds_data_dir=data_dir, process_index=i, process_count=2)
        for i in (0, 1)
    ]
    assert [len(h) for h in halves] == [6, 6]
    assert np.array_equal(np.concatenate([h.images for h in halves]), source.images[np.r_[0:12:2, 1:12:2]])

    with pytest.raises(ip.DataError, match="no split 'test'; available: train"):
        ip.create_source("butterflies_test_ds", 32, split="test", tfds_data_dir=data_dir)
    assert "tensorflow" not in sys.modules  # array_record reading must work without TensorFlow


def test_tfds_offline_fails_fast(tmp_path: pathlib.Path, offline: None) -> None:
    start = time.perf_counter()
    with pytest.raises(ip.DataError) as info:
        ip.create_source("cifar10", 32, tfds_data_dir=str(tmp_path / "empty"))
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "storage.googleapis.com" in message and "--config.data.tfds_data_dir" in message
    assert "local folder" in message and "--config.data.dataset=" in message
    assert "\n" not in message


def test_unknown_dataset_names(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ip.DataError, match=r"not a known TFDS dataset.*huggingface:OWNER/NAME.*local folder"):
        ip.create_source("no_such_dataset_xyz", 32, tfds_data_dir=str(tmp_path))
    with pytest.raises(ip.DataError, match="neither an existing folder nor a TFDS dataset"):
        ip.create_source("no_such_dataset_xyz/config", 32, tfds_data_dir=str(tmp_path))
    with pytest.raises(ip.DataError, match="cannot use TFDS dataset 'cifar10:9.9.9'"):
        ip.create_source("cifar10:9.9.9", 32, tfds_data_dir=str(tmp_path))
    with pytest.raises(ip.DataError, match="empty"):
        ip.create_source("  ", 32)


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face route.


def test_read_parquet_images(
    tmp_path: pathlib.Path, butterfly_files: list[pathlib.Path], caplog: pytest.LogCaptureFixture
) -> None:
    files = butterfly_files[:3] + butterfly_files[-3:]  # includes 2000 px Smithsonian photos
    cells = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    cells.insert(2, {"bytes": b"garbage", "path": "bad.jpg"})
    _write_parquet(tmp_path / "a.parquet", cells[:4])
    _write_parquet(tmp_path / "b.parquet", cells[4:])
    with caplog.at_level(logging.WARNING):
        images = ip._read_parquet_images([tmp_path / "a.parquet", tmp_path / "b.parquet"], 32)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    for img, f in zip(images, files, strict=True):
        assert np.array_equal(img, ip.load_image(f, 32))  # bytes and files share one conversion
    assert any(
        "skipped 1 of 7 parquet rows" in m and "a.parquet row 2: ValueError: not a recognised image" in m
        for m in _absl_warnings(caplog)
    )

    # Rows are numbered across files for per-host sharding.
    parts = [
        ip._read_parquet_images([tmp_path / "a.parquet", tmp_path / "b.parquet"], 32, process_index=i, process_count=2)
        for i in (0, 1)
    ]
    # Host 0 has rows 0, 2 (the bad one), 4, 6; host 1 has rows 1, 3, 5.
    assert np.array_equal(parts[0], images[[0, 3, 5]]) and np.array_equal(parts[1], images[[1, 2, 4]])

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": [b"x"]}), tmp_path / "other.parquet")
    with pytest.raises(ip.DataError, match="no 'image' column"):
        ip._read_parquet_images([tmp_path / "other.parquet"], 32)


def test_huggingface_offline_fails_fast(empty_hf_cache: pathlib.Path, offline: None) -> None:
    start = time.perf_counter()
    with pytest.raises(ip.DataError) as info:
        ip.create_source("huggingface:huggan/smithsonian_butterflies_subset", 32)
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert message.startswith("cannot download huggingface:huggan/smithsonian_butterflies_subset")
    assert "local folder" in message and "--config.data.dataset=" in message
    assert not any(empty_hf_cache.glob("**/*.parquet"))


def test_huggingface_offline_flag_and_cached_copy(
    empty_hf_cache: pathlib.Path, butterfly_files: list[pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ip, "_can_connect", lambda *a, **k: pytest.fail("must not touch the network when offline"))
    with pytest.raises(ip.DataError, match="HF_HUB_OFFLINE is set.*local folder"):
        ip.create_source("huggingface:someone/tiny_butterflies", 16)

    # A snapshot already in the hub cache is used without network, with the split picked by file name.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "datasets--someone--tiny_butterflies"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    _write_parquet(
        data / "train-00000-of-00001.parquet", [{"bytes": f.read_bytes(), "path": None} for f in butterfly_files[:5]]
    )
    _write_parquet(
        data / "test-00000-of-00001.parquet", [{"bytes": f.read_bytes(), "path": None} for f in butterfly_files[5:7]]
    )
    train = ip.create_source("huggingface:someone/tiny_butterflies", 16)
    assert train.images.shape == (5, 16, 16, 3)
    assert np.array_equal(train.images[4], ip.load_image(butterfly_files[4], 16))
    assert len(ip.create_source("huggingface:someone/tiny_butterflies", 16, split="test")) == 2
    with pytest.raises(ip.DataError, match="no parquet files for split 'validation'"):
        ip.create_source("huggingface:someone/tiny_butterflies", 16, split="validation")


def test_can_connect() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert ip._can_connect("127.0.0.1", server.getsockname()[1], timeout_s=2.0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound but not listening: refused
    assert not ip._can_connect("127.0.0.1", closed_port, timeout_s=2.0)
    start = time.perf_counter()
    assert not ip._can_connect("host.invalid", timeout_s=2.0)  # RFC 6761: never resolves
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------------------------------------------------
# Sharding, batch order, prefetching.


def test_sharding_gives_disjoint_covering_halves(butterflies_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    full = ip.create_source(str(butterflies_dir), 16).images
    halves = [ip.create_source(str(butterflies_dir), 16, process_index=i, process_count=2).images for i in (0, 1)]
    assert [len(h) for h in halves] == [51, 50]
    assert np.array_equal(halves[0], full[0::2]) and np.array_equal(halves[1], full[1::2])
    keys = [{img.tobytes() for img in h} for h in halves]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {img.tobytes() for img in full}

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(next(butterflies_dir.rglob("*.jpg")), one / "only.jpg")
    with pytest.raises(ip.DataError, match="too few to give host 1 of 2"):
        ip.create_source(str(one), 16, process_index=1, process_count=2)
    with pytest.raises(ip.DataError, match="process_index"):
        ip.create_source(str(one), 16, process_index=2, process_count=2)


def test_batch_indices_epochs_and_determinism() -> None:
    n, b, seed = 12, 4, 7
    epoch0 = np.concatenate([ip.batch_indices(s, b, n, seed) for s in range(3)])
    epoch1 = np.concatenate([ip.batch_indices(s, b, n, seed) for s in range(3, 6)])
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
    assert not np.array_equal(epoch0, np.arange(n))
    # The documented formula, so the data order is stable across versions of this code.
    assert np.array_equal(epoch0, np.random.default_rng([seed, 0]).permutation(n))
    assert np.array_equal(epoch1, np.random.default_rng([seed, 1]).permutation(n))

    assert np.array_equal(ip.batch_indices(5, b, n, seed), ip.batch_indices(5, b, n, seed))
    assert np.array_equal(ip.batch_indices(1000, 8, 100, 3), ip.batch_indices(1000, 8, 100, 3))
    assert not np.array_equal(ip.batch_indices(0, 64, 1000, 0), ip.batch_indices(0, 64, 1000, 1))
    batch = ip.batch_indices(0, 64, 1000, 0)
    assert batch.dtype == np.int64 and batch.shape == (64,) and len(set(batch.tolist())) == 64


def test_batch_indices_straddles_epochs_and_large_batches() -> None:
    n, seed = 10, 3
    perms = [np.random.default_rng([seed, e]).permutation(n) for e in range(6)]
    stream = np.concatenate(perms)
    # Batch of 4 over 10 examples: step 2 covers positions 8..11, the end of epoch 0 and the start of epoch 1.
    assert np.array_equal(ip.batch_indices(2, 4, n, seed), stream[8:12])
    for step in range(12):
        assert np.array_equal(ip.batch_indices(step, 4, n, seed), stream[4 * step : 4 * step + 4])
    # batch_size > num_examples: one batch spans several whole epochs.
    assert np.array_equal(ip.batch_indices(0, 25, n, seed), stream[:25])
    assert np.array_equal(ip.batch_indices(1, 25, n, seed), stream[25:50])
    assert np.bincount(ip.batch_indices(0, 20, n, seed), minlength=n).tolist() == [2] * n
    assert np.array_equal(ip.batch_indices(0, 3, 1, seed), [0, 0, 0])
    with pytest.raises(ValueError):
        ip.batch_indices(-1, 4, n, seed)


def _labelled_source(n: int = 7) -> ip.ArraySource:
    """Image i is filled with the value i, so a batch shows which examples it holds."""
    return ip.ArraySource(np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy())


def test_train_batches_resume_exactly() -> None:
    source = _labelled_source()
    full = ip.train_batches(source, batch_size=3, seed=11, start_step=0)
    from_zero = [next(full) for _ in range(12)]
    full.close()
    resumed = ip.train_batches(source, batch_size=3, seed=11, start_step=5, prefetch=1)
    tail = [next(resumed) for _ in range(7)]
    resumed.close()
    for a, b in zip(from_zero[5:], tail, strict=True):
        assert np.array_equal(a, b)
    for step, batch in enumerate(from_zero):
        assert batch.shape == (3, 4, 4, 3) and batch.dtype == np.uint8
        assert np.array_equal(batch[:, 0, 0, 0], ip.batch_indices(step, 3, 7, 11))


class _FailingSource:
    """Serves two batches, then fails like a broken disk would."""

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return 5

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("disk on fire")
        return np.zeros((len(indices), 2, 2, 3), np.uint8)


def test_train_batches_propagates_errors() -> None:
    batches = ip.train_batches(_FailingSource(), batch_size=2, seed=0, start_step=0)
    next(batches)
    next(batches)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


def _producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ddpm_jax.train_batches" and t.is_alive()]


def test_train_batches_close_stops_the_thread() -> None:
    assert not _producer_threads()
    batches = ip.train_batches(_labelled_source(), batch_size=2, seed=0, start_step=0, prefetch=2)
    next(batches)
    time.sleep(0.2)  # let the producer fill the queue and block on it
    assert len(_producer_threads()) == 1
    start = time.perf_counter()
    batches.close()
    assert time.perf_counter() - start < 5
    assert not _producer_threads()


def test_import_is_light() -> None:
    heavy = ("tensorflow", "tensorflow_datasets", "huggingface_hub", "pyarrow")
    code = f"import sys, ddpm_jax.input_pipeline; bad = [m for m in {heavy} if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(ip.__file__).parents[1], timeout=60)


def test_load_image_reads_bytes_like_files(butterfly_files: list[pathlib.Path]) -> None:
    data = butterfly_files[10].read_bytes()
    assert np.array_equal(ip._image_from_bytes(data, 32), ip.load_image(butterfly_files[10], 32))
