"""Tests for microdr.io.scene: parsing, defaults, transforms and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from microdr.errors import InputError
from microdr.io.mesh import save_obj
from microdr.io.scene import (
    Camera,
    DirectionalLight,
    Lights,
    OptimizeSettings,
    RenderSettings,
    Transform,
    load_scene,
    override_optimize,
    parse_scene,
    scene_to_json,
)

COLORED_TRIANGLE = "v 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 0 1 0 0 0 1\nf 1 2 3\n"


def scene(**sections) -> dict:
    """A minimal valid scene with some top-level sections replaced or added."""
    return {"meshes": [{"primitive": "cube"}], "cameras": [{"eye": [0, 0, 3]}], **sections}


def camera(**fields) -> dict:
    return scene(cameras=[{"eye": [0, 0, 3], **fields}])


def mesh(**fields) -> dict:
    return scene(meshes=[fields])


def write_scene(directory: Path, data: dict | str, name: str = "scene.json") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# --- valid scenes ------------------------------------------------------------------------------


def test_full_scene(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tri.obj").write_text(COLORED_TRIANGLE)
    data = {
        "image": {"width": 64, "height": 32},
        "render": {
            "sigma": 1e-5,
            "gamma": 0.01,
            "eps": 0,
            "eps_d": 0.001,
            "background": [1, 1, 1],
            "cull_backfaces": True,
            "backend": "cpu",
        },
        "meshes": [
            {"file": "models/tri.obj", "transform": {"translate": [1, 2, 3], "scale": 2}},
            {
                "primitive": "icosphere",
                "subdivisions": 1,
                "transform": {"rotate": [0, 90, 0], "scale": [1, 2, 3]},
                "color": [0.1, 0.2, 0.3],
            },
            {"primitive": "cube", "color": {"per_face": [[0, 0, i / 11] for i in range(12)]}},
            {"primitive": "plane", "color": {"per_vertex": [[1, 1, 1]] * 4}},
        ],
        "cameras": [
            {"eye": [0, 0, 5], "target": [0, 1, 0], "up": [0, 0, -1], "fov": 30, "far": 10},
            {
                "projection": "orthographic",
                "half_height": 2.5,
                "orbit": {"distance": 2, "elevation": 0, "azimuth": 90},
                "near": 0.5,
            },
        ],
        "lights": {"ambient": 0.25, "directional": [{"direction": [0, 3, 4], "intensity": 0.75}]},
        "optimize": {
            "parameters": ["vertices", "colors"],
            "vertex_parametrization": "bounded",
            "loss": {"silhouette_iou": 1, "laplacian": 0.03, "flatten": 0.0003},
            "mask_rgb": True,
            "lr": 0.05,
            "betas": [0.5, 0.99],
            "lr_schedule": "cosine",
            "iterations": 2000,
            "sigma_schedule": {"start": 1e-3, "end": 1e-4},
            "views_per_step": 2,
        },
    }
    result = load_scene(write_scene(tmp_path, data))

    assert result.source == str(tmp_path / "scene.json")
    assert result.render == RenderSettings(64, 32, 1e-5, 0.01, 0.0, 0.001, (1, 1, 1), True, "cpu")

    tri, sphere, box, square = result.meshes
    assert tri.name == "models/tri.obj" and tri.mesh.num_faces == 1
    assert tri.transform == Transform(translate=(1, 2, 3), scale=(2, 2, 2))
    assert tri.color_mode == "vertex" and tri.colors.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert sphere.name == "icosphere" and sphere.mesh.num_faces == 80
    assert sphere.transform == Transform(rotate=(0, 90, 0), scale=(1, 2, 3))
    assert sphere.colors.shape == (42, 3) and sphere.colors.dtype == torch.float32
    torch.testing.assert_close(sphere.colors, torch.tensor([[0.1, 0.2, 0.3]]).expand(42, 3))
    assert box.color_mode == "face" and box.colors.shape == (12, 3)
    assert box.colors[11].tolist() == [0, 0, 1]
    assert square.color_mode == "vertex" and square.colors.tolist() == [[1, 1, 1]] * 4

    first, second = result.cameras
    assert first == Camera("perspective", (0, 0, 5), (0, 1, 0), (0, 0, -1), 30, None, 0.1, 10)
    assert (second.projection, second.fov, second.half_height) == ("orthographic", None, 2.5)
    assert second.eye == pytest.approx((2, 0, 0), abs=1e-12)
    assert (second.near, second.far) == (0.5, 100)

    assert result.lights == Lights(0.25, (DirectionalLight((0, 0.6, 0.8), 0.75),))
    assert result.optimize == OptimizeSettings(
        parameters=("vertices", "colors"),
        vertex_parametrization="bounded",
        loss={
            "silhouette_iou": 1,
            "rgb_l1": 0,
            "rgb_l2": 0,
            "laplacian": 0.03,
            "flatten": 0.0003,
            "edge_length": 0,
            "texture_smoothness": 0,
        },
        mask_rgb=True,
        lr=0.05,
        betas=(0.5, 0.99),
        lr_schedule="cosine",
        iterations=2000,
        sigma_schedule=(1e-3, 1e-4),
        views_per_step=2,
    )


def test_defaults(tmp_path):
    (tmp_path / "tri.obj").write_text(COLORED_TRIANGLE.replace(" 1 0 0\n", "\n"))
    (tmp_path / "plain.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    data = scene(meshes=[{"primitive": "icosphere"}, {"file": "plain.obj"}])
    result = load_scene(write_scene(tmp_path, data))
    assert result.render == RenderSettings()
    assert (result.render.width, result.render.height, result.render.sigma) == (256, 256, 1e-4)
    assert result.lights is None and result.optimize is None
    sphere, plain = result.meshes
    assert sphere.mesh.num_faces == 320 and sphere.transform == Transform()
    assert plain.colors.tolist() == [[pytest.approx(0.7)] * 3] * 3
    assert result.cameras == (
        Camera("perspective", (0, 0, 3), (0, 0, 0), (0, 1, 0), 60, None, 0.1, 100),
    )


def test_empty_sections_take_defaults():
    result = parse_scene(scene(lights={}, optimize={}, meshes=[]), "inline", Path("."))
    assert result.meshes == ()
    assert result.lights == Lights(0.5, ())
    assert result.optimize == OptimizeSettings()
    # Parameters, loss and sigma schedule are left to the optimizer, to suit the targets.
    assert result.optimize.parameters is None and result.optimize.loss is None
    assert (result.optimize.lr, result.optimize.betas, result.optimize.iterations) == (
        0.01, (0.9, 0.99), 1000,
    )  # fmt: skip
    assert result.optimize.sigma_schedule is None and result.optimize.views_per_step is None


def test_orthographic_defaults():
    (result,) = parse_scene(camera(projection="orthographic"), "s", Path(".")).cameras
    assert (result.fov, result.half_height) == (None, 1.0)


@pytest.mark.parametrize(
    ("orbit", "target", "eye"),
    [
        ({"distance": 2, "azimuth": 90}, [0, 0, 0], (2, 0, 0)),
        ({"distance": 2, "elevation": 0, "azimuth": 0}, [0, 0, 0], (0, 0, 2)),
        ({"distance": 2, "elevation": 30, "azimuth": 180}, [1, 1, 1], (1, 2, 1 - math.sqrt(3))),
        (
            {"distance": 1, "elevation": -45, "azimuth": -90},
            [0, 0, 0],
            (-(0.5**0.5), -(0.5**0.5), 0),
        ),
    ],
)
def test_orbit(orbit, target, eye):
    data = scene(cameras=[{"orbit": orbit, "target": target}])
    (result,) = parse_scene(data, "s", Path(".")).cameras
    assert result.eye == pytest.approx(eye, abs=1e-12)


def test_file_paths_are_relative_to_the_scene_file(tmp_path, monkeypatch):
    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "tri.obj").write_text(COLORED_TRIANGLE)
    write_scene(tmp_path / "scenes", mesh(file="tri.obj"))
    monkeypatch.chdir(tmp_path)
    assert load_scene("scenes/scene.json").meshes[0].mesh.num_vertices == 3


# --- Transform ---------------------------------------------------------------------------------


def test_rotate_about_z_maps_x_to_y():
    result = Transform(rotate=(0, 0, 90)).apply(torch.tensor([[1.0, 0, 0]]))
    torch.testing.assert_close(result, torch.tensor([[0.0, 1, 0]]))


def test_rotation_order_is_x_then_y_then_z():
    # Rx(90) takes +y to +z, then Ry(90) takes +z to +x; the other order would give +y.
    result = Transform(rotate=(90, 90, 0)).apply(torch.tensor([[0.0, 1, 0]]))
    torch.testing.assert_close(result, torch.tensor([[1.0, 0, 0]]))


def test_apply_scales_then_rotates_then_translates_differentiably():
    transform = Transform(translate=(1, 2, 3), rotate=(0, 0, 90), scale=(2, 3, 4))
    vertices = torch.tensor([[1.0, 1, 1]], dtype=torch.float64, requires_grad=True)
    result = transform.apply(vertices)
    assert result.dtype == torch.float64
    # scale -> (2, 3, 4); Rz(90): (x, y) -> (-y, x) -> (-3, 2, 4); translate -> (-2, 4, 7).
    torch.testing.assert_close(result, torch.tensor([[-2.0, 4, 7]], dtype=torch.float64))
    result.sum().backward()
    torch.testing.assert_close(vertices.grad, torch.tensor([[2.0, -3, 4]], dtype=torch.float64))


def test_rotation_matrix_is_orthonormal():
    rotation = Transform(rotate=(10, -20, 30)).rotation(torch.float64)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3, dtype=torch.float64))
    assert torch.linalg.det(rotation).item() == pytest.approx(1.0)


# --- invalid scenes: each gives one exact line -------------------------------------------------

CUBE_WITH_PER_FACE = mesh(primitive="cube", color={"per_face": [[0, 0, 0]]})
BACKENDS = '"auto", "cpu", "cuda", "reference"'
PARAMETERS = '"vertices", "translation", "scale", "colors", "light", "camera", "texture"'
TOP_LEVEL = '"image", "render", "meshes", "cameras", "lights", "optimize"'

INVALID = [
    ("fov_wide", camera(fov="wide"), 'cameras[0].fov: expected a number in (0, 180), got "wide"'),
    ("fov_180", camera(fov=180), "cameras[0].fov: expected a number in (0, 180), got 180"),
    ("near_eq_far", camera(near=5, far=5), "cameras[0].far: expected a number > near (5), got 5"),
    ("near_gt_far", camera(near=1, far=0.5),
     "cameras[0].far: expected a number > near (1), got 0.5"),
    ("near_0", camera(near=0), "cameras[0].near: expected a number > 0, got 0"),
    ("missing_cameras", {"meshes": []}, 'missing key "cameras"'),
    ("missing_meshes", {"cameras": [{"eye": [0, 0, 3]}]}, 'missing key "meshes"'),
    ("empty_cameras", scene(cameras=[]), "cameras: expected an array of at least 1 item, got []"),
    ("meshes_object", scene(meshes={}), "meshes: expected an array, got {}"),
    ("camera_not_object", scene(cameras=[3]), "cameras[0]: expected an object, got 3"),
    ("unknown_key", camera(foov=60), 'cameras[0].foov: unknown key (did you mean "fov"?)'),
    ("typo_before_missing", scene(cameras=[{"eey": [0, 0, 3]}]),
     'cameras[0].eey: unknown key (did you mean "eye"?)'),
    ("unknown_key_no_match", scene(zzz=1), f"zzz: unknown key (expected one of {TOP_LEVEL})"),
    ("bool_as_number", scene(render={"sigma": True}),
     "render.sigma: expected a number > 0, got true"),
    ("nan", '{"meshes": [], "cameras": [{"eye": [0, 0, 3]}], "render": {"gamma": NaN}}',
     "render.gamma: expected a finite number, got NaN"),
    ("infinity", mesh(primitive="cube", transform={"translate": [float("inf"), 0, 0]}),
     "meshes[0].transform.translate[0]: expected a finite number, got Infinity"),
    ("subdivisions_9", mesh(primitive="icosphere", subdivisions=9),
     "meshes[0].subdivisions: expected an integer in [0, 7], got 9"),
    ("subdivisions_float", mesh(primitive="icosphere", subdivisions=2.5),
     "meshes[0].subdivisions: expected an integer in [0, 7], got 2.5"),
    ("subdivisions_cube", mesh(primitive="cube", subdivisions=1),
     'meshes[0].subdivisions: only for "icosphere" meshes'),
    ("bad_primitive", mesh(primitive="sphere"),
     'meshes[0].primitive: expected one of "icosphere", "cube", "plane", got "sphere"'),
    ("per_vertex_count", mesh(primitive="icosphere", subdivisions=0,
                              color={"per_vertex": [[0, 0, 0]] * 2}),
     "meshes[0].color.per_vertex: expected 12 colors (one per vertex), got 2"),
    ("per_face_count", CUBE_WITH_PER_FACE,
     "meshes[0].color.per_face: expected 12 colors (one per face), got 1"),
    ("per_vertex_item", mesh(primitive="plane", color={"per_vertex": [[0, 0, 0]] * 3 + [[0, 0]]}),
     "meshes[0].color.per_vertex[3]: expected an array of 3 numbers, got [0, 0]"),
    ("color_range", mesh(primitive="cube", color=[0, 2, 0]),
     "meshes[0].color[1]: expected a number in [0, 1], got 2"),
    ("color_type", mesh(primitive="cube", color="red"),
     'meshes[0].color: expected [r, g, b], {"per_vertex": [...]} or {"per_face": [...]}, '
     'got "red"'),
    ("color_both", mesh(primitive="cube", color={"per_vertex": [], "per_face": []}),
     'meshes[0].color: give "per_vertex" or "per_face", not both'),
    ("missing_mesh_file", mesh(file="missing.obj"), "meshes[0].file: missing.obj: no such file"),
    ("empty_file_name", mesh(file=""), 'meshes[0].file: expected a non-empty string, got ""'),
    ("file_and_primitive", mesh(file="a.obj", primitive="cube"),
     'meshes[0]: give "file" or "primitive", not both'),
    ("no_file_or_primitive", mesh(color=[0, 0, 0]),
     'meshes[0]: missing key "file" (or give "primitive")'),
    ("scale_zero", mesh(primitive="cube", transform={"scale": 0}),
     "meshes[0].transform.scale: expected a number > 0, got 0"),
    ("scale_vector", mesh(primitive="cube", transform={"scale": [1, 1, -1]}),
     "meshes[0].transform.scale[2]: expected a number > 0, got -1"),
    ("eye_is_target", camera(eye=[1, 2, 3], target=[1, 2, 3]),
     "cameras[0]: eye and target are the same point"),
    ("parallel_up", camera(eye=[0, 5, 0]), "cameras[0]: eye - target is parallel to up"),
    ("orbit_pole", scene(cameras=[{"orbit": {"distance": 3, "elevation": 90}}]),
     "cameras[0]: eye - target is parallel to up"),
    ("zero_up", camera(up=[0, 0, 0]), "cameras[0].up: expected a nonzero vector, got [0, 0, 0]"),
    ("missing_eye", scene(cameras=[{"fov": 60}]),
     'cameras[0]: missing key "eye" (or give "orbit")'),
    ("eye_and_orbit", camera(orbit={"distance": 3}), 'cameras[0]: give "eye" or "orbit", not both'),
    ("eye_length", camera(eye=[0, 3]),
     "cameras[0].eye: expected an array of 3 numbers, got [0, 3]"),
    ("orbit_distance", scene(cameras=[{"orbit": {"elevation": 10}}]),
     'cameras[0].orbit: missing key "distance"'),
    ("orbit_elevation", scene(cameras=[{"orbit": {"distance": 1, "elevation": 91}}]),
     "cameras[0].orbit.elevation: expected a number in [-90, 90], got 91"),
    ("fov_orthographic", camera(projection="orthographic", fov=30),
     'cameras[0].fov: only for "perspective" cameras'),
    ("half_height_perspective", camera(half_height=1),
     'cameras[0].half_height: only for "orthographic" cameras'),
    ("projection", camera(projection="fisheye"),
     'cameras[0].projection: expected one of "perspective", "orthographic", got "fisheye"'),
    ("width_0", scene(image={"width": 0}), "image.width: expected an integer in [1, 16384], got 0"),
    ("height_string", scene(image={"height": "64"}),
     'image.height: expected an integer in [1, 16384], got "64"'),
    ("huge_image", scene(image={"width": 16384, "height": 8192}),
     "image: 16384 x 8192 is 134217728 pixels, more than the limit of 2**26 = 67108864; "
     "one RGBA float32 image that size needs 2.0 GiB"),
    ("bad_backend", scene(render={"backend": "gpu"}),
     f'render.backend: expected one of {BACKENDS}, got "gpu"'),
    ("eps_1", scene(render={"eps": 1}), "render.eps: expected a number in [0, 1), got 1"),
    ("eps_d_half", scene(render={"eps_d": 0.5}),
     "render.eps_d: expected a number in [1e-30, 0.5), got 0.5"),
    # Below float32's normal range the kernels' weights or 1 / gamma break down (NaN pixels).
    ("eps_d_tiny", scene(render={"eps_d": 1e-40}),
     "render.eps_d: expected a number in [1e-30, 0.5), got 1e-40"),
    ("gamma_tiny", scene(render={"gamma": 1e-40}), "render.gamma: expected a number >= 1e-30, got 1e-40"),
    ("background", scene(render={"background": [0, 0, -0.1]}),
     "render.background[2]: expected a number in [0, 1], got -0.1"),
    ("cull_string", scene(render={"cull_backfaces": "yes"}),
     'render.cull_backfaces: expected true or false, got "yes"'),
    ("bad_json", '{\n  "meshes": []\n  "cameras": []\n}',
     "line 3 column 3: invalid JSON: Expecting ',' delimiter"),
    ("empty_file", "", "line 1 column 1: invalid JSON: Expecting value"),
    ("duplicate_key", '{"meshes": [], "cameras": [{"eye": [0, 0, 3], "fov": 1, "fov": 2}]}',
     'cameras[0]: duplicate key "fov"'),
    ("top_level_array", [], "expected an object, got []"),
    ("ambient_negative", scene(lights={"ambient": -1}),
     "lights.ambient: expected a number >= 0, got -1"),
    ("light_direction_zero", scene(lights={"directional": [{"direction": [0, 0, 0]}]}),
     "lights.directional[0].direction: expected a nonzero vector, got [0, 0, 0]"),
    ("light_direction_missing", scene(lights={"directional": [{"intensity": 1}]}),
     'lights.directional[0]: missing key "direction"'),
    ("lr_0", scene(optimize={"lr": 0}), "optimize.lr: expected a number in (0, 10], got 0"),
    ("betas_range", scene(optimize={"betas": [0.9, 1]}),
     "optimize.betas[1]: expected a number in [0, 1), got 1"),
    ("betas_length", scene(optimize={"betas": [0.9]}),
     "optimize.betas: expected an array of 2 numbers, got [0.9]"),
    ("unknown_parameter", scene(optimize={"parameters": ["verts"]}),
     f'optimize.parameters[0]: expected one of {PARAMETERS}, got "verts"'),
    ("duplicate_parameter", scene(optimize={"parameters": ["vertices", "vertices"]}),
     'optimize.parameters[1]: "vertices" is listed twice'),
    ("no_parameters", scene(optimize={"parameters": []}),
     "optimize.parameters: expected an array of at least 1 item, got []"),
    ("no_image_loss", scene(optimize={"loss": {"laplacian": 1, "silhouette_iou": 0}}),
     'optimize.loss: at least one of "silhouette_iou", "rgb_l1", "rgb_l2" must be > 0'),
    ("loss_typo", scene(optimize={"loss": {"silhouette_IoU": 1}}),
     'optimize.loss.silhouette_IoU: unknown key (did you mean "silhouette_iou"?)'),
    ("iterations_0", scene(optimize={"iterations": 0}),
     "optimize.iterations: expected an integer in [1, 10000000], got 0"),
    ("parametrization", scene(optimize={"vertex_parametrization": "free"}),
     'optimize.vertex_parametrization: expected one of "offset", "bounded", got "free"'),
    ("lr_schedule", scene(optimize={"lr_schedule": "step"}),
     'optimize.lr_schedule: expected one of "constant", "cosine", got "step"'),
    ("mask_rgb", scene(optimize={"mask_rgb": 1}), "optimize.mask_rgb: expected true or false, got 1"),
    ("sigma_schedule_end", scene(optimize={"sigma_schedule": {"start": 1e-3}}),
     'optimize.sigma_schedule: missing key "end"'),
    ("sigma_schedule_zero", scene(optimize={"sigma_schedule": {"start": 0, "end": 1e-4}}),
     "optimize.sigma_schedule.start: expected a number > 0, got 0"),
    ("sigma_schedule_number", scene(optimize={"sigma_schedule": 1e-3}),
     "optimize.sigma_schedule: expected an object, got 0.001"),
    ("views_per_step_0", scene(optimize={"views_per_step": 0}),
     "optimize.views_per_step: expected an integer >= 1, got 0"),
    ("too_many_cameras", scene(cameras=[{"eye": [0, 0, 3]}] * 1025),
     "cameras: expected at most 1024 items, got 1025"),
    ("views_per_step_too_many", scene(optimize={"views_per_step": 2}),
     "optimize.views_per_step: expected at most the number of cameras (1), got 2"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_scene(tmp_path, monkeypatch, data, message):
    monkeypatch.chdir(tmp_path)
    write_scene(tmp_path, data)
    with pytest.raises(InputError) as caught:
        load_scene("scene.json")
    assert str(caught.value) == f"scene.json: {message}"


def test_missing_scene_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as caught:
        load_scene("nope.json")
    assert str(caught.value) == "nope.json: no such file"


def test_non_utf8_scene_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scene.json").write_bytes(b'{\n"meshes": "\xff"}')
    with pytest.raises(InputError) as caught:
        load_scene("scene.json")
    assert str(caught.value) == (
        "scene.json: line 2: not UTF-8 text (byte 0xff at byte 12 of the line)"
    )


def test_errors_inside_a_mesh_file_name_the_mesh_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.obj").write_text("v 0 0 0\nf 1 2 3\n")
    write_scene(tmp_path, mesh(file="bad.obj"))
    with pytest.raises(InputError) as caught:
        load_scene("scene.json")
    assert str(caught.value) == (
        "bad.obj: line 2: face index 2 out of range (the file has 1 vertex)"
    )


# --- overrides and writing ---------------------------------------------------------------------


def test_override_optimize_checks_like_the_file():
    settings = override_optimize(OptimizeSettings(), "lr", 0.5, "--lr")
    settings = override_optimize(settings, "parameters", ["colors", "light"], "--params")
    assert (settings.lr, settings.parameters) == (0.5, ("colors", "light"))
    with pytest.raises(InputError) as caught:
        override_optimize(settings, "iterations", 0, "--iterations")
    assert str(caught.value) == "--iterations: expected an integer in [1, 10000000], got 0"
    with pytest.raises(InputError) as caught:
        override_optimize(settings, "parameters", ["colors", "colors"], "--params")
    assert str(caught.value) == '--params: [1]: "colors" is listed twice'


def test_scene_to_json_reads_back_to_the_same_scene(tmp_path):
    (tmp_path / "tri.obj").write_text(COLORED_TRIANGLE)
    data = scene(
        meshes=[
            {"file": "tri.obj", "transform": {"translate": [1, 2, 3], "rotate": [10, 0, 0]}},
            {"primitive": "cube", "color": {"per_face": [[0, 0, i / 11] for i in range(12)]}},
        ],
        cameras=[
            {"eye": [0, 1, 3], "fov": 30, "far": 10},
            {"projection": "orthographic", "half_height": 2, "eye": [3, 0, 0], "up": [0, 0, 1]},
        ],
        render={"sigma": 3e-5, "background": [0.1, 0.2, 0.3], "cull_backfaces": True},
        lights={"ambient": 0.2, "directional": [{"direction": [0, 1, 1], "intensity": 0.5}]},
        optimize={"parameters": ["colors"], "lr": 0.1, "sigma_schedule": {"start": 1, "end": 2}},
    )
    original = load_scene(write_scene(tmp_path, data))
    # The cube is written as an OBJ; its per-face colors stay in the JSON.
    save_obj(original.meshes[1].mesh, tmp_path / "cube.obj")
    text = json.dumps(scene_to_json(original, ["tri.obj", "cube.obj"]))
    copy = load_scene(write_scene(tmp_path, text, "copy.json"))
    for field in ("render", "cameras", "optimize"):
        assert getattr(copy, field) == getattr(original, field)
    # Light directions are normalized again when read: equal up to the last bit.
    assert copy.lights.ambient == original.lights.ambient
    ((light_copy,), (light,)) = copy.lights.directional, original.lights.directional
    assert light_copy.direction == pytest.approx(light.direction, abs=1e-15)
    assert light_copy.intensity == light.intensity
    for before, after in zip(original.meshes, copy.meshes):
        assert (after.transform, after.color_mode) == (before.transform, before.color_mode)
        assert torch.equal(after.colors, before.colors)
        assert torch.equal(after.mesh.vertices, before.mesh.vertices)
        assert torch.equal(after.mesh.faces, before.mesh.faces)
