"""Flat Lambertian shading of per-corner albedo, before rasterization (MODEL.md, "Shading").

``c = rho * (k_a + sum_l k_l * max(0, n . l))`` with ``n`` the unit face normal (counter-clockwise
winding, right-hand rule) and ``l`` the unit direction towards light ``l``. Without lights
``c = rho``.
"""

from __future__ import annotations

import torch

from .scene import Lights


def face_normals(face_vertices: torch.Tensor) -> torch.Tensor:
    """Unit normals ``(..., F, 3)`` of triangles ``(..., F, 3, 3)``; zero-area faces give 0."""
    v0, v1, v2 = face_vertices.unbind(-2)
    return torch.nn.functional.normalize(torch.linalg.cross(v1 - v0, v2 - v0), dim=-1)


def shade(albedo: torch.Tensor, face_vertices: torch.Tensor, lights: Lights | None) -> torch.Tensor:
    """Shaded per-corner colors ``(..., F, 3, C)`` from albedo ``(..., F, 3, C)``.

    ``face_vertices`` ``(..., F, 3, 3)`` are world-space corners. Light directions point towards
    the light and need not be unit length.
    """
    if lights is None:
        return albedo
    normals = face_normals(face_vertices)
    irradiance = torch.full_like(normals[..., 0], lights.ambient)
    for light in lights.directional:
        towards = torch.nn.functional.normalize(normals.new_tensor(light.direction), dim=0)
        irradiance = irradiance + light.intensity * (normals @ towards).clamp(min=0)
    return albedo * irradiance[..., None, None]
