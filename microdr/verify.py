"""Gradient checks: a kernel backend against the reference, on a whole scene.

Both render the scene; a fixed random projection of the image, ``L = sum(R * image)``, is
differentiated w.r.t. the vertices and the colors, and the forward values and the gradients are
compared. Errors are reported absolute and relative to the reference's largest magnitude.
The reference always runs in float64, so a float32 check measures the float32 kernels' own
rounding against (nearly) exact values, with a tolerance derived from float32's epsilon
(:func:`tolerances`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .io.scene import RenderSettings, Scene
from .raster import preferred_device, resolve_backend
from .render import render_faces, scene_faces


def condition(render: RenderSettings) -> float:
    """kappa: how much an absolute error in ``zhat`` or in a screen coordinate can change the
    logarithm of a blend weight ``w_ij = D_ij exp((zhat_ij - m_i) / gamma)`` (MODEL.md).

    - depth: ``d log w / d zhat = 1 / gamma``;
    - distance: ``d log D / d p = (1 - D) 2 |r| / sigma`` (``r`` from the nearest boundary point
      to ``p``, ``d = |r|^2``). Outside, ``1 - D < 1`` and ``|r|^2 <= sigma ln(1/eps_d - 1)``,
      the cut-off; inside, ``(1 - D) |r| <= exp(-|r|^2 / sigma) |r| < sqrt(sigma)``. So it is at
      most ``2 max(sqrt(ln(1/eps_d - 1)), 1) / sqrt(sigma)``.
    """
    reach = math.sqrt(max(math.log(1.0 / render.eps_d - 1.0), 1.0))
    return 1.0 / render.gamma + 2.0 * reach / math.sqrt(render.sigma)


#: The gradients' tolerance over the image's: see :func:`tolerances`.
GRADIENT_CANCELLATION = 8


def tolerances(dtype: torch.dtype, render: RenderSettings) -> tuple[float, float]:
    """The tolerances of kernels in ``dtype`` against the float64 reference: the image's
    (absolute) ``eps * kappa`` and the gradients' (relative to the reference's largest
    magnitude) ``8 eps * kappa``.

    Why: every input of the blend (screen coordinates of order 1, ``zhat`` in [0, 1]) carries a
    rounding error of a few ulps, ``~eps``; :func:`condition` turns it into a relative error of
    at most ``eps * kappa`` in each weight, and the image ``I_i = sum_j w_ij C_ij / W_i`` moves
    by that times a color difference (at most ~1). A gradient is a sum of per-pair terms with
    that relative error, but the terms cancel: with one flat color, ``C_ij - I_i`` inside the
    surface is zero but for the image's rounding, and ``dL/dzhat = gI.(C_ij - I_i) w_ij /
    (W_i gamma)`` turns that into noise summed over every pixel of a vertex's faces, while the
    true gradient comes from the silhouette's pixels alone. :data:`GRADIENT_CANCELLATION`
    allows for that; the bundled scenes need up to 3.5 (scenes/tasks/shape_color.json, float32).
    With the defaults (sigma = gamma = 1e-4, eps_d = 1e-4), kappa = 1.06e4: the image's
    tolerance is 1.3e-3 in float32 (eps = 1.2e-7) and 2.4e-12 in float64 (eps = 2.2e-16).
    """
    image = torch.finfo(dtype).eps * condition(render)
    return image, GRADIENT_CANCELLATION * image


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


#: ``progress(backend, cameras_done, cameras)``, called after each camera's render and gradients.
Progress = Callable[[str, int, int], None]


def _render_and_differentiate(
    scene: Scene, backend: str, dtype: torch.dtype, projection_seed: int, device, progress: Progress | None
):
    """Image ``(N, 4, H, W)`` and ``dL/dvertices``, ``dL/dcolors`` of ``L = sum(R * image)``, one
    camera at a time (memory holds one camera's graph), all on the CPU in ``dtype``."""
    soup = scene_faces(scene, dtype=dtype, device=device)
    vertices = soup.vertices.detach().requires_grad_()
    albedo = soup.albedo.detach().requires_grad_()
    shape = (len(scene.cameras), 4, scene.render.height, scene.render.width)
    generator = torch.Generator().manual_seed(projection_seed)
    # Drawn in float64 for every dtype, so that both sides differentiate the same L.
    projection = torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype)
    images, vertex_grad, color_grad = [], torch.zeros_like(vertices), torch.zeros_like(albedo)
    for index, camera in enumerate(scene.cameras):
        image = render_faces(vertices[soup.faces], albedo, [camera], scene.render, scene.lights, backend=backend)
        grads = torch.autograd.grad((image * projection[index]).sum(), (vertices, albedo), allow_unused=True)
        vertex_grad += _or_zeros(grads[0], vertices)
        color_grad += _or_zeros(grads[1], albedo)
        images.append(image.detach())
        if progress is not None:
            progress(backend, index + 1, len(scene.cameras))
    return tuple(t.cpu() for t in (torch.cat(images), vertex_grad, color_grad))


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def compare_backends(
    scene: Scene,
    backend: str = "cpu",
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Comparison]:
    """Compares ``backend`` in ``dtype`` with the float64 reference on ``scene``: image,
    dL/dvertices, dL/dcolors, each within :func:`tolerances`. Both run on the device ``backend``
    prefers (the GPU for ``cuda``)."""
    device = preferred_device(backend)
    backend = resolve_backend(backend, device)
    image_tol, grad_tol = tolerances(dtype, scene.render)
    tested = _render_and_differentiate(scene, backend, dtype, seed, device, progress)
    reference = _render_and_differentiate(scene, "reference", torch.float64, seed, device, progress)
    rows = []
    for quantity, got, want, allowed, measure in zip(
        ("image", "dL/dvertices", "dL/dcolors"),
        tested,
        reference,
        (image_tol, grad_tol, grad_tol),
        ("abs", "rel", "rel"),
    ):
        max_abs = (got.double() - want).abs().max().item() if want.numel() else 0.0
        scale = want.abs().max().item() if want.numel() else 0.0
        rows.append(Comparison(quantity, max_abs, max_abs / scale if scale > 0 else max_abs, allowed, measure))
    return rows
