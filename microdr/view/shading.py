"""Flat Lambertian shading of per-corner albedo, before rasterization (MODEL.md, "Shading").

``c = rho * (k_a + sum_l k_l * max(0, n . l))`` with ``n`` the unit face normal (counter-clockwise
winding, right-hand rule) and ``l`` the unit direction towards light ``l``. Without lights
``c = rho``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..io.mesh import triangle_normals
from ..io.scene import Lights


@dataclass(frozen=True)
class LightTensors:
    """Lights as tensors, so that gradients can flow into them (like ``CameraTensors``).

    ``ambient``: ``()``; ``directions``: ``(L, 3)`` towards each light, any nonzero length;
    ``intensities``: ``(L,)``. Any float dtype and device, the same for all three.
    """

    ambient: torch.Tensor
    directions: torch.Tensor
    intensities: torch.Tensor

    @staticmethod
    def of(lights: Lights, *, dtype=torch.float32, device=None) -> "LightTensors":
        def t(values):
            return torch.tensor(values, dtype=dtype, device=device)

        directional = lights.directional
        return LightTensors(
            t(lights.ambient),
            # reshape: no lights gives (0, 3), not (0,)
            t([light.direction for light in directional]).reshape(-1, 3),
            t([light.intensity for light in directional]),
        )


def shade(
    albedo: torch.Tensor, face_vertices: torch.Tensor, lights: Lights | LightTensors | None
) -> torch.Tensor:
    """Shaded per-corner colors ``(..., F, 3, C)`` from albedo ``(..., F, 3, C)``.

    ``face_vertices`` ``(..., F, 3, 3)`` are world-space corners. Light directions point towards
    the light and need not be unit length. With :class:`LightTensors` the result is
    differentiable with respect to the lights too.
    """
    if lights is None:
        return albedo
    if isinstance(lights, Lights):
        lights = LightTensors.of(lights, dtype=face_vertices.dtype, device=face_vertices.device)
    normals = triangle_normals(_scaled_down(face_vertices))
    irradiance = torch.zeros_like(normals[..., 0]) + lights.ambient
    for direction, intensity in zip(lights.directions, lights.intensities):
        towards = torch.nn.functional.normalize(direction, dim=0)
        irradiance = irradiance + intensity * (normals @ towards).clamp(min=0)
    return albedo * irradiance[..., None, None]


def _scaled_down(face_vertices: torch.Tensor) -> torch.Tensor:
    """Each face's corners relative to its first corner, divided by their largest coordinate:
    the same unit normal, but a cross product of edges that cannot overflow (float32 edges of
    1e20 would give infinite normals, and NaN colors after normalization). Zero-size faces stay
    zero."""
    relative = face_vertices - face_vertices[..., :1, :]
    scale = relative.abs().amax(dim=(-2, -1), keepdim=True)
    return relative / torch.where(scale > 0, scale, 1.0)
