"""Helpers shared by test modules: one rasterizer case, run on a backend and compared."""

from __future__ import annotations

import dataclasses

import torch

from microdr.raster import SoftRasSettings, rasterize


@dataclasses.dataclass
class Case:
    verts: torch.Tensor  # (B, F, 3, 3) float64
    attrs: torch.Tensor  # (B, F, 3, C) float64
    width: int
    height: int
    settings: SoftRasSettings


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
