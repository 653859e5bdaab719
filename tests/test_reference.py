"""The reference rasterizer against closed forms, finite differences and camera conventions."""

from __future__ import annotations

import pathlib

import pytest
import torch

from microdr.conventions import pixel_centers
from microdr.raster import SoftRasSettings, rasterize
from microdr.render import render_faces, scene_faces
from microdr.io.scene import parse_scene

F64 = torch.float64
# The cut-off makes D jump from eps_d to 0: a step that finite differences would see as a huge
# slope. Gradient checks push it far below their tolerance.
NO_CUTOFF = 1e-14


def faces(*triangles, depth=2.0):
    """(1, F, 3, 3) from screen-space triangles given as 3 (x, y) corners, all at one depth."""
    verts = torch.tensor(triangles, dtype=F64)
    z = torch.full(verts.shape[:-1] + (1,), depth, dtype=F64)
    return torch.cat([verts, z], dim=-1)[None]


def uniform(face_verts, *color):
    """Per-corner attributes (1, F, 3, C) giving every corner the same color."""
    return torch.tensor(color, dtype=F64).expand(*face_verts.shape[:3], len(color)).clone()


def test_pixel_centers_follow_model_md():
    centers = pixel_centers(4, 6, dtype=F64)
    # x = a * ((2c + 1) / W - 1) with a = W / H; y = 1 - (2r + 1) / H.
    assert centers[0, 0].tolist() == pytest.approx([1.5 * (1 / 6 - 1), 1 - 1 / 4])
    assert centers[3, 5].tolist() == pytest.approx([1.5 * (11 / 6 - 1), 1 - 7 / 4])


def test_pixel_center_on_an_edge_has_half_coverage():
    # Column 2 of a 4-wide image has its centers at x = 0.25: exactly on the vertical edge.
    v = faces([(0.25, -3.0), (5.0, 0.0), (0.25, 3.0)])
    image = rasterize(v, uniform(v, 1.0), 4, 4, SoftRasSettings(sigma=1e-2), backend="reference")
    assert torch.allclose(image[0, 1, :, 2], torch.full((4,), 0.5, dtype=F64), atol=1e-12)
    assert (image[0, 1, :, 3] > 0.5).all() and (image[0, 1, :, 1] < 0.5).all()


def square(x0, x1, y0, y1):
    return faces([(x0, y0), (x1, y0), (x1, y1)], [(x0, y0), (x1, y1), (x0, y1)])


def test_square_silhouette_converges_to_hard_coverage():
    v = square(-0.5, 0.5, -0.4, 0.3)
    centers = pixel_centers(8, 8, dtype=F64)
    hard = ((centers[..., 0].abs() < 0.5) & (centers[..., 1] > -0.4) & (centers[..., 1] < 0.3)).to(F64)
    errors = []
    for sigma in (1e-2, 1e-3, 1e-4, 1e-6):
        alpha = rasterize(v, uniform(v, 1.0), 8, 8, SoftRasSettings(sigma=sigma), backend="reference")[0, 1]
        errors.append((alpha - hard).abs().max().item())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-12 and errors[0] > 0.1


def test_inside_a_large_face_the_color_is_the_face_color():
    v = faces([(-9.0, -9.0), (9.0, -9.0), (0.0, 9.0)])
    image = rasterize(v, uniform(v, 0.2, 0.5, 0.9), 16, 12, SoftRasSettings(background=(1.0, 0.0, 0.0)),
                      backend="reference")
    expected = torch.tensor([0.2, 0.5, 0.9, 1.0], dtype=F64)[:, None, None]
    assert torch.allclose(image[0], expected.expand(4, 12, 16), atol=1e-12)


def test_perspective_correct_interpolation():
    # With each corner's attribute equal to its depth z_k, C = sum_k (b_k / z_k) z_k / s = 1 / s,
    # with s = sum_k b_k / z_k affine in screen space: C is the reciprocal of an affine function.
    corners = torch.tensor([[[-3.0, -3.0, 1.0], [3.0, -3.0, 4.0], [0.0, 3.0, 2.0]]], dtype=F64)[None]
    depth = corners[..., 2:]
    image = rasterize(corners, depth, 8, 8, SoftRasSettings(), backend="reference")[0, 0]
    centers = pixel_centers(8, 8, dtype=F64)
    system = torch.cat([corners[0, 0, :, :2], torch.ones(3, 1, dtype=F64)], dim=1)
    coefficients = torch.linalg.solve(system, 1.0 / depth[0, 0, :, 0])
    inverse = centers[..., 0] * coefficients[0] + centers[..., 1] * coefficients[1] + coefficients[2]
    assert torch.allclose(image, 1.0 / inverse, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_geometry_gives_background_and_zero_alpha(backend):
    v = torch.zeros(2, 0, 3, 3, dtype=F64)
    image = rasterize(v, torch.zeros(2, 0, 3, 3, dtype=F64), 5, 3, SoftRasSettings(background=(0.1, 0.2, 0.3)),
                      backend=backend)
    assert image.shape == (2, 4, 3, 5)
    assert torch.equal(image[:, :3], torch.tensor([0.1, 0.2, 0.3], dtype=F64)[None, :, None, None].expand(2, 3, 3, 5))
    assert torch.equal(image[:, 3], torch.zeros(2, 3, 5, dtype=F64))


def test_nearer_face_wins_as_gamma_goes_to_zero():
    big = [(-3.0, -3.0), (3.0, -3.0), (0.0, 3.0)]
    v = torch.cat([faces(big, depth=2.0), faces(big, depth=2.5)], dim=1)
    colors = torch.cat([uniform(v[:, :1], 1.0, 0.0, 0.0), uniform(v[:, 1:], 0.0, 0.0, 1.0)], dim=1)
    red = []
    for gamma in (1.0, 1e-1, 1e-2, 1e-3, 1e-4):
        image = rasterize(v, colors, 4, 4, SoftRasSettings(gamma=gamma), backend="reference")
        red.append(image[0, 0, 2, 2].item())
    assert red == sorted(red) and red[0] < 0.6 and red[-1] > 1 - 1e-9


def camera_scene(points_of_interest: str) -> dict:
    return {
        "image": {"width": 32, "height": 24},
        "render": {"sigma": 1e-4},
        "meshes": [{"primitive": "icosphere", "subdivisions": 1,
                    "transform": {"translate": [0.0, 0.0, 0.0], "scale": 0.3}, "color": [1, 1, 1]}],
        "cameras": [{"eye": [0, 0, 5], "fov": 40, "projection": points_of_interest}],
    }


@pytest.mark.parametrize("projection", ["perspective", "orthographic"])
@pytest.mark.parametrize("offset, where", [((1.0, 0.0), "right"), ((-1.0, 0.0), "left"),
                                           ((0.0, 1.0), "top"), ((0.0, -1.0), "bottom")])
def test_camera_conventions(projection, offset, where):
    data = camera_scene(projection)
    data["meshes"][0]["transform"]["translate"] = [offset[0], offset[1], 0.0]
    if projection == "orthographic":
        data["cameras"][0].pop("fov")
        data["cameras"][0]["half_height"] = 2.0
    scene = parse_scene(data, "conventions.json", pathlib.Path("."))
    soup = scene_faces(scene, dtype=F64)
    alpha = render_faces(soup.corners, soup.albedo, scene.cameras, scene.render, None, backend="reference")[0, 3]
    rows, cols = torch.nonzero(alpha > 0.5, as_tuple=True)
    assert len(rows) > 0
    row, col = rows.double().mean().item(), cols.double().mean().item()
    center_row, center_col = (24 - 1) / 2, (32 - 1) / 2
    side = {"right": col > center_col + 3, "left": col < center_col - 3,
            "top": row < center_row - 3, "bottom": row > center_row + 3}
    assert side[where], (row, col)


def small_triangles(seed=0, batch=1, count=4, dtype=F64):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(batch, count, 1, 2, generator=generator, dtype=dtype) * 1.2 - 0.6
    corners = centers + (torch.rand(batch, count, 3, 2, generator=generator, dtype=dtype) - 0.5) * 0.9
    depth = 1.5 + torch.rand(batch, count, 3, 1, generator=generator, dtype=dtype) * 2
    attrs = torch.rand(batch, count, 3, 3, generator=generator, dtype=dtype)
    return torch.cat([corners, depth], dim=-1), attrs


@pytest.mark.parametrize("perspective", [True, False])
def test_gradcheck_rasterize_reference(perspective):
    verts, attrs = small_triangles()
    settings = SoftRasSettings(sigma=2e-2, gamma=5e-2, eps_d=NO_CUTOFF, perspective=perspective, background=(0.3,))
    torch.autograd.gradcheck(
        lambda v, c: rasterize(v, c, 7, 6, settings, backend="reference"),
        (verts.requires_grad_(), attrs.requires_grad_()),
    )


def test_finite_differences_anchor_the_reference():
    # An explicit central difference on one corner coordinate, independent of gradcheck.
    verts, attrs = small_triangles(seed=3, count=2)
    settings = SoftRasSettings(sigma=3e-2, gamma=5e-2, eps_d=NO_CUTOFF)
    weights = torch.rand(1, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)

    def loss(v):
        return (rasterize(v, attrs, 6, 6, settings, backend="reference") * weights).sum()

    v = verts.clone().requires_grad_()
    (analytic,) = torch.autograd.grad(loss(v), v)
    h = 1e-6
    for index in [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 2, 0), (0, 1, 0, 2)]:
        bumped_up, bumped_down = verts.clone(), verts.clone()
        bumped_up[index] += h
        bumped_down[index] -= h
        numeric = (loss(bumped_up) - loss(bumped_down)) / (2 * h)
        assert analytic[index].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-8)


def test_gradcheck_whole_render_wrt_vertices_colors_and_camera_eye():
    from microdr.view.camera import CameraTensors

    data = {
        "image": {"width": 8, "height": 7},
        "render": {"sigma": 3e-2, "gamma": 5e-2, "eps_d": NO_CUTOFF},
        "meshes": [{"primitive": "icosphere", "subdivisions": 0, "transform": {"scale": 0.8}}],
        "cameras": [{"orbit": {"distance": 3, "elevation": 20, "azimuth": 30}, "fov": 50}],
        # Not perpendicular to any face of the icosahedron: max(0, n . l) has a kink there.
        "lights": {"ambient": 0.3, "directional": [{"direction": [0.2, 1, 0.5], "intensity": 0.7}]},
    }
    scene = parse_scene(data, "gradcheck.json", pathlib.Path("."))
    soup = scene_faces(scene, dtype=F64)
    camera = scene.cameras[0]
    pose = CameraTensors.of(camera, dtype=F64)

    def render(vertices, albedo, eye):
        poses = [CameraTensors(eye, pose.target, pose.up)]
        return render_faces(vertices[soup.faces], albedo, scene.cameras, scene.render, scene.lights,
                            poses=poses, backend="reference")

    torch.autograd.gradcheck(
        render,
        (soup.vertices.clone().requires_grad_(), soup.albedo.clone().requires_grad_(),
         pose.eye.clone().requires_grad_()),
    )
