"""Tests for microdr.optimize.remesh: topology kept, edge lengths toward the target, shape kept, maps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_optimize import interrupt_at, parse, resume_task, scene_data

from microdr.optimize.checkpoint import read_checkpoint
from microdr.errors import InputError
from microdr.io.mesh import cube, icosphere, load_obj, plane
from microdr.optimize.loop import CHECKPOINT, Optimization, optimize, resolve_settings
from microdr.optimize.remesh import Remeshed, closed_manifold_problem, remesh
from microdr.render import render_scene
from microdr.io.scene import RemeshSettings
from microdr.io.targets import Targets


def directed_edges(faces: torch.Tensor) -> torch.Tensor:
    """``(3F, 2)``: each face's edges ``ab, bc, ca``."""
    return faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2)


def assert_closed_oriented(faces: torch.Tensor, num_vertices: int) -> None:
    """Every directed edge in exactly one face and its reverse in another; no repeated corner."""
    edges = directed_edges(faces)
    assert len(torch.unique(edges, dim=0)) == len(edges)
    both = torch.cat([edges, edges.flip(1)])
    assert len(torch.unique(both, dim=0)) == len(edges)  # each reverse is an edge of the list
    assert (edges[:, 0] != edges[:, 1]).all() and (faces[:, 0] != faces[:, 2]).all()
    assert int(faces.max()) < num_vertices


def undirected_edges(faces: torch.Tensor) -> torch.Tensor:
    return torch.unique(directed_edges(faces).sort(dim=1).values, dim=0)


def euler_characteristic(faces: torch.Tensor) -> int:
    vertices = len(torch.unique(faces))
    return vertices - len(undirected_edges(faces)) + len(faces)


def edge_lengths(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    pairs = undirected_edges(faces)
    return (vertices[pairs[:, 0]] - vertices[pairs[:, 1]]).norm(dim=1)


def volume(vertices: torch.Tensor, faces: torch.Tensor) -> float:
    a, b, c = vertices[faces].unbind(1)
    return float(torch.linalg.det(torch.stack([a, b, c], dim=1)).sum() / 6)


def squashed_sphere() -> tuple[torch.Tensor, torch.Tensor]:
    """An icosphere squashed to half its height: edges from about 0.1 to 0.3."""
    mesh = icosphere(3)
    return mesh.vertices.double() * torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64), mesh.faces


def passes(vertices, faces, edge_length, count, **options) -> list[Remeshed]:
    results = []
    for _ in range(count):
        results.append(remesh(vertices, faces, edge_length, **options))
        vertices, faces = results[-1].vertices, results[-1].faces
    return results


@pytest.mark.parametrize("edge_length", [0.08, 0.3])
def test_edges_move_toward_the_target_and_the_surface_stays_a_closed_sphere(edge_length):
    vertices, faces = squashed_sphere()
    start = edge_lengths(vertices, faces)
    for result in passes(vertices, faces, edge_length, 6):
        assert_closed_oriented(result.faces, len(result.vertices))
        assert euler_characteristic(result.faces) == 2
    lengths = edge_lengths(result.vertices, result.faces)
    assert 0.8 * edge_length <= lengths.median() <= 4 / 3 * edge_length
    # Nearly all within a factor 2 of the target, which few were at the start when far from it.
    within = ((lengths > edge_length / 2) & (lengths < 2 * edge_length)).double().mean()
    assert within > 0.98
    # No face of (nearly) zero area.
    a, b, c = result.vertices[result.faces].unbind(1)
    areas = torch.linalg.cross(b - a, c - a).norm(dim=1) / 2
    assert areas.min() > 0.01 * edge_length**2


def test_a_sphere_keeps_its_shape_and_volume():
    mesh = icosphere(3)
    vertices, faces = mesh.vertices.double(), mesh.faces
    result = passes(vertices, faces, 0.2, 5)[-1]
    radii = result.vertices.norm(dim=1)
    assert radii.max() < 1.01 and radii.min() > 0.97
    # Midpoint collapses cut chords under the surface: a few percent of volume go.
    assert volume(result.vertices, result.faces) == pytest.approx(volume(vertices, faces), rel=0.05)
    # Orientation kept: outward normals give a positive volume.
    assert volume(result.vertices, result.faces) > 0


def test_the_same_input_gives_the_same_output_bit_for_bit():
    vertices, faces = squashed_sphere()
    first, second = (remesh(vertices.float(), faces, 0.1, passes=3) for _ in range(2))
    assert torch.equal(first.vertices, second.vertices)
    assert torch.equal(first.faces, second.faces)
    assert torch.equal(first.face_map, second.face_map)
    assert torch.equal(first.vertex_map.indices(), second.vertex_map.indices())
    assert torch.equal(first.vertex_map.values(), second.vertex_map.values())


@pytest.mark.parametrize("edge_length", [0.06, 0.3])
def test_the_vertex_map_gives_the_new_vertices_from_the_old(edge_length):
    """Without smoothing, each new vertex is the map's average of old vertices, exactly (every
    weight is a power of 1/2); with it, kept vertices move only along the surface."""
    vertices, faces = squashed_sphere()
    result = remesh(vertices, faces, edge_length, passes=2, smoothing=0.0)
    assert len(result.vertices) != len(vertices)
    dense = result.vertex_map.to_dense()
    assert dense.shape == (len(result.vertices), len(vertices))
    assert torch.equal(dense.sum(dim=1), torch.ones(len(result.vertices), dtype=torch.float64))
    assert (dense >= 0).all()
    assert torch.allclose(dense @ vertices, result.vertices, rtol=0, atol=1e-15)
    assert torch.allclose(result.carry(vertices), result.vertices, rtol=0, atol=1e-15)
    # carry keeps trailing dimensions and dtype.
    moments = torch.arange(len(vertices) * 6, dtype=torch.float32).reshape(-1, 2, 3)
    carried = result.carry(moments)
    assert carried.shape == (len(result.vertices), 2, 3) and carried.dtype == torch.float32
    assert torch.allclose(carried, (dense @ moments.double().reshape(len(vertices), 6)).float()
                          .reshape(-1, 2, 3))  # fmt: skip


def test_the_face_map_names_the_face_each_new_face_lies_in():
    """A pass on a cube (side 2) toward edges of 0.75 splits and flips, and collapses nothing
    (no edge falls below 0.6); no flip crosses a crease (90-degree folds), so every new face
    lies in the plane of the old face the map names."""
    mesh = cube()
    vertices, faces = mesh.vertices.double(), mesh.faces
    result = remesh(vertices, faces, 0.75, smoothing=0.0)
    assert_closed_oriented(result.faces, len(result.vertices))
    assert len(result.faces) >= 4 * len(faces)

    def normals(v, f):
        a, b, c = v[f].unbind(1)
        return torch.nn.functional.normalize(torch.linalg.cross(b - a, c - a), dim=1)

    old_normals = normals(vertices, faces)[result.face_map]
    assert torch.allclose(normals(result.vertices, result.faces), old_normals, atol=1e-12)
    offsets = result.vertices[result.faces] - vertices[faces[result.face_map]][:, :1]
    assert (offsets @ old_normals[:, :, None]).abs().max() < 1e-12


def test_open_or_bad_meshes_are_refused():
    square = plane()
    assert closed_manifold_problem(square.faces, square.num_vertices) == (
        "it has a boundary (an edge with one face)"
    )
    with pytest.raises(ValueError, match="closed manifold mesh: it has a boundary"):
        remesh(square.vertices, square.faces, 0.5)
    sphere = icosphere(1)
    flipped = sphere.faces.clone()
    flipped[0] = flipped[0, [0, 2, 1]]
    assert "orientation" in closed_manifold_problem(flipped, sphere.num_vertices)
    with pytest.raises(ValueError, match="edge_length must be > 0"):
        remesh(sphere.vertices, sphere.faces, 0.0)


# --- remeshing during an optimization ----------------------------------------------------------


def remeshing_task(tmp_path):
    """test_optimize's resume task (random views, free vertices, colors and scale, schedules)
    with a remesh every 3 of its 12 iterations."""
    scene, targets = resume_task(tmp_path)
    remeshing = replace(scene.optimize, remesh=RemeshSettings((0.3, 0.2), every=3, until=0.9))
    return replace(scene, optimize=remeshing), targets


def test_a_remeshing_run_resumes_to_the_uninterrupted_result_and_writes_a_closed_mesh(tmp_path):
    scene, targets = remeshing_task(tmp_path)
    whole = optimize(scene, targets, outdir=tmp_path / "whole")
    partial = optimize(scene, targets, outdir=tmp_path / "part", callback=interrupt_at(6))
    assert partial.iterations == 7
    resumed = optimize(scene, targets, outdir=tmp_path / "part", resume=True)
    assert torch.equal(resumed.images, whole.images)
    assert (tmp_path / "part" / "mesh.obj").read_bytes() == (
        tmp_path / "whole" / "mesh.obj"
    ).read_bytes()
    expected = read_checkpoint(tmp_path / "whole" / CHECKPOINT)
    actual = read_checkpoint(tmp_path / "part" / CHECKPOINT)
    for name, tensor in expected["parameters"].items():
        assert torch.equal(actual["parameters"][name], tensor), name
    for index, moments in expected["adam"]["state"].items():
        assert torch.equal(actual["adam"]["state"][index]["m"], moments["m"])
        assert torch.equal(actual["adam"]["state"][index]["v"], moments["v"])
    # The mesh was remade (icosphere level 1 has 80 faces), closed and outward.
    mesh = load_obj(tmp_path / "whole" / "mesh.obj")
    assert mesh.num_faces != 80
    assert_closed_oriented(mesh.faces, mesh.num_vertices)
    assert euler_characteristic(mesh.faces) == 2
    assert volume(mesh.vertices.double(), mesh.faces) > 0
    assert len(whole.scene.meshes[0].colors) == mesh.num_vertices


def test_a_remesh_carries_adams_moments_and_the_colors_through_the_vertex_map(tmp_path):
    scene, targets = remeshing_task(tmp_path)
    run = Optimization(scene, targets)
    for _ in range(2):
        run.step()
    names = [name for name, _ in run.parameters.named_parameters()]
    moments = run.optimizer.state[names.index("displacement")]["m"].clone()
    logits = run.parameters.color_logits[0].detach().clone()
    deformed, faces = run.parameters.deformed().detach(), run.parameters.start.faces
    run._remesh(0.3)  # what the third iteration ends with
    expected = remesh(deformed, faces, 0.3)
    assert torch.equal(run.parameters.start.vertices, expected.vertices)
    assert torch.equal(run.parameters.start.faces, expected.faces)
    assert torch.equal(run.parameters.displacement, torch.zeros_like(expected.vertices))
    carried = run.optimizer.state[names.index("displacement")]["m"]
    assert torch.allclose(carried, expected.vertex_map.to_dense().float() @ moments, atol=1e-7)
    assert torch.allclose(run.parameters.color_logits[0], expected.carry(logits))
    assert run.parameters.topology.degree.shape == (len(expected.vertices),)
    assert run.step().loss > 0  # the new mesh renders


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vertex_parametrization": "bounded"},
         'scene.json: optimize.remesh: remeshing needs vertex_parametrization "offset"'),
        ({"parameters": ["scale"]},
         'scene.json: optimize.remesh: remeshing needs "vertices" among the parameters'),
        ({"remesh": {"edge_length": [0.1]}},
         "scene.json: optimize.remesh.edge_length: expected an array of 2 numbers, got [0.1]"),
        ({"remesh": {"edge_length": 0.1, "every": 0}},
         "scene.json: optimize.remesh.every: expected an integer >= 1, got 0"),
    ],
)  # fmt: skip
def test_settings_that_cannot_remesh_are_refused_in_one_line(change, message):
    data = {**scene_data(), "optimize": {"remesh": {"edge_length": 0.2}, **change}}
    with pytest.raises(InputError) as error:
        scene = parse(data)
        resolve_settings(scene, Targets.from_images(render_scene(scene)[:, 3:]))
    assert str(error.value).startswith(message)


def test_an_open_mesh_cannot_be_remeshed():
    data = {**scene_data(), "optimize": {"remesh": {"edge_length": 0.2}}}
    data["meshes"] = [{"primitive": "plane"}]
    scene = parse(data)
    with pytest.raises(InputError, match=r"meshes\[0\]: optimize.remesh needs closed manifold "
                                         r"meshes, and this one is not: it has a boundary"):
        resolve_settings(scene, Targets.from_images(render_scene(scene)[:, 3:]))


def test_remesh_settings_read_a_length_or_a_schedule():
    one = parse({**scene_data(), "optimize": {"remesh": {"edge_length": 0.2}}}).optimize.remesh
    assert one == RemeshSettings((0.2, 0.2), every=25, until=0.8)
    both = {"edge_length": [0.2, 0.1], "every": 5, "until": 0.5}
    assert parse({**scene_data(), "optimize": {"remesh": both}}).optimize.remesh == (
        RemeshSettings((0.2, 0.1), every=5, until=0.5)
    )
