"""Bilinear texture sampling in PyTorch (docs/MODEL.md, "Textures"), as the kernels sample.

A texture is ``(Ht, Wt, C)``, row 0 the image's top row. Texture coordinates ``(u, v)`` put texel
centers at half-integers: ``x = u Wt - 1/2`` across and ``y = (1 - v) Ht - 1/2`` down, so that
``v = 0`` is the image's bottom edge, as OBJ's ``vt`` says. Coordinates outside ``[0, 1]`` wrap
around, or (``wrap=False``) take the edge texels.
"""

from __future__ import annotations

import torch


def sample_bilinear(texture: torch.Tensor, uv: torch.Tensor, wrap: bool) -> torch.Tensor:
    """``(..., C)``: ``texture`` ``(Ht, Wt, C)`` at texture coordinates ``uv`` ``(..., 2)``.

    Differentiable with respect to both (autograd: the gradient to the texture goes to the four
    texels around each coordinate, with their bilinear weights).
    """
    height, width, channels = texture.shape
    cols, col_frac = _axis(uv[..., 0] * width - 0.5, width, wrap)
    rows, row_frac = _axis((1 - uv[..., 1]) * height - 0.5, height, wrap)
    flat = texture.reshape(-1, channels)

    def texel(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return flat[row * width + col]

    fx, fy = col_frac[..., None], row_frac[..., None]
    return ((1 - fy) * ((1 - fx) * texel(rows[0], cols[0]) + fx * texel(rows[0], cols[1]))
            + fy * ((1 - fx) * texel(rows[1], cols[0]) + fx * texel(rows[1], cols[1])))


def _axis(x: torch.Tensor, size: int, wrap: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The two texel indices along one axis around ``x`` (texel units, centers at integers) and
    the weight of the second."""
    if wrap:
        x = x - size * torch.floor(x / size)  # in [0, size]: size itself (rounding) is texel 0
    else:
        x = x.clamp(-1, size)
    start = torch.floor(x)
    frac = x - start
    first = start.long()
    if wrap:
        first = first % size
        second = (first + 1) % size
    else:
        second = (first + 1).clamp(0, size - 1)
        first = first.clamp(0, size - 1)
    return (first, second), frac
