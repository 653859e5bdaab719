"""Images as files: float tensors to 8-bit arrays, grids of views, PNG and GIF bytes.

Arrays here are numpy ``(..., H, W, C)`` uint8, row 0 at the top, as image files store them.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(..., H, W, C)`` 8-bit images from float images ``(..., C, H, W)``, any device."""
    # Lit colors can exceed 1 (ambient plus lights); 8 bits saturate them.
    scaled = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    return scaled.movedim(-3, -1).cpu().numpy()


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """The images ``(N, H, W, C)`` row by row in a grid with 1-pixel gaps (zeros: black, or
    transparent with alpha), ``columns`` wide (default: near-square); one image comes back as
    it is."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.zeros(
        (rows * (height + 1) - 1, columns * (width + 1) - 1, channels), dtype=np.uint8
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (height + 1), column * (width + 1)
        canvas[top : top + height, left : left + width] = image
    return canvas


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of one ``(H, W, C)`` uint8 image (C = 3: RGB, 4: RGBA)."""
    # Pillow itself, not through imageio: imageio's plugin loads every format of Pillow first,
    # ~0.3 s of a run.
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_gif(frames: np.ndarray, seconds: float) -> bytes:
    """A looping animated GIF of ``frames`` ``(N, H, W, 3)`` uint8 lasting ``seconds`` per loop;
    GIF counts time in hundredths of a second. All frames share one palette of 255 colors,
    chosen from every other pixel of the first, middle and last frames, without dithering:
    choosing a palette per frame took ~70 ms a frame of 4 views."""
    duration = round(seconds * 100 / len(frames)) * 10
    sample = np.concatenate([frames[i, ::2, ::2] for i in (0, len(frames) // 2, -1)])
    palette = Image.fromarray(sample).quantize(255, method=Image.Quantize.MEDIANCUT)
    first, *rest = (
        Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE)
        for frame in frames
    )
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=rest, loop=0, duration=duration)
    return buffer.getvalue()
