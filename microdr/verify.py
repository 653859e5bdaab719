"""Gradient checks: a kernel backend against the reference, on a whole scene.

Both render the scene; a fixed random projection of the image, ``L = sum(R * image)``, is
differentiated w.r.t. the vertices and the colors, and the forward values and the gradients are
compared. Errors are reported absolute and relative to the reference's largest magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .raster import preferred_device, resolve_backend
from .render import render_faces, scene_faces
from .scene import Scene

#: Tolerances by dtype: forward (absolute), gradients (relative to the largest magnitude).
TOLERANCES = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-5, 1e-4)}


@dataclass(frozen=True)
class Comparison:
    quantity: str
    max_abs: float
    max_rel: float
    tolerance: float
    #: which error the tolerance applies to: "abs" or "rel"
    measure: str

    @property
    def ok(self) -> bool:
        error = self.max_abs if self.measure == "abs" else self.max_rel
        return error <= self.tolerance


def shrink(scene: Scene, max_side: int) -> Scene:
    """The scene rendered at most ``max_side`` pixels on its longer side (aspect kept)."""
    render = scene.render
    longest = max(render.width, render.height)
    if longest <= max_side:
        return scene
    factor = max_side / longest
    size = dict(width=max(1, round(render.width * factor)), height=max(1, round(render.height * factor)))
    return replace(scene, render=replace(render, **size))


def _render_and_differentiate(scene: Scene, backend: str, dtype: torch.dtype, projection_seed: int, device):
    soup = scene_faces(scene, dtype=dtype, device=device)
    vertices = soup.vertices.detach().requires_grad_()
    albedo = soup.albedo.detach().requires_grad_()
    image = render_faces(vertices[soup.faces], albedo, scene.cameras, scene.render, scene.lights, backend=backend)
    generator = torch.Generator().manual_seed(projection_seed)
    projection = torch.randn(image.shape, generator=generator, dtype=dtype).to(device)
    vertex_grad, color_grad = torch.autograd.grad((image * projection).sum(), (vertices, albedo), allow_unused=True)
    return tuple(t.cpu() for t in (image.detach(), _or_zeros(vertex_grad, vertices), _or_zeros(color_grad, albedo)))


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def compare_backends(
    scene: Scene, backend: str = "cpu", *, dtype: torch.dtype = torch.float64, seed: int = 0
) -> list[Comparison]:
    """Compares ``backend`` with the reference on ``scene``: image, dL/dvertices, dL/dcolors.
    Both run on the device ``backend`` prefers (the GPU for ``cuda``)."""
    device = preferred_device(backend)
    backend = resolve_backend(backend, device)
    forward_tol, grad_tol = TOLERANCES[dtype]
    tested = _render_and_differentiate(scene, backend, dtype, seed, device)
    reference = _render_and_differentiate(scene, "reference", dtype, seed, device)
    rows = []
    for quantity, got, want, tolerance, measure in zip(
        ("image", "dL/dvertices", "dL/dcolors"),
        tested,
        reference,
        (forward_tol, grad_tol, grad_tol),
        ("abs", "rel", "rel"),
    ):
        max_abs = (got - want).abs().max().item() if want.numel() else 0.0
        scale = want.abs().max().item() if want.numel() else 0.0
        rows.append(Comparison(quantity, max_abs, max_abs / scale if scale > 0 else max_abs, tolerance, measure))
    return rows
