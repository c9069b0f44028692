"""The data interface: host shares, the class-label check, the inputs of the editing modes, a light import."""

import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import CLASSES, tiny_config
from PIL import Image

from ddpm_jax import data
from ddpm_jax.errors import ConfigError, DataError


def test_sharding_gives_disjoint_covering_halves(butterflies_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    full = data.create_source(str(butterflies_dir), 16).images
    halves = [data.create_source(str(butterflies_dir), 16, process_index=i, process_count=2).images for i in (0, 1)]
    assert [len(h) for h in halves] == [51, 50]
    assert np.array_equal(halves[0], full[0::2]) and np.array_equal(halves[1], full[1::2])
    keys = [{img.tobytes() for img in h} for h in halves]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {img.tobytes() for img in full}

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(next(butterflies_dir.rglob("*.jpg")), one / "only.jpg")
    with pytest.raises(DataError, match="too few to give host 1 of 2"):
        data.create_source(str(one), 16, process_index=1, process_count=2)
    with pytest.raises(DataError, match="process_index"):
        data.create_source(str(one), 16, process_index=2, process_count=2)


def test_import_is_light() -> None:
    heavy = ("tensorflow", "tensorflow_datasets", "huggingface_hub", "pyarrow")
    code = f"import sys, ddpm_jax.data; bad = [m for m in {heavy} if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(data.__file__).parents[1], timeout=60)


def test_source_from_config_reads_config_data(butterflies_dir):
    config = tiny_config(str(butterflies_dir), 8)
    source = data.source_from_config(config, process_index=1, process_count=2)
    assert len(source) == 50 and source.image_size == 8
    np.testing.assert_array_equal(source.images, data.create_source(str(butterflies_dir), 8).images[1::2])
    with pytest.raises(DataError, match="no subfolder 'test'"):
        data.source_from_config(config, split="test")


def test_class_labels_are_checked_against_the_config(class_tree, butterflies_dir):
    config = tiny_config(str(class_tree), 8)
    source = data.create_source(str(class_tree), 8)
    assert data.check_class_labels(config, source) is None  # Unconditional: labels are not needed.
    config.model.num_classes = 3
    assert data.check_class_labels(config, source) == CLASSES
    config.data.class_names = ("x", "y", "z")
    assert data.check_class_labels(config, source) == ("x", "y", "z")  # The config's names win.
    config.model.num_classes = 5
    with pytest.raises(ConfigError) as info:
        data.check_class_labels(config, source)
    assert str(info.value) == (f"model.num_classes=5 but data.dataset={class_tree} has 3 classes "
                               "(a_caltech, b_smithsonian, c_caltech); set --config.model.num_classes=3")
    with pytest.raises(DataError, match="model.num_classes=5 needs class labels, but data.dataset=.* has none"):
        data.check_class_labels(config, data.create_source(str(butterflies_dir / "smithsonian"), 8))


def test_inputs_of_the_editing_modes(butterfly_files, butterflies_dir, tmp_path):
    config = tiny_config(str(butterflies_dir), 8)
    listed, sizes = data.load_inputs(config, ",".join(map(str, butterfly_files[:2])), 8, "edit.images")
    assert listed.shape == (2, 8, 8, 3) and sizes == [Image.open(f).size for f in butterfly_files[:2]]
    np.testing.assert_array_equal(listed[1], data.load_image(butterfly_files[1], 8))
    folder, _ = data.load_inputs(config, str(butterflies_dir / "smithsonian"), 3, "edit.images")  # Name order.
    np.testing.assert_array_equal(folder[0], data.load_image(sorted((butterflies_dir / "smithsonian").iterdir())[0], 8))
    first, none = data.load_inputs(config, "", 4, "edit.images")  # The first images of data.dataset.
    assert none is None
    np.testing.assert_array_equal(first, data.create_source(str(butterflies_dir), 8).images[:4])
    with pytest.raises(DataError, match="edit.images: .*nowhere is not an image file or a folder"):
        data.load_inputs(config, str(tmp_path / "nowhere"), 4, "edit.images")
    with pytest.raises(DataError, match="inpaint.images: folder .* holds no image files"):
        data.load_inputs(config, str(tmp_path), 4, "inpaint.images")
