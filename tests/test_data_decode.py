"""Per-image conversion: transparency, palettes, 16-bit, small and non-square images, EXIF, bytes."""

import pathlib

import numpy as np
import pytest
from helpers import image_mode
from PIL import Image

from ddpm_jax import data
from ddpm_jax.data import decode

BICUBIC = Image.Resampling.BICUBIC


@pytest.fixture(scope="module")
def butterfly_rgb(butterfly_files: list[pathlib.Path]) -> Image.Image:
    """A real RGB butterfly photo at 64x64, the base for the conversion tests."""
    with Image.open(butterfly_files[0]) as img:
        return img.convert("RGB").resize((64, 64), BICUBIC)


def test_rgba_and_la_transparency_become_white(tmp_path: pathlib.Path, butterfly_rgb: Image.Image) -> None:
    rgba = np.dstack([np.asarray(butterfly_rgb), np.full((64, 64), 255, np.uint8)])
    rgba[:, :32] = 0  # black *and* fully transparent: only compositing onto white gives white here
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = data.load_image(tmp_path / "rgba.png", 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:, :14] == 255).all()
    assert out[:, 18:].mean() < 240

    gray = np.asarray(butterfly_rgb.convert("L"))
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:32] = 0
    la = np.dstack([gray, alpha])
    la[:32, :, 0] = 0  # black where transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = data.load_image(tmp_path / "la.png", 32)
    assert (out[:14] == 255).all()
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert out[18:].mean() < 240


def test_palette_images(tmp_path: pathlib.Path, butterfly_rgb: Image.Image) -> None:
    pal = butterfly_rgb.quantize(colors=200)
    pal.save(tmp_path / "pal.png")
    pal.convert("RGB").save(tmp_path / "pal_as_rgb.png")
    assert image_mode(tmp_path / "pal.png") == "P"
    assert np.array_equal(data.load_image(tmp_path / "pal.png", 32), data.load_image(tmp_path / "pal_as_rgb.png", 32))

    # A palette image with a transparent index: transparent pixels become white, not the palette colour.
    idx = np.array(pal)
    idx[:, :32] = 250
    palette = pal.getpalette() + [0] * (768 - len(pal.getpalette()))
    palette[250 * 3 : 250 * 3 + 3] = [0, 0, 0]
    transparent = Image.fromarray(idx, "P")
    transparent.putpalette(palette)
    transparent.save(tmp_path / "pal_t.png", transparency=250)
    out = data.load_image(tmp_path / "pal_t.png", 32)
    assert (out[:, :14] == 255).all() and out[:, 18:].mean() < 240

    # GIF goes through the same palette path.
    transparent.save(tmp_path / "pal_t.gif", transparency=250)
    assert (data.load_image(tmp_path / "pal_t.gif", 32)[:, :14] == 255).all()


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: pathlib.Path) -> None:
    values = np.zeros((64, 64), np.uint16)
    values[:, :21] = 65535
    values[:, 21:43] = 128 * 257  # midtone
    values[:, 43:] = 77 * 257 + 100  # 77.39 -> 77
    Image.fromarray(values).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as img:
        assert img.mode.startswith("I")
    out = data.load_image(tmp_path / "gray16.png", 32)
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
        converted = np.asarray(decode.rgb8(img))
        assert converted.shape == (64, 64, 3) and np.array_equal(converted[..., 0], expected), img.mode


def test_small_and_non_square_images(tmp_path: pathlib.Path) -> None:
    tiny = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)  # 8 wide, 6 high
    Image.fromarray(tiny).save(tmp_path / "tiny.png")
    out = data.load_image(tmp_path / "tiny.png", 32)  # upscaled, not padded
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
        out = data.load_image(tmp_path / name, 16).astype(int)
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
    out = data.load_image(tmp_path / "rotated.jpg", 16).astype(int)
    assert out[:, 12:, 0].mean() > 200 and out[:, 12:, 2].mean() < 60  # red on the right
    assert out[:, :4, 2].mean() > 200 and out[:, :4, 0].mean() < 60  # blue on the left


def test_load_image_reads_bytes_like_files(butterfly_files: list[pathlib.Path]) -> None:
    encoded = butterfly_files[10].read_bytes()
    assert np.array_equal(decode.image_from_bytes(encoded, 32), data.load_image(butterfly_files[10], 32))
