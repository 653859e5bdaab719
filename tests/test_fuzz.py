"""Fuzzing the readers of the user's files: the scene loader and the OBJ reader.

Whatever they are given, they either succeed or raise :class:`~microdr.errors.InputError` whose
message is one printable line starting with the name of the file at fault; any other exception
fails the test. Inputs: random bytes and text; valid scenes with random JSON values put at random
places, keys deleted and keys added; valid OBJ text with lines, tokens and bytes mutated.

``max_examples`` bounds the time (the whole file runs in seconds); ``deadline=None`` because
examples that build meshes vary in time; no example database, so nothing is written into the
repository.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microdr.errors import InputError, show_value
from microdr.io.mesh import load_obj
from microdr.io.scene import load_scene, parse_scene

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

SCENE = "fuzzed.json"  # the name the scene's errors must carry
VALID_OBJ = """\
# a colored quad and a triangle, with statements microDR ignores
o quad
v -1 -1 0 1 0 0
v 1 -1 0 0 1 0
v 1 1 0 0 0 1
v -1 1 0 1 1 1
vt 0 0
vn 0 0 1
f 1/1/1 2/1/1 3/1/1 4/1/1
f -4//1 -3//1 -2//1
f 1 3 4
"""
VALID_SCENE = {
    "image": {"width": 8, "height": 6},
    "render": {
        "sigma": 1e-4, "gamma": 1e-4, "eps": 1e-3, "eps_d": 1e-4, "background": [0, 0, 0.5],
        "cull_backfaces": False, "backend": "reference",
    },
    "meshes": [
        {"file": "mesh.obj",
         "transform": {"translate": [0, 0.2, 0], "rotate": [0, 45, 0], "scale": 0.8}},
        {"primitive": "icosphere", "subdivisions": 0, "color": [0.9, 0.6, 0.35]},
        {"primitive": "cube", "transform": {"scale": [1, 2, 3]},
         "color": {"per_face": [[0, 0.5, 1]] * 12}},
        {"primitive": "plane", "color": {"per_vertex": [[1, 1, 1]] * 4}},
    ],
    "cameras": [
        {"eye": [0, 1, 4], "target": [0, 0, 0], "up": [0, 1, 0], "fov": 45, "near": 0.1,
         "far": 100},
        {"orbit": {"distance": 5, "elevation": 30, "azimuth": -40}, "projection": "orthographic",
         "half_height": 1.5},
    ],
    "lights": {"ambient": 0.3, "directional": [{"direction": [0.5, 1, 0.8], "intensity": 0.7}]},
    "optimize": {
        "parameters": ["vertices", "colors"], "vertex_parametrization": "offset",
        "loss": {"silhouette_iou": 1, "laplacian": 0.03}, "mask_rgb": False, "lr": 0.01,
        "betas": [0.9, 0.999], "lr_schedule": "cosine", "iterations": 10,
        "sigma_schedule": {"start": 1e-3, "end": 1e-4}, "views_per_step": 1,
    },
}  # fmt: skip

# Words and numbers the readers give meaning to, so that mutations reach past the first check.
WORDS = [
    "icosphere", "cube", "plane", "perspective", "orthographic", "per_vertex", "per_face",
    "vertices", "colors", "offset", "bounded", "cosine", "mesh.obj", "", ".", "fov", "eye",
    "orbit", "file", "primitive", "scale", "color", "start", "v", "f", "vt", "1/2/3", "-1//1",
]  # fmt: skip
NUMBERS = [0, -1, 1, 7, 180, 16384, 100000, 2**63, 10**30, 0.5, -0.0, 1e-320, 3e38, 1e39]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from(NUMBERS)
    | st.text(max_size=12)
    | st.sampled_from(WORDS)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(WORDS), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder holding the valid OBJ that the valid scene names."""
    path = tmp_path_factory.mktemp("fuzz")
    (path / "mesh.obj").write_text(VALID_OBJ, encoding="utf-8")
    return path


def check_outcome(read, *args, sources: set[str]) -> None:
    """Call ``read(*args)``: it may return, or raise an :class:`InputError` whose message is
    one printable line that starts with one of ``sources``; any other exception propagates."""
    try:
        read(*args)
    except InputError as error:
        text = str(error)
        assert text.isprintable(), text  # one line: no line breaks or control characters
        assert error.source in sources, text
        assert text.startswith(error.source + ": "), text


# --- (a) random bytes and text --------------------------------------------------------------

random_files = (
    st.binary(max_size=400)
    | st.text(max_size=400).map(str.encode)
    | json_values.map(lambda value: json.dumps(value).encode())
)


@FUZZ
@given(data=random_files)
def test_scene_loader_on_random_files(folder, data):
    path = folder / "random.json"
    path.write_bytes(data)
    check_outcome(load_scene, path, sources={str(path)})


@FUZZ
@given(data=random_files)
def test_obj_reader_on_random_files(folder, data):
    path = folder / "random.obj"
    path.write_bytes(data)
    check_outcome(load_obj, path, sources={str(path)})


# --- (b) mutations of a valid scene ---------------------------------------------------------


def places(value, path: tuple = ()) -> list[tuple]:
    """The path (keys and indices) of ``value`` and of every value inside it."""
    found = [path]
    if isinstance(value, dict):
        items = value.items()
    else:
        items = enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found += places(item, path + (key,))
    return found


@st.composite
def mutated_scenes(draw) -> object:
    """The valid scene after one to three mutations: a random value put at a random place, a
    key or item deleted, or a key or item added."""
    data: object = copy.deepcopy(VALID_SCENE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(places(data)))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:  # the whole scene
            data = draw(json_values) if action == "replace" else data
            continue
        *parents, last = path
        container = data
        for key in parents:
            container = container[key]
        if action == "replace":
            container[last] = draw(json_values)
        elif action == "delete":
            del container[last]
        elif isinstance(container, dict):
            container[draw(st.text(max_size=8) | st.sampled_from(WORDS))] = draw(json_values)
        else:
            container.insert(last, draw(json_values))
    return data


def test_the_unmutated_scene_is_valid(folder):
    scene = parse_scene(copy.deepcopy(VALID_SCENE), SCENE, folder)
    assert [m.name for m in scene.meshes] == ["mesh.obj", "icosphere", "cube", "plane"]
    assert scene.meshes[0].mesh.num_faces == 4 and scene.optimize.views_per_step == 1


@FUZZ
@given(data=mutated_scenes())
def test_scene_parser_on_mutated_scenes(folder, data):
    check_outcome(parse_scene, data, SCENE, folder, sources={SCENE, str(folder / "mesh.obj")})


# --- (c) mutations of a valid OBJ -----------------------------------------------------------

obj_tokens = (
    st.sampled_from(WORDS) | st.sampled_from([str(n) for n in NUMBERS]) | st.text(max_size=8)
)


@st.composite
def mutated_objs(draw) -> bytes:
    """The valid OBJ after one to four mutations of its lines, tokens or bytes."""
    lines = VALID_OBJ.split("\n")
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "swap", "token", "insert"]))
        if action == "delete" and len(lines) > 1:
            del lines[index]
        elif action == "duplicate":
            lines.insert(index, lines[index])
        elif action == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[index], lines[other] = lines[other], lines[index]
        elif action == "token":
            tokens = lines[index].split() or [""]
            tokens[draw(st.integers(0, len(tokens) - 1))] = draw(obj_tokens)
            lines[index] = " ".join(tokens)
        else:
            lines.insert(index, draw(st.text(max_size=20)))
    data = "\n".join(lines).encode("utf-8")
    cut = draw(st.integers(0, len(data)))
    # Raw bytes (maybe not UTF-8) at a random place, or none, and maybe the end cut off.
    data = data[:cut] + draw(st.binary(max_size=3)) + data[cut:]
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@FUZZ
@given(data=mutated_objs())
def test_obj_reader_on_mutated_objs(folder, data):
    path = folder / "mutated.obj"
    path.write_bytes(data)
    check_outcome(load_obj, path, sources={str(path)})


# --- the message helpers --------------------------------------------------------------------

@FUZZ
@given(value=json_values)
def test_show_value_is_short_and_true_to_json(value):
    shown = show_value(value)
    full = json.dumps(value)
    assert shown == full if len(full) <= 40 else shown == full[:37] + "..."


def test_show_value_of_deep_and_long_values():
    deep: list = []
    for _ in range(100_000):  # far deeper than json.dumps, or any recursion, can go
        deep = [deep]
    assert show_value(deep) == "[" * 37 + "..."
    assert show_value(list(range(10**6))) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11..."


@FUZZ
@given(source=st.text(), where=st.text(), message=st.text())
def test_an_input_error_is_one_printable_line(source, where, message):
    text = str(InputError(source, where, message))
    assert text.isprintable()
    joined = ": ".join(part for part in (source, where, message) if part)
    # Printable text is kept as it is; other characters become longer escapes.
    assert text == joined if joined.isprintable() else len(text) > len(joined)
