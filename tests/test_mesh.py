"""Tests for microdr.io.mesh: OBJ reading and writing, primitives, normals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from hypothesis import event, given, settings
from hypothesis import strategies as st

from microdr.io import mesh as mesh_module
from microdr.errors import InputError
from microdr.io.mesh import (
    MAX_OBJ_BYTES,
    Mesh,
    _load_common_obj,
    _ObjParser,
    _obj_lines,
    cube,
    icosphere,
    load_obj,
    obj_statements,
    plane,
    save_obj,
)

SOFTRAS_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "softras"
needs_softras = pytest.mark.skipif(
    not SOFTRAS_DATA.is_dir(), reason=f"SoftRas demo data not found at {SOFTRAS_DATA}"
)


def write(tmp_path: Path, text: str, name: str = "mesh.obj") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


TRIANGLE = "v 0 0 0\nv 1 0 0\nv 0 1 0\n"


# --- reading -----------------------------------------------------------------------------------


def test_reads_vertices_and_faces(tmp_path):
    mesh = load_obj(write(tmp_path, TRIANGLE + "f 1 2 3\n"))
    assert mesh.vertices.dtype == torch.float32 and mesh.faces.dtype == torch.int64
    assert mesh.vertices.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0]]
    assert mesh.faces.tolist() == [[0, 1, 2]]
    assert mesh.vertex_colors is None


@pytest.mark.parametrize(
    ("polygon", "triangles"),
    [
        ("f 1 2 3 4", [[0, 1, 2], [0, 2, 3]]),
        ("f 1 2 3 4 5", [[0, 1, 2], [0, 2, 3], [0, 3, 4]]),
    ],
)
def test_polygons_are_fan_triangulated(tmp_path, polygon, triangles):
    text = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0.5 2 0\nv 0 1 0\n" + polygon + "\n"
    assert load_obj(write(tmp_path, text)).faces.tolist() == triangles


@pytest.mark.parametrize(
    "face",
    ["f 1/1/1 2/2/2 3/3/3", "f 1//1 2//2 3//3", "f 1/1 2/2 3/3", "f -3 -2 -1", "f -3/1 2 -1//4"],
)
def test_face_corner_forms(tmp_path, face):
    assert load_obj(write(tmp_path, TRIANGLE + face + "\n")).faces.tolist() == [[0, 1, 2]]


def test_negative_indices_are_relative_to_the_vertices_read_so_far(tmp_path):
    text = TRIANGLE + "f -3 -2 -1\nv 5 5 5\nf -4 -1 -2\n"
    assert load_obj(write(tmp_path, text)).faces.tolist() == [[0, 1, 2], [0, 3, 2]]


def test_vertex_colors(tmp_path):
    text = "v 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 0 1 0 0 0 0.5\nf 1 2 3\n"
    mesh = load_obj(write(tmp_path, text))
    assert mesh.vertex_colors.dtype == torch.float32
    assert mesh.vertex_colors.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0.5]]


def test_ignores_other_statements_comments_and_keeps_unused_vertices(tmp_path):
    text = (
        "# comment\r\nmtllib a.mtl\no thing\ng group\ns 1\nusemtl red\n\n"
        "v 0 0 0\nv 1 0 0\nv 0 1 0  # trailing comment\nv 9 9 9\n"
        "vt 0.5 0.5\nvn 0 0 1\nvp 0.1\nl 1 2\ncstype bezier\n\tf 1 2 3\r\n"
    )
    mesh = load_obj(write(tmp_path, text))
    assert mesh.num_vertices == 4 and mesh.faces.tolist() == [[0, 1, 2]]


def test_a_vertex_weight_w_is_read_and_ignored(tmp_path):
    mesh = load_obj(write(tmp_path, "v 0 0 0 1\nv 2 0 0 0.5\nv 0 2 0 2\nf 1 2 3\n"))
    assert mesh.vertices.tolist() == [[0, 0, 0], [2, 0, 0], [0, 2, 0]]
    assert mesh.vertex_colors is None


@pytest.mark.parametrize(
    "text",
    [
        TRIANGLE.replace("\n", "\r") + "f 1 2 3\r",  # classic Mac OS line endings
        TRIANGLE.replace("\n", "\r\n") + "f 1 2 3\r\n",
        "\ufeff" + TRIANGLE + "f 1 2 3\n",  # a UTF-8 byte order mark, as some Windows tools write
        "v 0 0 0\nv 1 \\\n  0 0\nv 0 1 0\nf 1 \\  \n 2 \\\n3\n",  # line continuations
    ],
)
def test_line_endings_continuations_and_a_byte_order_mark(tmp_path, text):
    mesh = load_obj(write(tmp_path, text))
    assert mesh.vertices.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0]]
    assert mesh.faces.tolist() == [[0, 1, 2]]


def test_errors_after_a_continued_line_name_the_right_line(tmp_path):
    with pytest.raises(InputError) as caught:
        load_obj(write(tmp_path, "v 0 0 \\\n0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n"))
    assert caught.value.where == "line 5"


def read_line_by_line(text: str) -> Mesh:
    """What the line-by-line parser makes of ``text`` (load_obj's fallback and its errors)."""
    parser = _ObjParser("mesh.obj")
    for number, statement in obj_statements(_obj_lines(text)):
        parser.parse_line(statement, number)
    return parser.finish()


def same_mesh(a: Mesh, b: Mesh) -> bool:
    colors = (a.vertex_colors is None) == (b.vertex_colors is None) and (
        a.vertex_colors is None or torch.equal(a.vertex_colors, b.vertex_colors)
    )
    return torch.equal(a.vertices, b.vertices) and torch.equal(a.faces, b.faces) and colors


# Pieces of OBJ lines: mostly the common form, now and then (1 in 200) a flaw.
SPACE = st.sampled_from([" ", " ", "\t", "  "])
FLAWED_NUMBERS = ["1e39", "nan", "1_0", "0x1", "1e", "--1", "inf", "2.5.1"]
FLAWED_CORNERS = ["0", "-1", "-2", "+1", "99999999999999999999", "1/x", "1/2/3/4", "1/2/"]
FLAWED_LINES = [
    "f 1 2 3 # c", "v 0 0 0 # c", " v 0 0 0", "v 0 0", "f 1 2", "o", "hello", "f 1 2 \\",
]  # fmt: skip


def sometimes(draw, flaws: list[str], value: str) -> str:
    return draw(st.sampled_from(flaws)) if draw(st.integers(0, 199)) == 0 else value


@st.composite
def obj_texts(draw):
    count = draw(st.sampled_from([3, 3, 4, 6]))
    vertices = draw(st.integers(1, 8))
    numbers = st.one_of(
        st.floats(-1e6, 1e6).map(repr),
        st.sampled_from(["0", "-0", "+1.5", ".5", "5.", "1e-3", "2E+2", "3.4e38", "-3.4e38"]),
    )
    lines = []
    for _ in range(vertices):
        values = [sometimes(draw, FLAWED_NUMBERS, draw(numbers)) for _ in range(count)]
        if count == 6:
            colors = ["0", "1", "0.25", sometimes(draw, ["1.5"], "1.")]
            values[3:] = [draw(st.sampled_from(colors)) for _ in range(3)]
        end = draw(st.sampled_from(["", " "]))
        lines.append("v" + "".join(draw(SPACE) + v for v in values) + end)
    for _ in range(draw(st.integers(1, 6))):
        corners = [
            sometimes(draw, FLAWED_CORNERS, str(draw(st.integers(1, vertices))))
            + draw(st.sampled_from(["", "", "/1", "//2", "/3/4", "/"]))
            for _ in range(draw(st.integers(3, 6)))
        ]
        lines.append("f" + "".join(draw(SPACE) + c for c in corners))
    extras = ["# a comment", "", "vt 0.5 0.5", "vn 0 0 1", "g part", "s off"]
    for _ in range(draw(st.integers(0, 3))):
        line = sometimes(draw, FLAWED_LINES, draw(st.sampled_from(extras)))
        lines.insert(draw(st.integers(0, len(lines))), line)
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=300, deadline=None)
@given(obj_texts())
def test_the_bulk_reader_makes_what_the_line_by_line_parser_makes(text):
    fast = _load_common_obj(_obj_lines(text), "mesh.obj") if "\\" not in text else None
    if fast is not None:  # what the bulk reader takes, the parser takes alike
        assert same_mesh(fast, read_line_by_line(text))
    else:  # what it declines, load_obj parses line by line: no flaw can pass unreported
        event("line by line")


@pytest.mark.parametrize(
    "text",
    [
        TRIANGLE + "f 1 2 3\n",
        "# comment\nv 0\t0 0\nv 1 0\t 0 \nv 0 1 0\n" + "vt 0 0\nvn 0 0 1\ng x\nf 1/1/1 2//1 3/1\n",
        "v 0 0 0 1\nv 1 0 0 1\nv 1 1 0 1\nv 0 1 0 1\nf 1 2 3 4\nf 1 2 3 4 1 2\n",
        "v 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 0 1 0 0 0 1\nf 1 2 3\n",
    ],
)
def test_common_files_are_read_in_bulk_exactly(text):
    fast = _load_common_obj(_obj_lines(text), "mesh.obj")
    assert fast is not None and same_mesh(fast, read_line_by_line(text))


def test_a_w_beyond_float32_is_left_to_the_line_by_line_parser():
    # Found by hypothesis: the bulk reader took it (w is ignored), the parser refuses it.
    assert _load_common_obj(_obj_lines("v 0.0 0.0 0.0 1e39\nf 1 1 1"), "mesh.obj") is None


def test_a_large_mesh_is_read_in_bulk_exactly(tmp_path):
    mesh = icosphere(3)
    save_obj(mesh, tmp_path / "s.obj", vertex_colors=torch.rand(mesh.vertices.shape))
    text = (tmp_path / "s.obj").read_text()
    fast = _load_common_obj(_obj_lines(text), "mesh.obj")
    assert fast is not None and same_mesh(fast, read_line_by_line(text))
    assert torch.equal(fast.vertices, mesh.vertices) and torch.equal(fast.faces, mesh.faces)


def test_an_obj_file_over_the_size_limit_is_refused_unread(tmp_path):
    path = tmp_path / "huge.obj"
    with open(path, "wb") as handle:  # sparse: no disk used, and never read
        handle.truncate(MAX_OBJ_BYTES + 1)
    with pytest.raises(InputError) as caught:
        load_obj(path)
    assert str(caught.value) == (
        f"{path}: 1,073,741,825 bytes: more than the limit of 1,073,741,824 bytes"
    )


# The limits, lowered so that small files cross them; "# x" after a statement makes the file
# go line by line.
@pytest.mark.parametrize("bulk", [True, False])
@pytest.mark.parametrize(
    ("limit", "text", "where", "message"),
    [
        ("MAX_MESH_VERTICES", TRIANGLE + "v 1 1 0\nf 1 2 3\n", "line 4", "more than 3 vertices"),
        ("MAX_MESH_FACES", TRIANGLE + "f 1 2 3\nf 1 2 3\nf 1 2 3\n", "line 6", "more than 2 faces"),
        ("MAX_MESH_FACES", TRIANGLE + "f 1 2 3\nf 1 2 3 1\n", "line 5", "more than 2 faces"),
    ],
)
def test_meshes_over_the_vertex_and_face_limits_are_refused(
    tmp_path, monkeypatch, bulk, limit, text, where, message
):
    monkeypatch.setattr(mesh_module, limit, 3 if limit == "MAX_MESH_VERTICES" else 2)
    path = write(tmp_path, text if bulk else "# x\n" + text.replace("\nf", " # x\nf", 1))
    with pytest.raises(InputError) as caught:
        load_obj(path)
    shift = 0 if bulk else 1
    assert caught.value.where == f"line {int(where.split()[1]) + shift}"
    assert caught.value.message.startswith(message)


def test_forward_references_are_allowed(tmp_path):
    assert load_obj(write(tmp_path, "f 1 2 3\n" + TRIANGLE)).faces.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        (TRIANGLE + "f 1 2 40\n", "line 4", "face index 40 out of range (the file has 3 vertices)"),
        ("f 1 2 9\n" + TRIANGLE, "line 1", "face index 9 out of range (the file has 3 vertices)"),
        (
            TRIANGLE + "f 1 2 99999999999999999999\n",
            "line 4",
            "face index 99999999999999999999 out of range (the file has 3 vertices)",
        ),
        (
            "v 0 0 0\nf -1 -2 -3\n" + TRIANGLE,
            "line 2",
            "face index -2 out of range (1 vertex defined before this line)",
        ),
        (TRIANGLE + "f 0 1 2\n", "line 4", "face index 0 is invalid (OBJ indices start at 1)"),
        (TRIANGLE + "f 1 2\n", "line 4", "a face needs at least 3 vertices, got 2"),
        (
            TRIANGLE + "f 1 2 x\n",
            "line 4",
            'face vertex "x" is not i, i/t, i//n or i/t/n with integers',
        ),
        (
            TRIANGLE + "f 1 2 3/1/1/1\n",
            "line 4",
            'face vertex "3/1/1/1" is not i, i/t, i//n or i/t/n with integers',
        ),
        ("v 0 0 0\nv 1 zero 0\n", "line 2", '"zero" is not a number'),
        ("v 0 0 0\nv 1 nan 0\n", "line 2", '"nan" is not a finite number'),
        ("v 0 0 0\nv 1 0 -inf\n", "line 2", '"-inf" is not a finite number'),
        ("v 0 0\n", "line 1", 'expected "v x y z", "v x y z w" or "v x y z r g b", got 2 values'),
        (
            "v 0 0 0 1 1\n",
            "line 1",
            'expected "v x y z", "v x y z w" or "v x y z r g b", got 5 values',
        ),
        (
            "v 0 0 \\\n 0 1 \\\n 1\n",
            "line 1",
            'expected "v x y z", "v x y z w" or "v x y z r g b", got 5 values',
        ),
        ("v 0 0 0 w\n", "line 1", '"w" is not a number'),
        (
            "v 0 0 0\rv 1 0 0\rv 1 1\r",
            "line 3",
            'expected "v x y z", "v x y z w" or "v x y z r g b", got 2 values',
        ),
        (
            "\ufeffv 0 0 0\r\nf 1 1 2\r\n",
            "line 2",
            "face index 2 out of range (the file has 1 vertex)",
        ),
        ("v 0 0 0 0 255 0\n", "line 1", "vertex color 255 is outside [0, 1]"),
        (
            "# colors\nv 0 0 0 1 1 1\nv 1 0 0\n",
            "line 3",
            "this vertex has no color but the first vertex (line 2) does; "
            "give every vertex a color or none",
        ),
        (
            "v 0 0 0\nv 1 0 0 1 1 1\n",
            "line 2",
            "this vertex has a color but the first vertex (line 1) does not; "
            "give every vertex a color or none",
        ),
        (TRIANGLE + "hello world\n", "line 4", 'unknown statement "hello" (not OBJ)'),
        (TRIANGLE, "", "no faces"),
        ("", "", "no faces"),
    ],
)
def test_malformed_files(tmp_path, text, where, message):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as caught:
        load_obj(path)
    assert (caught.value.source, caught.value.where, caught.value.message) == (
        str(path),
        where,
        message,
    )


def test_error_message_is_one_line_naming_the_file(tmp_path):
    path = write(tmp_path, TRIANGLE + "f 1 2 40\n")
    with pytest.raises(InputError, match=r"mesh\.obj: line 4: face index 40 out of range"):
        load_obj(path)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "mesh.obj"
    path.write_bytes(b"v 0 0 0\n# caf\xe9\n")
    with pytest.raises(InputError) as caught:
        load_obj(path)
    assert caught.value.where == "line 2"
    assert caught.value.message == "not UTF-8 text (byte 0xe9 at byte 6 of the line)"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError) as caught:
        load_obj(tmp_path / "nope.obj")
    assert str(caught.value) == f"{tmp_path / 'nope.obj'}: no such file"
    with pytest.raises(InputError) as caught:
        load_obj(tmp_path)
    assert str(caught.value) == f"{tmp_path}: is a directory, not a file"


# --- writing -----------------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path):
    generator = torch.Generator().manual_seed(0)
    vertices = torch.randn(50, 3, generator=generator) * torch.logspace(-8, 8, 50)[:, None]
    colors = torch.rand(50, 3, generator=generator)
    faces = torch.randint(0, 50, (70, 3), generator=generator)
    path = tmp_path / "out.obj"
    save_obj(Mesh(vertices, faces, colors), path)
    loaded = load_obj(path)
    assert torch.equal(loaded.vertices, vertices)
    assert torch.equal(loaded.faces, faces)
    assert torch.equal(loaded.vertex_colors, colors)


def test_save_with_explicit_colors_and_without(tmp_path):
    mesh = icosphere(1)
    colors = torch.rand(mesh.num_vertices, 3)
    save_obj(mesh, tmp_path / "a.obj", vertex_colors=colors)
    assert torch.equal(load_obj(tmp_path / "a.obj").vertex_colors, colors)
    save_obj(mesh, tmp_path / "b.obj")
    assert load_obj(tmp_path / "b.obj").vertex_colors is None


def test_save_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.obj"
    path.write_text("old")
    save_obj(cube(), path)
    assert load_obj(path).num_faces == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.obj"]


def test_save_refuses_non_finite_and_unwritable(tmp_path):
    mesh = cube()
    mesh.vertices[0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        save_obj(mesh, tmp_path / "nan.obj")
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(InputError, match="cannot create folder"):
        save_obj(cube(), tmp_path / "file" / "x.obj")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


# --- primitives --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", range(5))
def test_icosphere_counts_and_radius(level):
    mesh = icosphere(level, radius=2.5)
    assert mesh.num_faces == 20 * 4**level
    assert mesh.num_vertices == 10 * 4**level + 2
    assert mesh.vertices.dtype == torch.float32
    torch.testing.assert_close(
        mesh.vertices.norm(dim=1), torch.full((mesh.num_vertices,), 2.5), rtol=1e-6, atol=0
    )
    assert len(torch.unique(mesh.vertices, dim=0)) == mesh.num_vertices


def test_icosphere_default_level_is_2():
    assert icosphere().num_faces == 320


@pytest.mark.parametrize(
    "mesh", [icosphere(0), icosphere(3), cube(), cube(0.5)], ids=["ico0", "ico3", "cube", "cube05"]
)
def test_closed_meshes_wind_outward_and_are_watertight(mesh):
    centroids = mesh.vertices[mesh.faces].mean(dim=1)
    assert ((mesh.face_normals() * centroids).sum(dim=1) > 0).all()
    # Every undirected edge is shared by exactly two faces, in opposite directions.
    directed = mesh.faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2).tolist()
    assert len(set(map(tuple, directed))) == len(directed)
    undirected = Counter(tuple(sorted(edge)) for edge in directed)
    assert set(undirected.values()) == {2}
    assert mesh.num_vertices - len(undirected) + mesh.num_faces == 2  # Euler characteristic


def test_cube_and_plane_shapes():
    box = cube(3.0)
    assert (box.num_vertices, box.num_faces) == (8, 12)
    assert box.vertices.abs().eq(1.5).all()
    square = plane(4.0)
    assert (square.num_vertices, square.num_faces) == (4, 2)
    assert square.vertices[:, 1].eq(0).all() and square.vertices[:, [0, 2]].abs().eq(2).all()
    assert square.face_normals().tolist() == [[0, 1, 0], [0, 1, 0]]


@pytest.mark.parametrize(
    ("make", "args"), [(icosphere, (-1,)), (icosphere, (2, 0.0)), (cube, (-1.0,)), (plane, (0.0,))]
)
def test_primitives_refuse_bad_arguments(make, args):
    with pytest.raises(ValueError):
        make(*args)


# --- Mesh --------------------------------------------------------------------------------------


def test_face_normals_are_unit_and_zero_for_degenerate_faces():
    vertices = torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 3, 0], [4, 0, 0]], requires_grad=True)
    mesh = Mesh(vertices, torch.tensor([[0, 1, 2], [0, 1, 3], [1, 1, 2]]))
    normals = mesh.face_normals()
    assert normals.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    normals.sum().backward()
    assert torch.isfinite(vertices.grad).all()


def test_mesh_checks_shapes():
    with pytest.raises(ValueError, match="vertices"):
        Mesh(torch.zeros(3, 2), torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="faces"):
        Mesh(torch.zeros(3, 3), torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="vertex_colors"):
        Mesh(torch.zeros(3, 3), torch.zeros(1, 3, dtype=torch.int64), torch.zeros(2, 3))


# --- real data ---------------------------------------------------------------------------------


@needs_softras
@pytest.mark.parametrize(
    ("name", "vertices", "faces"),
    [
        ("sphere_642.obj", 642, 1280),
        ("plane.obj", 1352, 2700),
        ("spot_triangulated.obj", 2930, 5856),
    ],
)
def test_softras_meshes_load(name, vertices, faces):
    mesh = load_obj(SOFTRAS_DATA / name)
    assert (mesh.num_vertices, mesh.num_faces) == (vertices, faces)


@needs_softras
def test_softras_sphere_winds_outward():
    mesh = load_obj(SOFTRAS_DATA / "sphere_642.obj")
    centroids = mesh.vertices[mesh.faces].mean(dim=1)
    assert ((mesh.face_normals() * centroids).sum(dim=1) > 0).all()
