"""Target images for the optimizer: files (or tensors) in, one RGBA tensor per camera out.

What a target holds depends on its channels, file or tensor alike (:func:`classify`):

- 1 channel (grayscale): a silhouette only, white where the object is.
- 2 channels (gray + alpha) or 4 (RGBA): color and silhouette (the alpha); but if the color
  channels are all zero, the image is a silhouette only (a black mask with alpha).
- 3 channels (RGB): color, and a silhouette derived from the background color when one is
  given (the scene's ``render.background``; :func:`derive_silhouette`), else color only.

Color is compared with the renderer's blended color ``I`` as it is (not premultiplied or
divided by alpha): the same as ``microdr render --alpha`` writes. PNG files are read exactly,
every color type and bit depth (1 to 16; white is 1 at each).
"""

from __future__ import annotations

import glob
import io
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import png
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .files import read_bytes
from .scene import too_many_pixels

#: The files a folder given as a target contributes (by suffix, any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
#: What the image formats microDR reads are, as errors list them (PNG and what Pillow reads).
READ_FORMATS = "PNG, JPEG, BMP, TIFF, GIF, WebP"
#: The sample value that stands for 1, by sample type (in native byte order).
_FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
#: The color mode each Pillow mode is read in; other modes are refused. Integer and float
#: samples ("I", "F") are kept so that their refusal can name their type.
_PILLOW_MODES = {
    "1": "L", "L": "L", "La": "LA", "LA": "LA", "P": "RGB", "PA": "RGBA", "RGB": "RGB",
    "RGBX": "RGB", "RGBa": "RGBA", "RGBA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB",
    "I;16": "I;16", "I;16L": "I;16L", "I;16B": "I;16B", "I;16N": "I;16N", "I": "I", "F": "F",
}  # fmt: skip
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
    no_silhouette: ``N`` entries: why a view has no silhouette (a phrase such as ``"an RGB
        image, and no background color to derive one from"``), ``None`` where it has one.
    """

    images: torch.Tensor
    has_rgb: torch.Tensor
    has_silhouette: torch.Tensor
    names: tuple[str, ...]
    no_silhouette: tuple[str | None, ...]

    @staticmethod
    def from_images(
        images: torch.Tensor | Sequence[torch.Tensor],
        names: Sequence[str] | None = None,
        *,
        background: Sequence[float] | None = None,
    ) -> "Targets":
        """Targets from float images in ``[0, 1]``: a tensor ``(N, C, H, W)`` or a sequence of
        ``N`` tensors ``(C_i, H, W)``, each ``C`` in 1 to 4 (see the module's rules; e.g.
        ``render_scene(...)`` gives RGBA with a silhouette). Any float dtype and device.
        ``background``: the scene's ``render.background`` (3 floats in ``[0, 1]``), from which
        RGB targets get a silhouette (:func:`derive_silhouette`); ``None``: they get none."""
        views = []
        for image in images:
            if image.dim() != 3 or not 1 <= image.shape[0] <= 4:
                raise ValueError(f"a target must be (C, H, W), C in 1..4, got {tuple(image.shape)}")
            if views and image.shape[1:] != views[0][0].shape[1:]:
                raise ValueError(
                    f"targets differ in size: {tuple(image.shape[1:])} and "
                    f"{tuple(views[0][0].shape[1:])}"
                )
            image = image.detach().to(device="cpu", dtype=torch.float32)
            views.append(classify(image, background))
        if names is None:
            names = [f"target {i}" for i in range(len(views))]
        return Targets(
            images=torch.stack([rgba for rgba, _, _ in views]),
            has_rgb=torch.tensor([rgb for _, rgb, _ in views]),
            has_silhouette=torch.tensor([why is None for _, _, why in views]),
            names=tuple(names),
            no_silhouette=tuple(why for _, _, why in views),
        )

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.images.shape[-1], self.images.shape[-2]


def classify(
    image: torch.Tensor, background: Sequence[float] | None = None
) -> tuple[torch.Tensor, bool, str | None]:
    """One target ``(C, H, W)`` float32 as RGBA ``(4, H, W)``, whether it has color, and why it
    has no silhouette (``None`` if it has one), by the module's rules; ``background`` as in
    :meth:`Targets.from_images`."""
    channels = image.shape[0]
    if channels == 1:
        return torch.cat([torch.zeros_like(image).expand(3, -1, -1), image]), False, None
    if channels == 3:
        if background is None:
            silhouette, why = None, "an RGB image, and no background color to derive one from"
        else:
            silhouette, why = derive_silhouette(image, torch.tensor(background))
        if silhouette is None:
            silhouette = torch.zeros_like(image[0])
        return torch.cat([image, silhouette[None]]), True, why
    color = image[:-1].expand(3, -1, -1)
    has_rgb = bool(color.any())
    return torch.cat([color, image[-1:]]), has_rgb, None


# ---------------------------------------------------------------------------------------------
# Silhouettes of RGB targets

#: Distances to the background color (Euclidean, RGB in [0, 1]) up to this are background:
#: 8-bit rounding and JPEG noise (quality 30 leaves up to 0.13 a few pixels off a red edge).
BACKGROUND_TOLERANCE = 0.15
#: A pixel this far from the background color (or farther) is unambiguously the object.
OBJECT_CONTRAST = 0.3
#: Anti-aliased (and JPEG-blurred) edges are measured against the farthest color within this
#: many pixels (a (2r + 1)^2 window): an edge pixel's neighbours inside hold the object's color.
EDGE_RADIUS = 2
#: The share of border pixels that must be background: objects may cross the frame, a bit.
BORDER_BACKGROUND_SHARE = 0.5
#: Off-background pixels with nothing unambiguous near them may be at most this share of all
#: off-background pixels: more, and the object's colors are too close to the background's.
AMBIGUOUS_SHARE = 0.1


def derive_silhouette(
    rgb: torch.Tensor, background: torch.Tensor
) -> tuple[torch.Tensor | None, str | None]:
    """The silhouette of an object drawn on a uniform background: ``(H, W)`` in ``[0, 1]`` and
    ``None``; or ``None`` and why none can be derived (a phrase, for messages).

    rgb: ``(3, H, W)`` float in ``[0, 1]``; background: ``(3,)``, the color the renderer draws
    where no face is (``render.background``); any float dtype, CPU.

    Rule: ``d`` is each pixel's Euclidean RGB distance to the background color and ``D`` the
    largest ``d`` in its ``(2 EDGE_RADIUS + 1)^2`` neighbourhood. The silhouette is
    ``clamp((d - t) / (max(D, c) - t), 0, 1)``, ``t`` = :data:`BACKGROUND_TOLERANCE`,
    ``c`` = :data:`OBJECT_CONTRAST`: 0 within the tolerance of the background (noise), 1 inside
    an object, and at an anti-aliased edge (a blend ``a * object + (1 - a) * background``, so
    ``d = a * D``) about the coverage ``a``, whatever the object's color; only near the
    tolerance does it fall below ``a`` (by ``t / D`` of the way, 0.15 px of an edge pixel for
    a saturated red object on black, more for colors close to the background).

    No silhouette when (checked in this order):

    - less than :data:`BORDER_BACKGROUND_SHARE` of the border pixels are within the tolerance
      of the background color: the image's background is another color (or not uniform);
    - no pixel is :data:`OBJECT_CONTRAST` away from the background: nothing to see;
    - more than :data:`AMBIGUOUS_SHARE` of the off-background pixels have no pixel that far
      near them: the object's colors are too close to the background's to tell them apart.
    """
    distance = (rgb - background.to(rgb.dtype)[:, None, None]).norm(dim=0)
    border = torch.cat([distance[0], distance[-1], distance[1:-1, 0], distance[1:-1, -1]])
    share = (border <= BACKGROUND_TOLERANCE).to(rgb.dtype).mean().item()
    if share < BORDER_BACKGROUND_SHARE:
        return None, (
            f"an RGB image whose border is only {share:.0%} the background color "
            f"{_color(background)} (within {BACKGROUND_TOLERANCE})"
        )
    if distance.max() < OBJECT_CONTRAST:
        return None, (
            f"an RGB image with no pixel {OBJECT_CONTRAST} away from the background color "
            f"{_color(background)}"
        )
    window = 2 * EDGE_RADIUS + 1
    pool = torch.nn.functional.max_pool2d
    nearby = pool(distance[None], window, stride=1, padding=EDGE_RADIUS)[0]
    off_background = distance > BACKGROUND_TOLERANCE
    ambiguous = off_background & (nearby < OBJECT_CONTRAST)
    if ambiguous.sum() > AMBIGUOUS_SHARE * off_background.sum():
        return None, (
            f"an RGB image whose colors are too close to the background color "
            f"{_color(background)}: {ambiguous.sum().item()} of the "
            f"{off_background.sum().item()} pixels unlike it are within {OBJECT_CONTRAST} of it"
        )
    contrast = nearby.clamp(min=OBJECT_CONTRAST) - BACKGROUND_TOLERANCE
    return ((distance - BACKGROUND_TOLERANCE) / contrast).clamp(0, 1), None


def _color(rgb: torch.Tensor) -> str:
    return "[" + ", ".join(f"{c:g}" for c in rgb.tolist()) + "]"


def read_targets(
    arguments: Sequence[str],
    cameras: int,
    size: tuple[int, int],
    *,
    resize: bool = False,
    background: Sequence[float] | None = None,
) -> Targets:
    """Read one target image per camera from files, folders and glob patterns.

    ``size`` is the scene's ``(width, height)``: an image of another size is an error unless
    ``resize``, which resamples it (antialiased bilinear). ``background``: the scene's
    ``render.background``, to derive the silhouettes of RGB images (:meth:`Targets.from_images`).
    Every problem is one :class:`InputError` naming the file (or ``TARGET`` for the arguments as
    a whole).
    """
    paths = expand_arguments(arguments)
    if len(paths) != cameras:
        raise InputError(
            SOURCE,
            "",
            "expected one image per camera, in the scene's order; "
            f"cameras: {cameras}, images: {len(paths)}",
        )
    return read_target_files(paths, size, resize=resize, background=background)


def read_target_files(
    paths: Sequence[Path],
    size: tuple[int, int],
    *,
    resize: bool = False,
    background: Sequence[float] | None = None,
) -> Targets:
    """The targets in image files ``paths``, one per camera in order (such as a camera file's,
    :func:`microdr.io.camera_files.image_files`); the rest as :func:`read_targets`."""
    images = [_fit(read_image(path), str(path), size, resize) for path in paths]
    return Targets.from_images(images, [str(path) for path in paths], background=background)


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
    """An image file as float32 ``(C, H, W)`` in ``[0, 1]``.

    PNGs are read exactly by pypng (Pillow cuts 16-bit color to 8 bits); other formats by
    Pillow (:func:`_decode_with_pillow`). Every problem is one :class:`InputError` naming the file.
    """
    source = str(path)
    data = read_bytes(path)
    if not data:
        raise InputError(source, "", "empty file (0 bytes)")
    if _is_svg(data):
        raise InputError(source, "", "SVG is a vector format: export a PNG")
    is_png = data.startswith(_PNG_SIGNATURE)
    if not is_png and path.suffix.lower() == ".png":
        # The usual unreadable "image": say so rather than what a decoder's probing found.
        raise InputError(source, "", "not a PNG file (it does not start with the PNG signature)")
    if is_png:
        # From the header, before any pixel is decoded: a small file can claim a huge image.
        _check_size(_png_size(data), source)
        try:
            pixels, scale = _decode_png(data)
        except Exception as error:  # pypng raises many types for one cause: bytes it cannot read
            raise _unreadable(source, error) from None
    else:
        pixels = _decode_with_pillow(data, source)
        scale = _FULL_SCALE.get(pixels.dtype.newbyteorder("="))
        if scale is None:
            raise InputError(source, "", f"pixels of type {pixels.dtype}: expected 8 or 16 bits")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return torch.from_numpy(pixels.astype(np.float32) / scale).permute(2, 0, 1)


def _is_svg(data: bytes) -> bool:
    """Whether ``data`` looks like SVG: markup whose first kilobyte opens an ``<svg`` element."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<") and b"<svg" in head


def _check_size(size: tuple[int, int] | None, source: str) -> None:
    problem = too_many_pixels(*size) if size else None
    if problem:
        raise InputError(source, "", problem)


def _unreadable(source: str, error: Exception) -> InputError:
    reason = (str(error).strip() or type(error).__name__).splitlines()[0]
    return InputError(source, "", f"not a readable image ({reason})")


def _decode_with_pillow(data: bytes, source: str) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` pixels of a non-PNG image file's first frame, in the file's
    own sample type (uint8, uint16, or another that the caller refuses).

    Palettes become RGB, or RGBA with a transparent color; CMYK becomes RGB by the uncalibrated
    ``R = (1 - C)(1 - K)`` (Pillow's), unless the file embeds a color profile, which would give
    other colors: that is refused. A 32-bit BMP without channel masks keeps its 4th bytes as
    alpha unless they are all 0 (then they are padding, as Windows writes them).
    """
    try:
        with warnings.catch_warnings():  # the pixel limit below is ours, and it is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        message = f"not an image format microDR reads ({READ_FORMATS})"
        raise InputError(source, "", message) from None
    except Exception as error:  # Pillow raises many types for one cause: bytes it cannot read
        raise _unreadable(source, error) from None
    _check_size(image.size, source)
    mode = _PILLOW_MODES.get(image.mode)
    if mode is None:
        raise InputError(
            source, "", f"color mode {image.mode}: expected grayscale, RGB, palette or CMYK"
        )
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        raise InputError(
            source,
            "",
            "CMYK with a color profile (a print file): its colors depend on the profile, which "
            "microDR does not apply; save it as RGB",
        )
    if "transparency" in image.info and mode in ("L", "RGB"):
        mode += "A"
    try:
        if image.format == "BMP" and image.tile and image.tile[0][3][0] == "BGRX":
            return _bmp_with_alpha(image, data)
        return np.asarray(image if image.mode == mode else image.convert(mode))
    except Exception as error:  # truncated or damaged pixel data
        raise _unreadable(source, error) from None


def _bmp_with_alpha(image: Image.Image, data: bytes) -> np.ndarray:
    """The ``(H, W, 3 or 4)`` pixels of a 32-bit BMP that Pillow reads as RGB plus padding."""
    _, _, offset, (_, stride, orientation) = image.tile[0]
    rgba = np.asarray(
        Image.frombuffer("RGBA", image.size, data[offset:], "raw", "BGRA", stride, orientation)
    )
    return rgba if rgba[..., 3].any() else rgba[..., :3]


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
    dtype = np.uint16 if bits > 8 else np.uint8
    samples = np.vstack([np.asarray(row, dtype=dtype) for row in rows])
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
