"""TFDS datasets from array_record files, without TensorFlow and without network; their labels."""

import pathlib
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import data
from ddpm_jax.errors import DataError

BICUBIC = Image.Resampling.BICUBIC


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
    source = data.create_source("butterflies_test_ds", 32, tfds_data_dir=data_dir)
    assert source.images.shape == (12, 32, 32, 3) and source.images.dtype == np.uint8
    # tfds stores examples in a hashed order: compare as a set, each against the same PIL conversion.
    expected = [np.asarray(Image.fromarray(o).resize((32, 32), BICUBIC)) for o in originals]
    for img in source.images:
        assert any(np.array_equal(img, e) for e in expected)
    assert len({img.tobytes() for img in source.images}) == 12

    halves = [
        data.create_source("butterflies_test_ds", 32, tfds_data_dir=data_dir, process_index=i, process_count=2)
        for i in (0, 1)
    ]
    assert [len(h) for h in halves] == [6, 6]
    assert np.array_equal(np.concatenate([h.images for h in halves]), source.images[np.r_[0:12:2, 1:12:2]])

    with pytest.raises(DataError, match="no split 'test'; available: train"):
        data.create_source("butterflies_test_ds", 32, split="test", tfds_data_dir=data_dir)
    assert "tensorflow" not in sys.modules  # array_record reading must work without TensorFlow


def test_tfds_offline_fails_fast(tmp_path: pathlib.Path, offline: None) -> None:
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        data.create_source("cifar10", 32, tfds_data_dir=str(tmp_path / "empty"))
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "storage.googleapis.com" in message and "--config.data.tfds_data_dir" in message
    assert "local folder" in message and "--config.data.dataset=" in message
    assert "\n" not in message


def test_unknown_dataset_names(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DataError, match=r"not a known TFDS dataset.*huggingface:OWNER/NAME.*local folder"):
        data.create_source("no_such_dataset_xyz", 32, tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError, match="neither an existing folder nor a TFDS dataset"):
        data.create_source("no_such_dataset_xyz/config", 32, tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError, match="cannot use TFDS dataset 'cifar10:9.9.9'"):
        data.create_source("cifar10:9.9.9", 32, tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError, match="empty"):
        data.create_source("  ", 32)


def test_labels_from_tfds(tmp_path, class_tree):
    import tensorflow_datasets as tfds

    files = sorted(class_tree.glob("[!.]*/*.jpg"))[:4]

    class Tiny(tfds.core.GeneratorBasedBuilder):
        """Four butterflies with named classes."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(names=["moth", "butterfly"])}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, f in enumerate(files):
                with Image.open(f) as img:
                    yield i, {"image": img.convert("RGB").resize((16, 16)), "label": i % 2}

    Tiny(data_dir=str(tmp_path / "tfds")).download_and_prepare(file_format="array_record")
    source = data.create_source("tiny", 8, tfds_data_dir=str(tmp_path / "tfds"))
    assert source.class_names == ("moth", "butterfly") and sorted(source.labels.tolist()) == [0, 0, 1, 1]
    # tfds stores examples in a hashed order: each image must still carry its own label.
    by_image = {}
    for i, f in enumerate(files):
        with Image.open(f) as img:
            by_image[np.asarray(img.convert("RGB").resize((16, 16)).resize((8, 8), Image.Resampling.BICUBIC))
                     .tobytes()] = i % 2
    assert [by_image[img.tobytes()] for img in source.images] == source.labels.tolist()
