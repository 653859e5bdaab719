"""Target image files as :func:`microdr.targets.read_image` decodes them: every PNG color type
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
from microdr.targets import read_image

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
    Image.fromarray(RNG.integers(0, 256, (*SHAPE, len(mode))).astype(np.uint8).squeeze(), mode).save(
        tmp_path / "t.png"
    )
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
