"""Target image files as :func:`microdr.io.targets.read_image` decodes them: every PNG color type
and bit depth, and the other formats' awkward cases, each checked against Pillow's own decoding
of the same file (made here with Pillow) converted to floats in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import png
import pytest
import torch
from PIL import Image

from microdr.errors import InputError
from microdr.io.targets import read_image

RNG = np.random.default_rng(0)
SHAPE = (5, 7)


def levels(bits: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Random 8-bit values that ``bits`` bits hold exactly: multiples of 255 / (2**bits - 1)."""
    top = 2**bits - 1
    return (RNG.integers(0, top + 1, shape) * (255 // top)).astype(np.uint8)


def as_floats(image: Image.Image, mode: str, full_scale: float = 255) -> torch.Tensor:
    """Pillow's pixels of ``image`` in ``mode`` as float32 ``(C, H, W)`` in [0, 1]."""
    pixels = np.asarray(image.convert(mode) if image.mode != mode else image).astype(np.float32)
    pixels = pixels.reshape(*pixels.shape[:2], -1) / full_scale
    return torch.from_numpy(pixels).permute(2, 0, 1)


def check(path: Path, mode: str, full_scale: float = 255) -> torch.Tensor:
    """``read_image(path)`` equals Pillow's decoding of it in ``mode``; returns it."""
    image = read_image(path)
    with Image.open(path) as opened:
        expected = as_floats(opened, mode, full_scale)
    assert image.dtype == torch.float32 and image.shape == expected.shape
    assert torch.equal(image, expected)
    return image


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_grayscale_pngs_of_every_bit_depth_read_white_as_1(tmp_path, bits):
    pixels = levels(bits)
    pixels[0, 0] = 255
    Image.fromarray(pixels, "L").save(tmp_path / "t.png", bits=bits)
    assert (tmp_path / "t.png").read_bytes()[24] == bits  # IHDR's bit depth: the case is real
    image = check(tmp_path / "t.png", "L")
    assert image[0, 0, 0] == 1


def test_a_1_bit_mask_from_pillow_reads_as_0_and_1(tmp_path):
    mask = levels(1) > 0
    Image.fromarray(mask).save(tmp_path / "mask.png")  # mode "1": Pillow's two-color mask
    image = check(tmp_path / "mask.png", "L")
    assert torch.equal(image[0], torch.from_numpy(mask).float())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_palette_pngs_of_every_bit_depth_read_as_their_colors(tmp_path, bits):
    colors = 2**bits
    palette = RNG.integers(0, 256, (colors, 3)).astype(np.uint8)
    image = Image.fromarray(RNG.integers(0, colors, SHAPE).astype(np.uint8), "P")
    image.putpalette(palette.tobytes())
    image.save(tmp_path / "t.png", bits=bits)
    assert (tmp_path / "t.png").read_bytes()[24:26] == bytes([bits, 3])
    check(tmp_path / "t.png", "RGB")


def test_palette_png_with_transparency_reads_as_rgba(tmp_path):
    image = Image.fromarray(RNG.integers(0, 4, SHAPE).astype(np.uint8), "P")
    image.putpalette(bytes(range(12)))
    image.save(tmp_path / "t.png", transparency=bytes([0, 128, 255, 40]))  # a tRNS chunk
    check(tmp_path / "t.png", "RGBA")


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_transparent_color_key_becomes_an_alpha_channel(tmp_path, mode):
    pixels = RNG.integers(0, 3, (*SHAPE, len(mode))).astype(np.uint8).squeeze()
    key = 1 if mode == "L" else (1, 1, 1)
    pixels[0, 0] = key
    Image.fromarray(pixels, mode).save(tmp_path / "t.png", transparency=key)
    image = check(tmp_path / "t.png", mode + "A")
    assert image[-1, 0, 0] == 0 and image[-1].max() == 1


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_8_bit_pngs_read_exactly(tmp_path, mode):
    pixels = RNG.integers(0, 256, (*SHAPE, len(mode))).astype(np.uint8).squeeze()
    Image.fromarray(pixels, mode).save(tmp_path / "t.png")
    check(tmp_path / "t.png", mode)


def test_16_bit_grayscale_png_reads_exactly(tmp_path):
    pixels = RNG.integers(0, 65536, SHAPE).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[24] == 16
    check(tmp_path / "t.png", "I;16", 65535)


def test_an_sbit_chunk_does_not_rescale_the_stored_values(tmp_path):
    # pypng writes a 5-bit image as 8-bit values scaled to 0..255 plus sBIT = 5; the values
    # stored are the image (its own reader would shift them back down to 0..31).
    values = RNG.integers(0, 32, SHAPE)
    with open(tmp_path / "t.png", "wb") as handle:
        png.Writer(SHAPE[1], SHAPE[0], greyscale=True, bitdepth=5).write(handle, values.tolist())
    assert b"sBIT" in (tmp_path / "t.png").read_bytes()
    check(tmp_path / "t.png", "L")


# --- other formats, through Pillow ------------------------------------------------------------


def test_a_cmyk_jpeg_reads_as_rgb(tmp_path):
    cmyk = np.zeros((8, 8, 4), dtype=np.uint8)
    cmyk[:4] = (0, 255, 255, 0)  # red
    cmyk[4:] = (128, 0, 0, 128)  # (1 - C)(1 - K): R 63, G and B 127
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "t.jpg", quality=100)
    image = check(tmp_path / "t.jpg", "RGB")
    assert image.shape[0] == 3
    assert (image[:, 1, 1] * 255 - torch.tensor([255.0, 0, 0])).abs().max() <= 2
    assert (image[:, 6, 6] * 255 - torch.tensor([63.0, 127, 127])).abs().max() <= 2


def test_a_cmyk_jpeg_with_a_color_profile_is_refused(tmp_path):
    Image.new("CMYK", (4, 4)).save(tmp_path / "t.jpg", icc_profile=b"a print profile")
    with pytest.raises(InputError, match=r"t\.jpg: CMYK with a color profile .*save it as RGB"):
        read_image(tmp_path / "t.jpg")


def test_an_rgba_bmp_keeps_its_alpha(tmp_path):
    pixels = RNG.integers(0, 256, (*SHAPE, 4)).astype(np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "t.bmp")  # 32 bits, alpha in the 4th byte
    image = read_image(tmp_path / "t.bmp")
    assert torch.equal(image, torch.from_numpy(pixels / np.float32(255)).permute(2, 0, 1))


def test_a_32_bit_bmp_whose_4th_bytes_are_all_zero_is_opaque_rgb(tmp_path):
    pixels = RNG.integers(0, 256, (*SHAPE, 4)).astype(np.uint8)
    pixels[..., 3] = 0  # the usual meaning: unused padding, not a fully transparent image
    Image.fromarray(pixels, "RGBA").save(tmp_path / "t.bmp")
    image = read_image(tmp_path / "t.bmp")
    assert torch.equal(image, torch.from_numpy(pixels[..., :3] / np.float32(255)).permute(2, 0, 1))


def test_a_gif_with_a_transparent_color_reads_as_rgba(tmp_path):
    image = Image.fromarray(RNG.integers(0, 4, SHAPE).astype(np.uint8), "P")
    image.putpalette(bytes(range(12)))
    image.save(tmp_path / "t.gif", transparency=2)
    check(tmp_path / "t.gif", "RGBA")


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("x.jpg", b"", "x.jpg: empty file (0 bytes)"),
        ("x.png", b"", "x.png: empty file (0 bytes)"),
        (
            "x.svg",
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
            "x.svg: SVG is a vector format: export a PNG",
        ),
        (
            "x.jpg",
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            "x.jpg: SVG is a vector format: export a PNG",
        ),
        (
            "x.jpg",
            b"hello",
            "x.jpg: not an image format microDR reads (PNG, JPEG, BMP, TIFF, GIF, WebP)",
        ),
    ],
)
def test_files_that_are_no_image_say_what_they_are(tmp_path, monkeypatch, name, data, message):
    monkeypatch.chdir(tmp_path)
    Path(name).write_bytes(data)
    with pytest.raises(InputError) as error:
        read_image(Path(name))
    assert str(error.value) == message
