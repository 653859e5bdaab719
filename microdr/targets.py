"""Target images for the optimizer: files (or tensors) in, one RGBA tensor per camera out.

What a target holds depends on its channels, file or tensor alike (:func:`classify`):

- 1 channel (grayscale): a silhouette only, white where the object is.
- 2 channels (gray + alpha) or 4 (RGBA): color and silhouette (the alpha); but if the color
  channels are all zero, the image is a silhouette only (a black mask with alpha).
- 3 channels (RGB): color only, no silhouette.

Color is compared with the renderer's blended color ``I`` as it is (not premultiplied or
divided by alpha): the same as ``microdr render --alpha`` writes. PNG files are read exactly,
every color type and bit depth (1 to 16; white is 1 at each).
"""

from __future__ import annotations

import glob
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import png
import torch

from .errors import InputError
from .files import read_bytes
from .scene import too_many_pixels

#: The files a folder given as a target contributes (by suffix, any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
#: How a file's pixels map to [0, 1]: by their numpy dtype.
_PIXEL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(bool): 1.0}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Where the command line's target arguments are named in errors.
SOURCE = "TARGET"


@dataclass(frozen=True)
class Targets:
    """One target per camera, in the scene's camera order.

    images: ``(N, 4, H, W)`` float32 in ``[0, 1]``, CPU: RGB then silhouette. The RGB of a
        view without color, and the silhouette of a view without one, are zeros and unused.
    has_rgb, has_silhouette: ``(N,)`` bool, CPU: what each view constrains; at least one per view.
    names: ``N`` strings naming each target in messages (file paths, or ``"target 0"``...).
    """

    images: torch.Tensor
    has_rgb: torch.Tensor
    has_silhouette: torch.Tensor
    names: tuple[str, ...]

    @staticmethod
    def from_images(
        images: torch.Tensor | Sequence[torch.Tensor], names: Sequence[str] | None = None
    ) -> "Targets":
        """Targets from float images in ``[0, 1]``: a tensor ``(N, C, H, W)`` or a sequence of
        ``N`` tensors ``(C_i, H, W)``, each ``C`` in 1 to 4 (see the module's rules; e.g.
        ``render_scene(...)`` gives RGBA with a silhouette). Any float dtype and device."""
        views = []
        for image in images:
            if image.dim() != 3 or not 1 <= image.shape[0] <= 4:
                raise ValueError(f"a target must be (C, H, W), C in 1..4, got {tuple(image.shape)}")
            if views and image.shape[1:] != views[0][0].shape[1:]:
                raise ValueError(
                    f"targets differ in size: {tuple(image.shape[1:])} and "
                    f"{tuple(views[0][0].shape[1:])}"
                )
            views.append(classify(image.detach().to(device="cpu", dtype=torch.float32)))
        if names is None:
            names = [f"target {i}" for i in range(len(views))]
        return Targets(
            images=torch.stack([rgba for rgba, _, _ in views]),
            has_rgb=torch.tensor([rgb for _, rgb, _ in views]),
            has_silhouette=torch.tensor([silhouette for _, _, silhouette in views]),
            names=tuple(names),
        )

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.images.shape[-1], self.images.shape[-2]


def classify(image: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
    """One target ``(C, H, W)`` as RGBA ``(4, H, W)``, whether it has color, whether it has a
    silhouette (the module's rules)."""
    channels = image.shape[0]
    if channels == 1:
        return torch.cat([torch.zeros_like(image).expand(3, -1, -1), image]), False, True
    if channels == 3:
        return torch.cat([image, torch.zeros_like(image[:1])]), True, False
    color = image[:-1].expand(3, -1, -1)
    has_rgb = bool(color.any())
    return torch.cat([color, image[-1:]]), has_rgb, True


def read_targets(
    arguments: Sequence[str], cameras: int, size: tuple[int, int], *, resize: bool = False
) -> Targets:
    """Read one target image per camera from files, folders and glob patterns.

    ``size`` is the scene's ``(width, height)``: an image of another size is an error unless
    ``resize``, which resamples it (antialiased bilinear). Every problem is one
    :class:`InputError` naming the file (or ``TARGET`` for the arguments as a whole).
    """
    paths = expand_arguments(arguments)
    if len(paths) != cameras:
        raise InputError(
            SOURCE,
            "",
            "expected one image per camera, in the scene's order; "
            f"cameras: {cameras}, images: {len(paths)}",
        )
    images = [_fit(read_image(path), str(path), size, resize) for path in paths]
    return Targets.from_images(images, [str(path) for path in paths])


def expand_arguments(arguments: Sequence[str]) -> list[Path]:
    """The files the arguments name, in order: a file as it is, a folder's image files and a
    glob pattern's matches each sorted by name (numbers by value: ``2.png`` before ``10.png``)."""
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                listed = ", ".join(IMAGE_SUFFIXES)
                raise InputError(argument, "", f"a folder with no image files ({listed})")
            paths += sorted(found, key=_natural_key)
        elif not path.exists() and any(c in argument for c in "*?["):
            found = [Path(p) for p in glob.glob(argument) if Path(p).is_file()]
            if not found:
                raise InputError(argument, "", "no file matches this pattern")
            paths += sorted(found, key=_natural_key)
        else:
            paths.append(path)
    return paths


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_image(path: Path) -> torch.Tensor:
    """An image file as float32 ``(C, H, W)`` in ``[0, 1]``; 8- and 16-bit PNGs are exact."""
    source = str(path)
    data = read_bytes(path)
    is_png = data.startswith(_PNG_SIGNATURE)
    if not is_png and path.suffix.lower() == ".png":
        # The usual unreadable "image": say so rather than what imageio's probing found.
        raise InputError(source, "", "not a PNG file (it does not start with the PNG signature)")
    # From the header, before any pixel is decoded: a small file can claim a huge image.
    size = _png_size(data) if is_png else None
    problem = too_many_pixels(*size) if size else None
    if problem:
        raise InputError(source, "", problem)
    try:
        # Pillow (imageio's PNG reader) cuts 16-bit color to 8 bits; pypng reads any PNG exactly.
        if is_png:
            pixels, scale = _decode_png(data)
        else:
            pixels = iio.imread(data, index=0)
    except Exception as error:  # decoders raise many types for one cause: bytes they cannot read
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise InputError(source, "", f"not a readable image ({reason})") from None
    if not is_png:
        scale = _PIXEL_SCALE.get(pixels.dtype)
        if scale is None:
            raise InputError(source, "", f"pixels of type {pixels.dtype}: expected 8 or 16 bits")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or not 1 <= pixels.shape[-1] <= 4:
        raise InputError(
            source, "", f"expected one image of 1 to 4 channels, got an array {pixels.shape}"
        )
    return torch.from_numpy(pixels.astype(np.float32) / scale).permute(2, 0, 1)


def _png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's header chunk (IHDR, first after the signature), or
    ``None`` if it has none; the decoder then says what is wrong."""
    if data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return struct.unpack(">II", data[16:24])


def _decode_png(data: bytes) -> tuple[np.ndarray, int]:
    """``(H, W, C)`` uint8 or uint16 pixels of PNG bytes and the value that stands for 1:
    ``2**bits - 1`` at the file's bit depth (1, 2, 4, 8 or 16), 255 for palette colors.

    Palette indices become their colors (RGBA if a tRNS chunk gives the palette alphas); a tRNS
    color key becomes an alpha channel (0 where a pixel is the key). An sBIT chunk (how many
    bits were significant before the values were scaled to the file's depth) changes nothing:
    the stored values are the image, as PNG's specification and Pillow read them.
    """
    reader = png.Reader(bytes=data)
    width, height, rows, info = reader.read()
    bits = info["bitdepth"]
    samples = np.vstack([np.asarray(row, dtype=np.uint16 if bits > 8 else np.uint8) for row in rows])
    pixels = samples.reshape(height, width, info["planes"])
    if info.get("palette"):
        palette = np.asarray(reader.palette(), dtype=np.uint8)  # (entries, 3 or 4)
        if int(pixels.max(initial=0)) >= len(palette):
            raise ValueError(f"a pixel's palette index is beyond the {len(palette)} colors")
        return palette[pixels[..., 0]], 255
    if reader.transparent is not None:
        opaque = (pixels != np.asarray(reader.transparent, dtype=pixels.dtype)).any(axis=-1)
        alpha = opaque.astype(pixels.dtype) * (2**bits - 1)
        pixels = np.concatenate([pixels, alpha[..., None]], axis=-1)
    return pixels, 2**bits - 1


def _fit(image: torch.Tensor, source: str, size: tuple[int, int], resize: bool) -> torch.Tensor:
    """``image`` ``(C, H, W)`` at the scene's ``size`` ``(width, height)``."""
    width, height = image.shape[-1], image.shape[-2]
    if (width, height) == size:
        return image
    if not resize:
        raise InputError(
            source,
            "",
            f"image is {width} x {height} but the scene renders {size[0]} x {size[1]}"
            " (give --resize to resample)",
        )
    resized = torch.nn.functional.interpolate(
        image[None], size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].clamp(0, 1)
