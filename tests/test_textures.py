"""Textures: bilinear sampling's conventions, the textured kernels against the reference (both
dtypes, both lane shapes), their texel gradients against finite differences, and determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from microdr.raster import SoftRasSettings, rasterize
from microdr.raster.kernels import MAX_TEXEL_SLOTS, too_many_slots
from microdr.raster.texture import sample_bilinear

from helpers import LANE_SHAPES, assert_matches, cpu_lanes

F32, F64 = torch.float32, torch.float64


# ---------------------------------------------------------------------------------------------
# Sampling conventions, checked on values written out by hand.

TEXTURE = torch.tensor([[[0.0], [1.0], [2.0]], [[3.0], [4.0], [5.0]]], dtype=F64)  # 2 rows, 3 columns


def sample(u, v, wrap=True):
    return sample_bilinear(TEXTURE, torch.tensor([u, v], dtype=F64), wrap).item()


def test_texel_centers_are_at_half_texels_and_v_points_up():
    # Row 0 is the image's top: OBJ's v = 1 side. Texel (row r, column c) has its center at
    # u = (c + 1/2) / 3, v = 1 - (r + 1/2) / 2.
    for row in range(2):
        for col in range(3):
            assert sample((col + 0.5) / 3, 1 - (row + 0.5) / 2) == pytest.approx(3 * row + col)
    assert sample(1 / 3, 0.75) == pytest.approx(0.5)  # halfway between columns 0 and 1 of row 0
    assert sample(0.5, 0.5) == pytest.approx((1 + 4) / 2)  # halfway between rows 0 and 1


def test_wrap_blends_across_the_edge_and_clamp_holds_the_edge_texel():
    # u = 0: halfway between the last column and the first (wrap), or the first column (clamp).
    assert sample(0.0, 0.75) == pytest.approx((2 + 0) / 2)
    assert sample(0.0, 0.75, wrap=False) == pytest.approx(0.0)
    assert sample(1.0 + 0.5 / 3, 0.75) == pytest.approx(0.0)  # a whole turn on: column 0 again
    assert sample(7.5, 0.25, wrap=False) == pytest.approx(5.0)
    assert sample(-3.0, -2.0, wrap=False) == pytest.approx(3.0)  # bottom-left texel


# ---------------------------------------------------------------------------------------------
# Kernels against the reference.


@dataclasses.dataclass
class TexturedCase:
    verts: torch.Tensor  # (B, F, 3, 3) float64
    uvs: torch.Tensor  # (B, F, 3, 2)
    texture: torch.Tensor  # (Ht, Wt, C)
    width: int
    height: int
    settings: SoftRasSettings


def make_case(name: str) -> TexturedCase:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    settings = SoftRasSettings(sigma=1e-3, gamma=1e-2, background=(0.2, 0.4, 0.6))
    batch, faces, channels, size, texture_size = 1, 40, 3, (24, 24), (5, 7)
    if name == "clamped":
        settings = dataclasses.replace(settings, texture_wrap=False)
    elif name == "batch, one channel, non-square":
        batch, channels, size = 2, 1, (31, 17)
        settings = dataclasses.replace(settings, background=(0.5,))
    elif name == "orthographic":
        settings = dataclasses.replace(settings, perspective=False)
    elif name == "fine texture":  # more texels than pixels: most get no gradient
        texture_size = (64, 48)
    elif name == "one row of two texels":
        texture_size = (1, 2)
    centers = (torch.rand(batch, faces, 1, 2, generator=g, dtype=F64) * 2 - 1) * 1.2
    corners = centers + (torch.rand(batch, faces, 3, 2, generator=g, dtype=F64) - 0.5) * 0.5
    z = 1.5 + torch.rand(batch, faces, 3, 1, generator=g, dtype=F64) * 2.5
    uvs = torch.rand(batch, faces, 3, 2, generator=g, dtype=F64) * 3 - 1  # past [0, 1]: wrap and clamp
    texture = torch.rand(*texture_size, channels, generator=g, dtype=F64)
    return TexturedCase(torch.cat([corners, z], dim=-1), uvs, texture, *size, settings)


CASES = ["wrapped", "clamped", "batch, one channel, non-square", "orthographic", "fine texture", "one row of two texels"]


def run(case: TexturedCase, backend: str, dtype: torch.dtype, seed: int = 0):
    """Image and the gradients (vertices, texture coordinates, texture) of a fixed random
    projection of it."""
    inputs = [t.to(dtype=dtype, copy=True).requires_grad_() for t in (case.verts, case.uvs, case.texture)]
    image = rasterize(inputs[0], inputs[1], case.width, case.height, case.settings, backend=backend,
                      texture=inputs[2])
    projection = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    (image * projection.to(dtype)).sum().backward()
    return image.detach(), *(t.grad for t in inputs)


@pytest.fixture(params=LANE_SHAPES)
def lanes(request):
    with cpu_lanes(request.param):
        yield request.param


@pytest.fixture(scope="module")
def reference_results():
    return {name: run(make_case(name), "reference", F64) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_textured_kernels_match_reference(name, reference_results, lanes):
    case = make_case(name)
    assert_matches(run(case, "cpu", F64), reference_results[name], 1e-10, 1e-8)
    # float32 rounds uv_ij by ~1e-7, which moves the sample by that times the texture's side in
    # texels: the tolerances grow with it (measured: at most 2.2e-6 and 8.6e-6 times the side).
    side = max(case.texture.shape[:2])
    assert_matches(run(case, "cpu", F32), reference_results[name], 1e-5 * side, 1e-4 * side)


def test_the_cases_draw_the_texture():
    # Guards the suite: each case draws faces, and its texture gradient is not all zero.
    for name in CASES:
        image, _, _, grad_texture = run(make_case(name), "reference", F64)
        assert image[:, -1].max() > 0.5 and grad_texture.abs().max() > 0, name


def test_gradcheck_textured_kernels(lanes):
    # The hand-written backward (texels, texture coordinates and vertices) against finite
    # differences of the kernels' own forward; the cut-off is pushed below the tolerance.
    case = make_case("wrapped")
    settings = SoftRasSettings(sigma=2e-2, gamma=5e-2, eps_d=1e-14, background=(0.3,))
    inputs = (case.verts[:, :6].clone(), case.uvs[:, :6].clone(), case.texture[:3, :4].clone())
    torch.autograd.gradcheck(
        lambda v, uv, t: rasterize(v, uv, 7, 6, settings, backend="cpu", texture=t),
        tuple(t.requires_grad_() for t in inputs),
    )


def test_textured_kernels_are_deterministic_across_thread_counts(lanes):
    case = make_case("fine texture")
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run(case, "cpu", F32))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_too_many_texel_slots_are_refused_with_their_memory():
    assert too_many_slots(MAX_TEXEL_SLOTS, 3, 4) is None
    message = too_many_slots(MAX_TEXEL_SLOTS + 4, 3, 4)
    # 24 bytes a slot in float32 RGB: the key, the sorted index, three values.
    assert f"{(MAX_TEXEL_SLOTS + 4) * 24 / 2**30:.1f} GiB" in message
