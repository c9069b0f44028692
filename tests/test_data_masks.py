"""Inpainting masks: built-in shapes, determinism, and mask files with their errors."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.data import masks
from ddpm_jax.errors import DataError


def test_center_mask_fills_the_central_quarter():
    keep = masks.make_masks("center", 3, 16, seed=0)
    assert keep.shape == (3, 16, 16) and keep.dtype == bool
    assert (~keep[0]).sum() == 64 and not keep[0, 4:12, 4:12].any()  # The 8x8 box in the middle.
    assert keep[0, :4].all() and keep[0, 12:].all() and keep[0, :, :4].all() and keep[0, :, 12:].all()
    assert (keep == keep[0]).all()  # The same for every image.
    assert (~masks.center_mask(7)).sum() == 16  # Odd sizes: a 4x4 box.


@pytest.mark.parametrize("side,filled", [("left", np.s_[:, :8]), ("right", np.s_[:, 8:]), ("top", np.s_[:8]),
                                         ("bottom", np.s_[8:])])
def test_half_masks_fill_the_named_half(side, filled):
    keep = masks.make_masks(f"half_{side}", 2, 16, seed=0)[0]
    assert not keep[filled].any() and keep.sum() == 128


def test_random_shapes_are_deterministic_from_the_seed_and_differ_per_image():
    for shape in ("half", "strokes"):
        a, b = masks.make_masks(shape, 12, 16, seed=3), masks.make_masks(shape, 12, 16, seed=3)
        np.testing.assert_array_equal(a, b)
        assert len({m.tobytes() for m in a}) > 1, shape  # Per-image masks differ.
        assert not np.array_equal(a, masks.make_masks(shape, 12, 16, seed=4)), shape
    halves = masks.make_masks("half", 40, 8, seed=0)
    assert np.all(halves.sum(axis=(1, 2)) == 32)
    assert len({m.tobytes() for m in halves}) == 4  # All four sides occur.


@pytest.mark.parametrize("size", [8, 16, 64])
def test_strokes_cover_a_fifth_to_most_of_the_image(size):
    keep = masks.make_masks("strokes", 20, size, seed=1)
    fill = 1 - keep.mean(axis=(1, 2))
    assert np.all(fill >= 0.2) and np.all(fill < 0.9), fill


def test_unknown_shape_is_rejected():
    with pytest.raises(ValueError, match="accepted: center, half"):
        masks.make_masks("circle", 1, 8, seed=0)


def _save(path, array):
    Image.fromarray(array).save(path)
    return path


def test_mask_file_white_keeps_black_fills(tmp_path):
    gray = np.full((8, 8), 255, np.uint8)
    gray[2:5, 1:7] = 0
    gray[0, 0] = 100  # Below 128: filled.
    keep = masks.load_masks(_save(tmp_path / "m.png", gray), 3, 8)
    assert keep.shape == (3, 8, 8)
    np.testing.assert_array_equal(keep[2], gray >= 128)
    rgb = np.repeat(gray[..., None], 3, axis=2)  # RGB masks are read as grey.
    np.testing.assert_array_equal(masks.load_mask(_save(tmp_path / "rgb.png", rgb), 8), gray >= 128)


def test_mask_at_the_original_image_size_gets_the_same_centre_crop(tmp_path):
    gray = np.zeros((40, 80), np.uint8)  # 80 wide, 40 high: the centre square is columns 20..59.
    gray[:, 40:] = 255  # Right half kept.
    keep = masks.load_mask(_save(tmp_path / "m.png", gray), 8, image_wh=(80, 40))
    assert not keep[:, :4].any() and keep[:, 4:].all()


def test_mask_folder_gives_one_mask_per_image(tmp_path):
    for i in range(3):
        a = np.full((8, 8), 255, np.uint8)
        a[i] = 0
        _save(tmp_path / f"{i:02d}.png", a)
    keep = masks.load_masks(tmp_path, 3, 8)
    assert [int(np.flatnonzero(~k.all(axis=1))[0]) for k in keep] == [0, 1, 2]
    with pytest.raises(DataError, match="holds 3 masks for 5 images"):
        masks.load_masks(tmp_path, 5, 8)


def test_bad_mask_files_fail_with_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"m.png is 10x8; a mask must be 8x8 \(data.image_size\) or 30x20"):
        masks.load_mask(_save(tmp_path / "m.png", np.zeros((8, 10), np.uint8)), 8, image_wh=(30, 20))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png is not a readable image"):
        masks.load_masks(tmp_path / "text.png", 1, 8)
    with pytest.raises(DataError, match="neither a mask file nor a folder, nor a built-in shape"):
        masks.load_masks(tmp_path / "missing.png", 1, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .png mask files"):
        masks.load_masks(tmp_path / "empty", 1, 8)
