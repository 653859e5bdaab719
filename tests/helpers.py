"""Helpers shared by test modules: one rasterizer case, run on a backend and compared; an
independent hard rasterizer."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from microdr.raster import SoftRasSettings, rasterize
from microdr.raster.cpu import LANES_VARIABLE
from microdr.raster.cuda import CudaTarget

#: The CPU kernels' lane widths the kernel tests run: the native one (a SIMD vector of adjacent
#: pixels per work item) and the GPU's (one pixel per work item), as pytest params.
LANE_SHAPES = [pytest.param(None, id="native lanes"), pytest.param(CudaTarget.lanes, id="gpu shape")]


@dataclasses.dataclass
class Case:
    verts: torch.Tensor  # (B, F, 3, 3) float64
    attrs: torch.Tensor  # (B, F, 3, C) float64
    width: int
    height: int
    settings: SoftRasSettings


@contextlib.contextmanager
def cpu_lanes(lanes: int | None):
    """Within the block, ``backend="cpu"`` runs the CPU kernels built with ``lanes`` adjacent
    pixels per work item (``None``: the native width), through ``MICRODR_CPU_LANES``."""
    saved = os.environ.get(LANES_VARIABLE)
    os.environ[LANES_VARIABLE] = "" if lanes is None else str(lanes)
    try:
        yield
    finally:
        if saved is None:
            del os.environ[LANES_VARIABLE]
        else:
            os.environ[LANES_VARIABLE] = saved


def run(case: Case, backend: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Image and gradients of a fixed random projection of it."""
    # Copies: `to` returns the case's own tensor when nothing changes, and two runs of one case
    # would then accumulate into (and return) the same .grad.
    verts = case.verts.to(dtype=dtype, device=device, copy=True).requires_grad_()
    attrs = case.attrs.to(dtype=dtype, device=device, copy=True).requires_grad_()
    image = rasterize(verts, attrs, case.width, case.height, case.settings, backend=backend)
    projection = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (image * projection.to(dtype=dtype, device=device)).sum().backward()
    return image.detach().cpu(), verts.grad.cpu(), attrs.grad.cpu()


def assert_matches(got, want, forward_atol, grad_rtol):
    """``got`` and ``want`` (image, gradients...) agree: the image within ``forward_atol``,
    each gradient within ``grad_rtol`` of the reference gradient's largest magnitude."""
    image, *grads = got
    ref_image, *ref_grads = want
    assert all(torch.isfinite(t).all() for t in got)
    assert (image.double() - ref_image).abs().max().item() <= forward_atol
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.shape == ref.shape
        if ref.numel() == 0:  # no attribute channels
            continue
        scale = ref.abs().max().item()
        assert (grad.double() - ref).abs().max().item() <= grad_rtol * max(scale, 1e-30)


def numpy_hard_silhouettes(corners: np.ndarray, cameras, width: int, height: int) -> np.ndarray:
    """``(N, H, W)`` bool: pixel centers strictly inside a triangle's projection (either winding),
    for look-at perspective cameras (vertical ``fov``, image height spanning 2 screen units)."""
    rows, cols = np.mgrid[0:height, 0:width]
    px = (2 * cols + 1 - width) / height
    py = (height - 2 * rows - 1) / height
    images = []
    for camera in cameras:
        eye, target, up = (np.asarray(v, float) for v in (camera.eye, camera.target, camera.up))
        forward = (target - eye) / np.linalg.norm(target - eye)
        right = np.cross(forward, up)
        right /= np.linalg.norm(right)
        true_up = np.cross(right, forward)
        offset = corners - eye
        depth = offset @ forward
        focal = 1 / math.tan(math.radians(camera.fov) / 2)
        sx, sy = focal * (offset @ right) / depth, focal * (offset @ true_up) / depth
        covered = np.zeros((height, width), bool)
        for (x0, x1, x2), (y0, y1, y2), z in zip(sx, sy, depth):
            if not (z > camera.near).all():
                continue

            def edge(ax, ay, bx, by):
                return (bx - ax) * (py - ay) - (by - ay) * (px - ax)

            w = edge(x1, y1, x2, y2), edge(x2, y2, x0, y0), edge(x0, y0, x1, y1)
            covered |= (w[0] > 0) & (w[1] > 0) & (w[2] > 0)
            covered |= (w[0] < 0) & (w[1] < 0) & (w[2] < 0)
        images.append(covered)
    return np.stack(images)
