"""What a run writes for people: sample grids and strips, comparison grids, PNG/NPZ files, captions, file labels."""

import json
import os

import numpy as np
import pytest
from helpers import tiny_config
from PIL import Image

from ddpm_jax import outputs


def _tiles(n, h, w, c):
    """n images whose every pixel value is unique across the batch (so misplaced or flipped tiles show)."""
    return (np.arange(n * h * w * c) % 251).astype(np.uint8).reshape(n, h, w, c)


def test_make_grid_geometry_and_tile_placement():
    tiles = _tiles(5, 3, 4, 3)  # 5 tiles -> ceil(sqrt(5)) = 3 columns, 2 rows, the last slot empty.
    grid = outputs.make_grid(tiles)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2, 3)
    covered = np.zeros(grid.shape[:2], bool)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 2 + r * 5, 2 + c * 6
        np.testing.assert_array_equal(grid[y : y + 3, x : x + 4], tiles[i])
        covered[y : y + 3, x : x + 4] = True
    assert (grid[~covered] == 255).all()  # Padding and the empty sixth slot.
    # Spot checks with literal coordinates: first pixel of tile 0 and of tile 4 (row 1, column 1).
    np.testing.assert_array_equal(grid[2, 2], tiles[0, 0, 0])
    np.testing.assert_array_equal(grid[7, 8], tiles[4, 0, 0])
    np.testing.assert_array_equal(grid[9, 11], tiles[4, 2, 3])


def test_make_grid_columns_padding_and_pad_value():
    tiles = np.stack([np.full((2, 2, 1), v, np.uint8) for v in (10, 20, 30)])
    grid = outputs.make_grid(tiles, ncols=3, padding=1, pad_value=7)
    expected = np.array(
        [
            [7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
            [7, 10, 10, 7, 20, 20, 7, 30, 30, 7],
            [7, 10, 10, 7, 20, 20, 7, 30, 30, 7],
            [7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(grid[..., 0], expected)
    no_pad = outputs.make_grid(tiles, ncols=1, padding=0)
    np.testing.assert_array_equal(no_pad, tiles.reshape(6, 2, 1))


def test_make_strip_rows_are_samples_and_columns_frames():
    num_frames, num_samples = 4, 5
    frames = np.zeros((num_frames, num_samples, 2, 3, 3), np.uint8)
    for f in range(num_frames):
        for n in range(num_samples):
            frames[f, n] = 10 * n + f  # Tile value encodes (sample, frame).
    strip = outputs.make_strip(frames, num_rows=3)  # Only the first 3 samples.
    assert strip.shape == (3 * (2 + 2) + 2, num_frames * (3 + 2) + 2, 3)
    for row in range(3):
        for col in range(num_frames):
            y, x = 2 + row * 4, 2 + col * 5
            assert (strip[y : y + 2, x : x + 3] == 10 * row + col).all(), (row, col)
    # Fewer samples than num_rows: every sample gets a row.
    assert outputs.make_strip(frames, num_rows=8).shape[0] == num_samples * 4 + 2


@pytest.mark.parametrize("channels", [3, 1])
def test_save_png_round_trip(tmp_path, channels):
    image = _tiles(1, 5, 7, channels)[0]
    path = str(tmp_path / "new" / "dir" / "grid.png")
    assert outputs.save_png(path, image) == path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (7, 5) and im.mode == ("RGB" if channels == 3 else "L")
        back = np.asarray(im)
    np.testing.assert_array_equal(back, image if channels == 3 else image[..., 0])
    assert sorted(os.listdir(tmp_path / "new" / "dir")) == ["grid.png"]


def test_save_png_replaces_an_existing_file(tmp_path):
    path = str(tmp_path / "a.png")
    outputs.save_png(path, np.zeros((2, 2, 3), np.uint8))
    outputs.save_png(path, np.full((3, 3, 3), 200, np.uint8))
    with Image.open(path) as im:
        assert (np.asarray(im) == 200).all() and im.size == (3, 3)
    assert os.listdir(tmp_path) == ["a.png"]


def test_save_npz_round_trip(tmp_path):
    samples = _tiles(4, 6, 6, 3)
    path = str(tmp_path / "out" / "samples.npz")
    assert outputs.save_npz(path, samples) == path
    with np.load(path) as data:
        assert list(data.keys()) == ["samples"]
        assert data["samples"].dtype == np.uint8
        np.testing.assert_array_equal(data["samples"], samples)
    assert sorted(os.listdir(tmp_path / "out")) == ["samples.npz"]


def test_comparison_grid_stacks_rows_and_wraps_long_ones():
    rows = [_tiles(10, 2, 2, 3), 255 - _tiles(10, 2, 2, 3)]
    grid = outputs.comparison_grid(rows, ncols=4)
    # 10 images in blocks of 4: 3 blocks of 2 rows each; the last block is padded with white tiles.
    assert grid.shape == (6 * 4 + 2, 4 * 4 + 2, 3)
    np.testing.assert_array_equal(grid[2:4, 2:4], rows[0][0])
    np.testing.assert_array_equal(grid[6:8, 2:4], rows[1][0])
    np.testing.assert_array_equal(grid[10:12, 2:4], rows[0][4])
    assert (grid[-4:-2, -4:-2] == 255).all()


def test_per_class_grid_columns_and_captions(tmp_path):
    labels = np.repeat(np.arange(3), 2)
    assert outputs.grid_columns(labels) == 2 and outputs.grid_columns(None) is None
    assert outputs.grid_columns(np.full(4, 1)) is None  # One class: the default square layout.
    path = outputs.write_captions(str(tmp_path / "c.json"), labels, ("a", "b", "c"), 2.0, 2)
    caption = json.loads(open(path).read())
    assert caption == {"guidance_scale": 2.0, "class_names": ["a", "b", "c"], "rows": ["a", "b", "c"],
                       "labels": [0, 0, 1, 1, 2, 2]}


def test_class_names_file_round_trip(tmp_path):
    config = tiny_config()
    config.model.num_classes = 2
    assert outputs.load_class_names(config, str(tmp_path)) == ("0", "1")  # Nothing saved: the class numbers.
    outputs.save_class_names(str(tmp_path), ["cat", "dog"])
    assert outputs.load_class_names(config, str(tmp_path)) == ("cat", "dog")
    config.data.class_names = ("kitten", "puppy")
    assert outputs.load_class_names(config, str(tmp_path)) == ("kitten", "puppy")


def test_sampler_label_names_method_steps_eta_and_guidance():
    config = tiny_config()
    config.sampling.method, config.diffusion.num_timesteps = "ddpm", 50
    assert outputs.sampler_label(config) == "ddpm50"
    config.sampling.method, config.sampling.num_steps, config.sampling.eta = "ddim", 20, 0.5
    assert outputs.sampler_label(config) == "ddim20_eta0.5"
    config.model.num_classes, config.sampling.guidance_scale = 3, 1.5
    assert outputs.sampler_label(config) == "ddim20_eta0.5_w1.5"
    config.model.num_classes = 0
    config.sampling.method, config.sampling.timestep_spacing = "dpm_solver++", "trailing"
    assert outputs.sampler_label(config) == "dpmpp2m20_trailing"
    config.sampling.method, config.sampling.solver_order = "unipc", 1
    assert outputs.sampler_label(config) == "unipc1_20_trailing"
    config.sampling.method, config.sampling.timestep_spacing = "heun", "linspace"
    assert outputs.sampler_label(config) == "heun20"


def test_write_samples_writes_grid_npz_strip_and_captions(tmp_path):
    samples = _tiles(6, 4, 4, 3)
    frames = np.stack([samples, samples // 2])
    paths = outputs.write_samples(str(tmp_path), "s", samples, frames, labels=np.repeat(np.arange(3), 2),
                                  class_names=("a", "b", "c"), guidance_scale=1.0)
    assert set(paths) == {"grid", "npz", "strip", "classes"}
    np.testing.assert_array_equal(np.load(paths["npz"])["samples"], samples)
    # 4x4 samples are shown at 64x64 (nearest neighbour); the .npz keeps them at 4x4.
    assert Image.open(paths["grid"]).size == (2 * 66 + 2, 3 * 66 + 2)  # One row per class.
    assert Image.open(paths["strip"]).size == (2 * 66 + 2, 6 * 66 + 2)  # 2 frames across, 6 samples down.
    grid = np.asarray(Image.open(paths["grid"]))
    np.testing.assert_array_equal(grid[2:66, 2:66], np.repeat(np.repeat(samples[0], 16, 0), 16, 1))
    none = outputs.write_samples(str(tmp_path), "t", samples, frames[:0])
    assert set(none) == {"grid", "npz"}


def test_enlarge_repeats_pixels_to_the_minimum_tile():
    tiles = _tiles(2, 16, 16, 3)
    big = outputs.enlarge(tiles)
    assert big.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(big[:, ::4, ::4], tiles)
    np.testing.assert_array_equal(big[:, 3::4, 1::4], tiles)
    assert outputs.enlarge(_tiles(1, 64, 64, 3)).shape == (1, 64, 64, 3)  # Large enough: unchanged.
    assert outputs.enlarge(np.zeros((3, 6, 5, 1), np.uint8)).shape == (
        3, 78, 65, 1)  # The shorter side reaches 64: a factor of 13.
