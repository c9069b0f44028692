"""Host-side outputs: sample grids and strips, PNG/NPZ files, the console progress line and TensorBoard events."""

import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import images, metrics


def _tiles(n, h, w, c):
    """n images whose every pixel value is unique across the batch (so misplaced or flipped tiles show)."""
    return (np.arange(n * h * w * c) % 251).astype(np.uint8).reshape(n, h, w, c)


def test_make_grid_geometry_and_tile_placement():
    tiles = _tiles(5, 3, 4, 3)  # 5 tiles -> ceil(sqrt(5)) = 3 columns, 2 rows, the last slot empty.
    grid = images.make_grid(tiles)
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
    grid = images.make_grid(tiles, ncols=3, padding=1, pad_value=7)
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
    no_pad = images.make_grid(tiles, ncols=1, padding=0)
    np.testing.assert_array_equal(no_pad, tiles.reshape(6, 2, 1))


def test_make_strip_rows_are_samples_and_columns_frames():
    num_frames, num_samples = 4, 5
    frames = np.zeros((num_frames, num_samples, 2, 3, 3), np.uint8)
    for f in range(num_frames):
        for n in range(num_samples):
            frames[f, n] = 10 * n + f  # Tile value encodes (sample, frame).
    strip = images.make_strip(frames, num_rows=3)  # Only the first 3 samples.
    assert strip.shape == (3 * (2 + 2) + 2, num_frames * (3 + 2) + 2, 3)
    for row in range(3):
        for col in range(num_frames):
            y, x = 2 + row * 4, 2 + col * 5
            assert (strip[y : y + 2, x : x + 3] == 10 * row + col).all(), (row, col)
    # Fewer samples than num_rows: every sample gets a row.
    assert images.make_strip(frames, num_rows=8).shape[0] == num_samples * 4 + 2


@pytest.mark.parametrize("channels", [3, 1])
def test_save_png_round_trip(tmp_path, channels):
    image = _tiles(1, 5, 7, channels)[0]
    path = str(tmp_path / "new" / "dir" / "grid.png")
    assert images.save_png(path, image) == path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (7, 5) and im.mode == ("RGB" if channels == 3 else "L")
        back = np.asarray(im)
    np.testing.assert_array_equal(back, image if channels == 3 else image[..., 0])
    assert sorted(os.listdir(tmp_path / "new" / "dir")) == ["grid.png"]


def test_save_png_replaces_an_existing_file(tmp_path):
    path = str(tmp_path / "a.png")
    images.save_png(path, np.zeros((2, 2, 3), np.uint8))
    images.save_png(path, np.full((3, 3, 3), 200, np.uint8))
    with Image.open(path) as im:
        assert (np.asarray(im) == 200).all() and im.size == (3, 3)
    assert os.listdir(tmp_path) == ["a.png"]


def test_save_npz_round_trip(tmp_path):
    samples = _tiles(4, 6, 6, 3)
    path = str(tmp_path / "out" / "samples.npz")
    assert images.save_npz(path, samples) == path
    with np.load(path) as data:
        assert list(data.keys()) == ["samples"]
        assert data["samples"].dtype == np.uint8
        np.testing.assert_array_equal(data["samples"], samples)
    assert sorted(os.listdir(tmp_path / "out")) == ["samples.npz"]


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (45, "45s"), (59.9, "59s"), (60, "1m00s"), (185, "3m05s"), (3599, "59m59s"), (3600, "1h00m"),
     (7620, "2h07m"), (90061, "25h01m"), (-5, "0s")],
)
def test_format_duration(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_progress_line_has_step_loss_lr_throughput_and_eta():
    scalars = {"loss": 0.123456, "grad_norm": 1.5, "learning_rate": 2e-4, "steps_per_sec": 10.0,
               "images_per_sec": 1280.0}
    line = metrics.progress_line(900, 1000, scalars)
    assert "\n" not in line
    for part in ("step 900/1000", "(90.0%)", "loss 0.1235", "grad_norm 1.500", "lr 2.00e-04", "10.00 steps/s",
                 "1280.0 img/s"):
        assert part in line, (part, line)
    assert line.endswith("ETA 10s")  # 100 steps left at 10 steps/s.
    assert metrics.progress_line(0, 1000, {**scalars, "steps_per_sec": 2.0}).endswith("ETA 8m20s")
    assert metrics.progress_line(1000, 1000, scalars).endswith("ETA 0s")
    # Before the first throughput measurement there is no ETA to give.
    no_rate = {k: v for k, v in scalars.items() if k not in ("steps_per_sec", "images_per_sec")}
    assert metrics.progress_line(5, 1000, no_rate).endswith("ETA ?")


def _masked_crc(data):
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
    """Parses a TFRecord event file (length, masked CRC, Event proto, masked CRC) without TensorFlow."""
    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert length_crc == _masked_crc(header)
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert payload_crc == _masked_crc(payload)
        events.append(event_pb2.Event.FromString(payload))
        pos += 16 + length
    assert pos == len(data)
    return events


def test_metric_writer_scalars_and_images_read_back(tmp_path):
    logdir = tmp_path / "tensorboard"
    writer = metrics.MetricWriter(str(logdir))
    writer.write_scalars(2, {"loss": 0.5, "learning_rate": np.float32(1e-3)})
    writer.write_scalars(4, {"loss": 0.25, "learning_rate": 2e-3})
    image = _tiles(1, 4, 6, 3)[0]
    writer.write_image(4, "samples", image)
    writer.close()
    writer.close()  # A second close is harmless.

    files = os.listdir(logdir)
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
    events = _read_events(logdir / files[0])
    scalars, pictures = {}, {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars[(event.step, value.tag)] = value.simple_value
            elif value.HasField("image"):
                pictures[(event.step, value.tag)] = value.image
    assert scalars == {
        (2, "loss"): pytest.approx(0.5), (2, "learning_rate"): pytest.approx(1e-3),
        (4, "loss"): pytest.approx(0.25), (4, "learning_rate"): pytest.approx(2e-3),
    }
    assert list(pictures) == [(4, "samples")]
    png = pictures[(4, "samples")]
    assert (png.height, png.width, png.colorspace) == (4, 6, 3)
    with Image.open(io.BytesIO(png.encoded_image_string)) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), image)
