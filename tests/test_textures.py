"""Textures: bilinear sampling's conventions, the textured kernels against the reference (both
dtypes, both lane shapes), their texel gradients against finite differences, and determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from microdr.raster import SoftRasSettings, rasterize
from microdr.raster.kernels import MAX_TEXEL_PAIRS, too_many_texel_pairs
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
    batch, faces, channels, size, texture_size, spread_size = 1, 40, 3, (24, 24), (5, 7), 0.5
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
    elif name == "faces of many backward chunks":  # boxes of hundreds of pixels, chunks of 64
        faces, spread_size = 12, 3.0
    centers = (torch.rand(batch, faces, 1, 2, generator=g, dtype=F64) * 2 - 1) * 1.2
    corners = centers + (torch.rand(batch, faces, 3, 2, generator=g, dtype=F64) - 0.5) * spread_size
    z = 1.5 + torch.rand(batch, faces, 3, 1, generator=g, dtype=F64) * 2.5
    uvs = torch.rand(batch, faces, 3, 2, generator=g, dtype=F64) * 3 - 1  # past [0, 1]: wrap and clamp
    texture = torch.rand(*texture_size, channels, generator=g, dtype=F64)
    return TexturedCase(torch.cat([corners, z], dim=-1), uvs, texture, *size, settings)


CASES = ["wrapped", "clamped", "batch, one channel, non-square", "orthographic", "fine texture", "one row of two texels",
         "faces of many backward chunks"]


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


def test_too_many_texel_pair_records_are_refused_with_their_memory():
    assert too_many_texel_pairs(MAX_TEXEL_PAIRS, 3, 4) is None
    message = too_many_texel_pairs(MAX_TEXEL_PAIRS + 1, 3, 4)
    # 36 bytes a record in float32 RGB: the footprint's 4 texel rows and columns, 5 values.
    assert f"{(MAX_TEXEL_PAIRS + 1) * 36 / 2**30:.1f} GiB" in message


# ---------------------------------------------------------------------------------------------
# OBJ and MTL files, scenes, the optimizer and its outputs.

import json  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from microdr.errors import InputError  # noqa: E402
from microdr.optimize.losses import psnr  # noqa: E402
from microdr.io.materials import textured_obj_files  # noqa: E402
from microdr.io.mesh import load_obj  # noqa: E402
from microdr.optimize.loop import optimize  # noqa: E402
from microdr.render import render_scene  # noqa: E402
from microdr.io.scene import load_scene, parse_scene  # noqa: E402
from microdr.io.targets import Targets  # noqa: E402

#: A 2 x 3 RGB texture, 8-bit, row 0 on top.
PIXELS = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[10, 20, 30], [40, 50, 60], [70, 80, 90]]], np.uint8)

#: A square of two triangles facing +z: v/vt corners, then v/vt/vn, the texture's whole [0, 1]^2.
SQUARE = (
    "mtllib square.mtl\nv -1 -1 0\nv 1 -1 0\nv 1 1 0\nv -1 1 0\n"
    "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nvn 0 0 1\nusemtl painted\nf 1/1 2/2 3/3\nf 1/1/1 3/3/1 4/4/1\n"
)


def write_square(folder, obj=SQUARE, mtl="newmtl painted\nKd 1 1 1\nmap_Kd -clamp on painted.png\n"):
    Image.fromarray(PIXELS).save(folder / "painted.png")
    (folder / "square.mtl").write_text(mtl)
    (folder / "square.obj").write_text(obj)
    return folder / "square.obj"


def test_obj_texture_coordinates_and_mtl_texture_are_read(tmp_path):
    mesh = load_obj(write_square(tmp_path))
    assert mesh.face_uvs.tolist() == [[[0, 0], [1, 0], [1, 1]], [[0, 0], [1, 1], [0, 1]]]
    assert torch.equal(mesh.texture.image, torch.from_numpy(PIXELS).float() / 255)
    assert mesh.texture.wrap is False  # -clamp on


def test_without_usemtl_the_librarys_material_is_used_and_wraps_by_default(tmp_path):
    path = write_square(tmp_path, SQUARE.replace("usemtl painted\n", ""), "newmtl painted\nmap_Kd painted.png\n")
    assert load_obj(path).texture.wrap is True


def test_a_material_library_without_map_kd_keeps_the_uvs_and_gives_no_texture(tmp_path):
    mesh = load_obj(write_square(tmp_path, mtl="newmtl painted\nKd 1 0 0\n"))
    assert mesh.texture is None and mesh.face_uvs.shape == (2, 3, 2)


@pytest.mark.parametrize("obj, mtl, where, message", [
    (SQUARE.replace("mtllib square.mtl", "mtllib missing.mtl"), None, "square.obj: line 1",
     "material library 'missing.mtl'"),
    (SQUARE.replace("usemtl painted", "usemtl other"), None, "square.obj: line 11", 'material "other" is in no'),
    (SQUARE.replace("f 1/1/1 3/3/1 4/4/1", "f 1 3 4"), None, "square.obj: line 13", "without texture coordinates"),
    (SQUARE, "newmtl painted\nmap_Kd -o 0.5 painted.png\n", "square.mtl: line 2", "map_Kd option '-o'"),
    (SQUARE, "newmtl painted\nmap_Kd nowhere.png\n", "square.mtl: line 2", "map_Kd 'nowhere.png'"),
])  # fmt: skip
def test_bad_materials_name_the_file_and_line(tmp_path, obj, mtl, where, message):
    path = write_square(tmp_path, obj) if mtl is None else write_square(tmp_path, obj, mtl)
    with pytest.raises(InputError) as error:
        load_obj(path)
    text = str(error.value).replace('"', "'")
    assert where in text and message.replace('"', "'") in text and "\n" not in text


def square_scene(folder, **extra):
    data = {
        "image": {"width": 24, "height": 24},
        "render": {"sigma": 1e-5},
        "meshes": [{"file": "square.obj"}],
        "cameras": [{"eye": [0, 0, 3], "target": [0, 0, 0], "fov": 60}],
        **extra,
    }
    (folder / "scene.json").write_text(json.dumps(data))
    return folder / "scene.json"


def test_a_scene_draws_the_texture_as_the_image_shows_it(tmp_path):
    write_square(tmp_path)
    image = render_scene(load_scene(square_scene(tmp_path)), backend="cpu")[0]
    # The square spans x, y in [-1, 1]; at the camera's 60 degrees it is 2 / (2 tan 30 * 3) of
    # the view, centered. Its top-left quarter shows the texture's top-left texel (red) and its
    # bottom-right quarter the bottom-right one, as the PNG shows them.
    top_left, bottom_right = image[:3, 7, 7], image[:3, 16, 16]
    torch.testing.assert_close(top_left, torch.tensor([1.0, 0, 0]), atol=0.05, rtol=0)
    torch.testing.assert_close(bottom_right, torch.tensor([70, 80, 90]) / 255, atol=0.05, rtol=0)


def test_textured_meshes_are_unlit_and_alone(tmp_path):
    write_square(tmp_path)
    with pytest.raises(InputError, match="lights do not shade textured meshes"):
        load_scene(square_scene(tmp_path, lights={"ambient": 0.5}))
    with pytest.raises(InputError, match="must be the scene's only one"):
        load_scene(square_scene(tmp_path, meshes=[{"file": "square.obj"}, {"primitive": "cube"}]))
    # A color given draws the mesh in it instead.
    scene = load_scene(square_scene(tmp_path, meshes=[{"file": "square.obj", "color": [0, 0, 1]}]))
    assert scene.meshes[0].texture is None


def test_written_textured_obj_reads_back_and_renders_the_same(tmp_path):
    write_square(tmp_path)
    scene = load_scene(square_scene(tmp_path))
    mesh = scene.meshes[0].mesh
    out = tmp_path / "out"
    out.mkdir()
    for name, data in textured_obj_files(mesh, "mesh.obj", "texture.png").items():
        (out / name).write_bytes(data)
    assert "map_Kd -clamp on texture.png" in (out / "mesh.mtl").read_text()
    again = load_obj(out / "mesh.obj")
    assert torch.equal(again.face_uvs, mesh.face_uvs) and torch.equal(again.texture.image, mesh.texture.image)
    (out / "scene.json").write_text((tmp_path / "scene.json").read_text().replace("square.obj", "mesh.obj"))
    assert torch.equal(render_scene(load_scene(out / "scene.json"), backend="cpu"),
                       render_scene(scene, backend="cpu"))


def test_psnr_inside_a_mask_counts_only_its_pixels():
    rgb, target = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    rgb[0, :, 0, 0] = 0.1  # inside: squared error 0.01 on each channel
    rgb[0, :, 1, 1] = 0.5  # outside the mask
    mask = torch.tensor([[[True, True], [False, False]]])
    # Mean over 2 pixels x 3 channels of (0.01, 0.01, 0.01, 0, 0, 0): 0.005.
    assert psnr(rgb, target, mask).item() == pytest.approx(-10 * np.log10(0.005), rel=1e-6)


def test_a_free_texture_starts_gray_and_fits_its_targets(tmp_path):
    write_square(tmp_path)
    truth = load_scene(square_scene(tmp_path))
    targets = Targets.from_images(render_scene(truth, backend="cpu").clamp(0, 1))
    optimize_section = {"parameters": ["texture"], "texture_resolution": [6, 4], "lr": 0.2,
                        "loss": {"rgb_l2": 1, "texture_smoothness": 0.001}, "iterations": 40}
    scene = load_scene(square_scene(tmp_path, optimize=optimize_section))
    result = optimize(scene, targets, outdir=tmp_path / "run", backend="cpu")
    # The start: gray everywhere inside the square; the end: near the targets.
    assert torch.allclose(result.start_images[0, :3, 12, 12], torch.tensor(0.5), atol=1e-3)
    assert result.metrics.mean_psnr_inside > 25 > result.start_metrics.mean_psnr_inside
    texture = result.scene.meshes[0].texture
    assert texture.image.shape == (4, 6, 3) and texture.wrap is False
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["fit"]["psnr_inside"] == pytest.approx(result.metrics.mean_psnr_inside)
    written = load_obj(tmp_path / "run" / "mesh.obj")
    assert written.texture.image.shape == (4, 6, 3) and written.vertex_colors is None
    assert (tmp_path / "run" / "mesh.mtl").is_file() and (tmp_path / "run" / "texture.png").is_file()


@pytest.mark.parametrize("listing", ["torch", "cpu"])
def test_chunks_are_listed_per_texel_tile_in_chunk_order(listing):
    from microdr.raster.cpu import cpu_target
    from microdr.raster.kernels import list_chunks_per_texel_tile

    list_chunks = list_chunks_per_texel_tile if listing == "torch" else cpu_target().list_chunks_per_texel_tile
    # 2 x 3 tiles; boxes of tiles (row0, row1, col0, col1); chunk 1 touches none.
    boxes = torch.tensor([[0, 1, 1, 2], [1, 0, 1, 0], [1, 1, 0, 1], [0, 0, 2, 2]], dtype=torch.int32)
    listed = list_chunks(boxes, 2, 3)
    assert listed.tile_ends.tolist() == [0, 1, 3, 4, 6, 7]
    assert listed.tile_items.tolist() == [0, 0, 3, 2, 0, 2, 0]
    nothing = list_chunks(boxes[1:2], 2, 3)
    assert nothing.tile_ends.tolist() == [0] * 6 and nothing.tile_items.numel() == 0
