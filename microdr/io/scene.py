"""The scene file: JSON in, validated frozen dataclasses out.

Every problem is one :class:`InputError` naming the file, the JSON path and what was expected,
e.g. ``scene.json: cameras[1].fov: expected a number in (0, 180), got "wide"``. The small reader
classes at the end of this module hold every message format, so the parsing functions read one
field per line.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..defaults import BACKENDS, EPS, EPS_D, FAR, GAMMA, NEAR, SIGMA, SMALLEST_EPS_D, SMALLEST_GAMMA
from ..errors import InputError, show_value
from .files import file_problem, read_text
from .mesh import BEYOND_FLOAT32, FLOAT32_MAX, Mesh, Texture, cube, icosphere, load_obj, plane

Vec3 = tuple[float, float, float]

MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 2**26
#: The most cameras a scene may have. Each camera is a target image to read, a render and a
#: sheet PNG to write, and a slice of the final render of all cameras at once (``(N, 4, H, W)``
#: float32: 4 GiB for 1024 cameras at 512 x 512). Multi-view data sets have tens to a few hundred
#: views (SoftRas's ShapeNet renders 24, DTU 49 to 64, NeRF's synthetic scenes 100 to 300).
MAX_CAMERAS = 1024
PROJECTIONS = ("perspective", "orthographic")
PRIMITIVES = ("icosphere", "cube", "plane")
OPTIMIZABLE = ("vertices", "translation", "scale", "colors", "light", "camera", "texture")
VERTEX_PARAMETRIZATIONS = ("offset", "bounded")
LR_SCHEDULES = ("constant", "cosine")
IMAGE_LOSS_TERMS = ("silhouette_iou", "rgb_l1", "rgb_l2")
LOSS_TERMS = IMAGE_LOSS_TERMS + ("laplacian", "flatten", "edge_length", "texture_smoothness")
DEFAULT_COLOR: Vec3 = (0.7, 0.7, 0.7)


# ---------------------------------------------------------------------------------------------
# The scene


@dataclass(frozen=True)
class RenderSettings:
    """How images are rendered: the ``image`` and ``render`` sections.

    - ``width``, ``height`` (``image.width``, ``image.height``): pixels, integers in
      ``[1, 16384]``, at most ``2**26`` pixels in all; default 256 x 256.
    - ``sigma``: sharpness of the soft edges in screen units squared, > 0; default ``1e-4``.
    - ``gamma``: depth softmax temperature, >= ``1e-30`` (``defaults.SMALLEST_GAMMA``);
      default ``1e-4``.
    - ``eps``: the background's normalized inverse depth, in ``[0, 1)``; default ``1e-3``.
    - ``eps_d``: faces whose coverage of a pixel is below this are skipped there, in
      ``[1e-30, 0.5)`` (``defaults.SMALLEST_EPS_D``); default ``1e-4``.
    - ``background``: RGB, each in ``[0, 1]``; default ``[0, 0, 0]``.
    - ``cull_backfaces``: drop faces that wind clockwise on screen; default ``false``.
    - ``backend``: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"reference"``; default ``"auto"``.
    """

    width: int = 256
    height: int = 256
    sigma: float = SIGMA
    gamma: float = GAMMA
    eps: float = EPS
    eps_d: float = EPS_D
    background: Vec3 = (0.0, 0.0, 0.0)
    cull_backfaces: bool = False
    backend: str = "auto"


@dataclass(frozen=True)
class Transform:
    """A mesh's placement in the world: ``v_world = R @ (scale * v) + translate``.

    - ``translate``: ``[x, y, z]`` in world units; default ``[0, 0, 0]``.
    - ``rotate``: XYZ Euler angles in degrees, ``R = Rz @ Ry @ Rx``; default ``[0, 0, 0]``.
    - ``scale``: a number > 0 or ``[sx, sy, sz]`` each > 0 (held here as three numbers);
      default 1.
    """

    translate: Vec3 = (0.0, 0.0, 0.0)
    rotate: Vec3 = (0.0, 0.0, 0.0)
    scale: Vec3 = (1.0, 1.0, 1.0)

    def rotation(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The rotation matrix ``R = Rz @ Ry @ Rx`` ``(3, 3)``."""
        cx, cy, cz = (math.cos(math.radians(a)) for a in self.rotate)
        sx, sy, sz = (math.sin(math.radians(a)) for a in self.rotate)
        rx = [[1, 0, 0], [0, cx, -sx], [0, sx, cx]]
        ry = [[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]
        rz = [[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]
        # Composed in float64 so that float32 results are correctly rounded.
        rx, ry, rz = (torch.tensor(m, dtype=torch.float64) for m in (rx, ry, rz))
        return (rz @ ry @ rx).to(dtype=dtype, device=device)

    def apply(self, vertices: torch.Tensor) -> torch.Tensor:
        """World positions ``(V, 3)`` of model-space ``vertices`` ``(V, 3)``.

        Same dtype and device as ``vertices``; differentiable with respect to them.
        """
        rotation = self.rotation(vertices.dtype, vertices.device)
        return (vertices * vertices.new_tensor(self.scale)) @ rotation.T + vertices.new_tensor(
            self.translate
        )


@dataclass(frozen=True, eq=False)
class SceneMesh:
    """One entry of ``meshes``.

    Exactly one of ``file`` (an OBJ path, relative to the scene file's folder) and ``primitive``
    (``"icosphere"``, ``"cube"`` of edge 2 or ``"plane"`` 2 x 2 in xz facing +y, all centered at
    the origin) is given. ``subdivisions`` (icosphere only): an integer in ``[0, 7]``, default 2;
    the unit icosphere then has ``20 * 4**subdivisions`` faces. ``transform``: see
    :class:`Transform`. ``color``: ``[r, g, b]`` for the whole mesh, ``{"per_vertex": [[r, g, b],
    ...]}`` (one per vertex) or ``{"per_face": [...]}`` (one per face), each in ``[0, 1]``;
    default: the OBJ's vertex colors if it has them, else ``[0.7, 0.7, 0.7]``. An OBJ whose
    material has a texture (``map_Kd``; :func:`microdr.io.mesh.load_obj`) is drawn with it unless
    ``color`` is given; a textured mesh must be the scene's only one, and unlit (no ``lights``).

    Fields: ``name`` is the ``file`` or ``primitive`` string as written (not unique); ``mesh`` is
    the mesh as loaded, untransformed; ``colors`` is float32 ``(V, 3)`` when ``color_mode`` is
    ``"vertex"`` and ``(F, 3)`` when it is ``"face"``; ``texture`` the texture it is drawn with
    (then ``colors`` are unused), or ``None``.
    """

    name: str
    mesh: Mesh = field(repr=False)  # tensors would flood the repr
    transform: Transform
    colors: torch.Tensor = field(repr=False)
    color_mode: str
    texture: Texture | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Camera:
    """One entry of ``cameras``: a look-at camera.

    - ``projection``: ``"perspective"`` (default) or ``"orthographic"``.
    - ``fov``: vertical field of view in degrees, in ``(0, 180)``; default 60. Perspective only
      (``None`` for orthographic cameras).
    - ``half_height``: half the visible height in world units, > 0; default 1. Orthographic only
      (``None`` for perspective cameras).
    - ``eye``: ``[x, y, z]``; or instead ``orbit``: ``{"distance": d, "elevation": el,
      "azimuth": az}`` (degrees; ``d`` > 0 required, ``el`` in ``[-90, 90]`` default 0, ``az``
      default 0) placing the eye at ``target + d * (cos el sin az, sin el, cos el cos az)``.
      The fields hold the resulting eye.
    - ``target``: default ``[0, 0, 0]``. ``up``: nonzero, default ``[0, 1, 0]``. ``eye`` must
      differ from ``target`` and ``eye - target`` must not be parallel to ``up``.
    - ``near``, ``far``: view depths with ``0 < near < far``; defaults 0.1 and 100.
    - ``fx_over_fy``: the horizontal focal length over the vertical one, > 0 (pixels that are
      not square); default 1.
    - ``principal_point``: ``[x, y]``, where the optical axis meets the image, in screen units
      (``microdr.conventions``); default ``[0, 0]``, the image's center.

    A camera read from a camera file (``cameras: {"from": ...}``, :mod:`microdr.io.camera_files`)
    is held as a look-at camera too: ``eye`` its center, ``up`` its image's up direction,
    ``target`` on its optical axis (the point nearest the world origin).
    """

    projection: str
    eye: Vec3
    target: Vec3
    up: Vec3
    fov: float | None
    half_height: float | None
    near: float
    far: float
    fx_over_fy: float = 1.0
    principal_point: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class CameraFile:
    """Where a scene's cameras were read from: ``cameras: {"from": PATH, "images": FOLDER}``.

    ``path``: the camera file, or COLMAP model folder, as found from the scene's folder.
    ``images``: one per camera, in the file's order, the image it names, in ``FOLDER`` (default
    the camera file's folder); a name without its file's suffix (NeRF's ``file_path``) is
    completed by :func:`microdr.io.camera_files.image_files`.
    """

    path: Path
    images: tuple[Path, ...]


@dataclass(frozen=True)
class DirectionalLight:
    """One entry of ``lights.directional``.

    - ``direction``: the direction towards the light, nonzero (required); held here normalized
      to unit length.
    - ``intensity``: >= 0; default 1.
    """

    direction: Vec3
    intensity: float = 1.0


@dataclass(frozen=True)
class Lights:
    """The optional ``lights`` section; without it surfaces show their plain colors.

    - ``ambient``: >= 0; default 0.5.
    - ``directional``: an array of :class:`DirectionalLight`; default none.
    """

    ambient: float = 0.5
    directional: tuple[DirectionalLight, ...] = ()


@dataclass(frozen=True)
class RemeshSettings:
    """The ``optimize.remesh`` section: remesh the free mesh every few iterations
    (:func:`microdr.optimize.remesh.remesh`, one pass: split, collapse, flip, tangential smoothing), so
    that vertices go where the shape needs them; needs ``"vertices"`` among the free parameters
    and closed manifold meshes.

    - ``edge_length``: the target edge length in world units, > 0: a number, or ``[start, end]``
      for a length that goes geometrically from ``start`` at the first remesh to ``end`` at the
      last (coarse to fine); held as ``(start, end)``. Required.
    - ``every``: remesh after every ``every`` iterations, an integer >= 1; default 25.
    - ``until``: the fraction of the iterations, in ``(0, 1]``, after which no more remeshing
      happens (the mesh then settles on the last one's faces); default 0.8.
    """

    edge_length: tuple[float, float]
    every: int = 25
    until: float = 0.8


@dataclass(frozen=True)
class OptimizeSettings:
    """The optional ``optimize`` section.

    - ``parameters``: a non-empty array of distinct names among ``"vertices"``,
      ``"translation"``, ``"scale"``, ``"colors"``, ``"light"``, ``"camera"``, ``"texture"`` (the
      texture of a scene's only mesh, which needs texture coordinates); default ``None``:
      chosen from the targets by the optimizer (``microdr.optimize.loop.resolve_settings``).
    - ``vertex_parametrization``: ``"offset"`` (default) or ``"bounded"``.
    - ``loss``: weights >= 0 for ``silhouette_iou``, ``rgb_l1``, ``rgb_l2``, ``laplacian``,
      ``flatten``, ``edge_length``, ``texture_smoothness``; missing ones are 0 and at least one
      of the first three must be > 0. Held here with all seven keys; default ``None``: chosen by
      the optimizer.
    - ``mask_rgb``: weigh the RGB terms by the target's alpha, so that only the object's colors
      count; default ``false``.
    - ``lr``: Adam's learning rate, in ``(0, 10]``; default 0.01.
    - ``betas``: Adam's ``[beta1, beta2]``, each in ``[0, 1)``; default ``[0.9, 0.99]`` (as
      SoftRas's beta2: 0.999 remembers squared gradients for about 1000 iterations, so steps
      shrink to a fraction of ``lr`` as the gradients fall, and colors near 0 or 1, whose
      sigmoid gradients fall fastest, stall short of their targets).
    - ``lr_schedule``: ``"constant"`` (default) or ``"cosine"`` (from ``lr`` down to 0 over the
      iterations).
    - ``iterations``: an integer in ``[1, 10000000]``; default 1000 (shape and color from one
      RGB image: 500 leave the colors about 0.1 short of a red disc's, 24 dB; 1000 reach 31 dB,
      ``scripts/rgb_targets.py``).
    - ``sigma_schedule``: ``{"start": s0, "end": s1}``, both > 0: ``render.sigma`` goes
      geometrically from ``s0`` at the first iteration to ``s1`` at the last (coarse to fine);
      held here as ``(s0, s1)``; default ``None``: chosen by the optimizer
      (``microdr.optimize.loop.resolve_settings``).
    - ``views_per_step``: how many cameras, drawn at random, each iteration renders, an integer
      from 1 to the number of cameras to fit (not held out); default ``None``: all of them.
    - ``holdout``: cameras whose targets never enter the loss, only the metrics (held-out
      views): ``"odd"`` (cameras 1, 3, 5, ...), ``"even"`` (0, 2, 4, ...), ``"every:K"`` (0, K,
      2K, ..., K >= 2) or an array of distinct camera indices; at least one camera must be left
      to fit (:func:`held_out_views`). Default ``None``: none.
    - ``remesh``: remeshing during the run (:class:`RemeshSettings`), ``{"edge_length": L,
      "every": K, "until": u}``; default ``None``: the start mesh's faces throughout.
    - ``texture_resolution``: ``[width, height]`` in texels, each from 1 to 4096: a free
      ``"texture"`` starts gray (0.5) at that size instead of from the mesh's own texture;
      default ``None``. The loss term ``texture_smoothness`` weighs the mean squared difference
      of neighbouring texels.
    """

    parameters: tuple[str, ...] | None = None
    vertex_parametrization: str = "offset"
    loss: dict[str, float] | None = None
    mask_rgb: bool = False
    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    lr_schedule: str = "constant"
    iterations: int = 1000
    sigma_schedule: tuple[float, float] | None = None
    views_per_step: int | None = None
    holdout: str | tuple[int, ...] | None = None
    remesh: RemeshSettings | None = None
    texture_resolution: tuple[int, int] | None = None


@dataclass(frozen=True)
class Scene:
    """A whole scene file: ``meshes`` (required, may be empty), ``cameras`` (required, at least
    one), optional ``image``, ``render``, ``lights`` and ``optimize`` sections.

    ``source`` is the scene file's name as the user gave it; ``lights`` and ``optimize`` are
    ``None`` when their sections are absent; ``camera_file`` is ``None`` unless the cameras come
    from a camera file.
    """

    source: str
    render: RenderSettings
    meshes: tuple[SceneMesh, ...]
    cameras: tuple[Camera, ...]
    lights: Lights | None
    optimize: OptimizeSettings | None
    camera_file: CameraFile | None = None


# ---------------------------------------------------------------------------------------------
# Parsing


def load_scene(path: str | os.PathLike) -> Scene:
    """Read and validate a scene file; mesh files are found relative to its folder."""
    return parse_scene(read_json(path), str(path), Path(path).parent)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's value, objects as :class:`_JSONObject`; bad JSON is one :class:`InputError`
    naming the file and the line."""
    source = str(path)
    text = read_text(path)
    try:
        return json.loads(text, object_pairs_hook=_JSONObject.from_pairs)
    except json.JSONDecodeError as error:
        raise InputError(
            source, f"line {error.lineno} column {error.colno}", f"invalid JSON: {error.msg}"
        ) from None
    except (ValueError, RecursionError) as error:
        # Integers longer than Python's digit limit, or nesting deeper than the recursion limit.
        raise InputError(source, "", f"invalid JSON: {error}") from None


def parse_scene(data: object, source: str, base_dir: Path) -> Scene:
    """Validate parsed JSON ``data``; ``source`` names the file in errors, ``base_dir`` is where
    relative mesh paths start.
    """
    root = _Node(data, source).object(
        ("image", "render", "meshes", "cameras", "lights", "optimize")
    )
    # In file order, so that the first mistake is the one reported.
    render = _render_settings(root["image"], root["render"])
    meshes = tuple(_scene_mesh(node, base_dir) for node in root["meshes"].array())
    camera_file = None
    if isinstance(root["cameras"].value, dict):
        if "from" not in root["cameras"].value:
            root["cameras"].expected('an array or {"from": PATH} (a camera file)')
        from .camera_files import read_cameras  # it reads JSON with this module's readers

        size = (render.width, render.height) if root["image"].given else None
        cameras, camera_file, size = read_cameras(root["cameras"], base_dir, size)
        render = replace(render, width=size[0], height=size[1])
    else:
        cameras = tuple(
            _camera(node) for node in root["cameras"].array(min_length=1, max_length=MAX_CAMERAS)
        )
    textured = [i for i, mesh in enumerate(meshes) if mesh.texture is not None]
    if textured and len(meshes) > 1:
        root["meshes"].fail(f"mesh {textured[0]} is textured: a textured mesh must be the scene's only one")
    if textured and root["lights"].given:
        root["lights"].fail("lights do not shade textured meshes: remove them, or give the mesh a color")
    return Scene(
        source=source,
        render=render,
        meshes=meshes,
        cameras=cameras,
        lights=_lights(root["lights"]) if root["lights"].given else None,
        optimize=_optimize(root["optimize"], len(cameras)) if root["optimize"].given else None,
        camera_file=camera_file,
    )


def _render_settings(image_node: _Node, render_node: _Node) -> RenderSettings:
    default = RenderSettings()
    image = image_node.object(("width", "height"), required=False)
    # The pixel count first, from the values as given: an absurd size is refused with the
    # memory it would need, before a side is reported out of range.
    asked = [
        node.value if node.given else fallback
        for node, fallback in ((image["width"], default.width), (image["height"], default.height))
    ]
    if all(_countable_side(side) for side in asked):
        problem = too_many_pixels(*asked)
        if problem:
            image_node.fail(problem)
    side = _Interval(1, MAX_IMAGE_SIDE)
    width = image["width"].integer(side, default=default.width)
    height = image["height"].integer(side, default=default.height)
    render = render_node.object(
        ("sigma", "gamma", "eps", "eps_d", "background", "cull_backfaces", "backend"),
        required=False,
    )
    return RenderSettings(
        width=width,
        height=height,
        sigma=render["sigma"].number(_POSITIVE, default=default.sigma),
        gamma=render["gamma"].number(_Interval(SMALLEST_GAMMA), default=default.gamma),
        eps=render["eps"].number(_Interval(0, 1, open_hi=True), default=default.eps),
        eps_d=render["eps_d"].number(_Interval(SMALLEST_EPS_D, 0.5, open_hi=True), default=default.eps_d),
        background=render["background"].vector(3, _UNIT, default=default.background),
        cull_backfaces=render["cull_backfaces"].boolean(default=default.cull_backfaces),
        backend=render["backend"].choice(BACKENDS, default=default.backend),
    )


def too_many_pixels(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` pixels is refused before anything that size is
    allocated (with the memory one RGBA float32 image would take), or ``None`` if it is not."""
    if width * height <= MAX_IMAGE_PIXELS:
        return None
    gib = width * height * 4 * 4 / 2**30
    return (
        f"{width} x {height} is {width * height} pixels, more than the limit of 2**26 = "
        f"{MAX_IMAGE_PIXELS}; one RGBA float32 image that size needs {gib:.1f} GiB"
    )


def _countable_side(value: object) -> bool:
    """Whether ``value`` is an integer side whose memory :func:`too_many_pixels` can state (one
    of 400 digits overflows float division; the range check reports it)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**63


#: How :func:`mesh_preview_scene` looks at a mesh: vertical field of view and orbit angles (deg).
PREVIEW_FOV, PREVIEW_ELEVATION, PREVIEW_AZIMUTH = 40.0, 20.0, 30.0


def mesh_preview_scene(path: str | os.PathLike, width: int = 256, height: int = 256) -> Scene:
    """A scene that shows the OBJ file ``path`` whole, for ``microdr render mesh.obj``.

    The mesh keeps its coordinates and its vertex colors (else the default gray). One
    perspective camera (:data:`PREVIEW_FOV`) looks at the center of the mesh's bounding box from
    :data:`PREVIEW_ELEVATION` and :data:`PREVIEW_AZIMUTH`, far enough that the box's bounding
    sphere fits the view; near and far planes enclose that sphere. Lights: ambient 0.4 and one
    directional light of 0.7 from above the camera's right shoulder.
    """
    source = str(path)
    mesh = load_obj(path)
    if mesh.num_vertices == 0:
        raise InputError(source, "", "the mesh has no vertices: nothing to frame")
    low, high = mesh.vertices.double().min(dim=0).values, mesh.vertices.double().max(dim=0).values
    center = (low + high) / 2
    radius = max(float((high - low).norm()) / 2, 1e-6 * max(1.0, float(center.abs().max())))
    # The sphere fits the vertical field of view, and the narrower horizontal one if W < H.
    half_fov = math.radians(PREVIEW_FOV / 2)
    half_fov = min(half_fov, math.atan(math.tan(half_fov) * width / height))
    distance = radius / math.sin(half_fov) * 1.05
    elevation, azimuth = math.radians(PREVIEW_ELEVATION), math.radians(PREVIEW_AZIMUTH)
    direction = torch.tensor(
        [math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
         math.cos(elevation) * math.cos(azimuth)],
        dtype=torch.float64,
    )  # fmt: skip
    camera = Camera(
        projection="perspective",
        eye=tuple((center + distance * direction).tolist()),
        target=tuple(center.tolist()),
        up=(0.0, 1.0, 0.0),
        fov=PREVIEW_FOV,
        half_height=None,
        near=max(distance - 1.5 * radius, distance * 1e-3),
        far=distance + 1.5 * radius,
    )
    colors, color_mode = _colors(_Node(_MISSING, source), mesh)
    scene_mesh = SceneMesh(Path(path).name, mesh, Transform(), colors, color_mode, mesh.texture)
    # Textured meshes are unlit (the kernels sample the texture itself).
    lights = None if mesh.texture else Lights(0.4, (DirectionalLight(_unit((0.5, 1.0, 0.8)), 0.7),))
    return Scene(source, RenderSettings(width, height), (scene_mesh,), (camera,), lights, None)


def _unit(vector: Vec3) -> Vec3:
    length = math.hypot(*vector)
    return tuple(x / length for x in vector)


def _scene_mesh(node: _Node, base_dir: Path) -> SceneMesh:
    entry = node.object(("file", "primitive", "subdivisions", "transform", "color"))
    if entry.either("file", "primitive") == "file":
        name = entry["file"].string()
        mesh = _mesh_file(entry["file"], base_dir)
    else:
        name = entry["primitive"].choice(PRIMITIVES)
        mesh = _primitive(name, entry["subdivisions"])
    transform = _transform(entry["transform"])
    # Renders are float32: a transform that overflows it would turn the mesh into inf and NaN.
    if not torch.isfinite(transform.apply(mesh.vertices)).all():
        entry["transform"].fail(f"moves vertices {BEYOND_FLOAT32}")
    colors, color_mode = _colors(entry["color"], mesh)
    return SceneMesh(name, mesh, transform, colors, color_mode, None if entry["color"].given else mesh.texture)


def _mesh_file(node: _Node, base_dir: Path) -> Mesh:
    path = base_dir / node.string()
    # A path that leads to no file is the scene's mistake, so it is reported at the scene entry;
    # problems inside the file are reported by load_obj with the OBJ file's own name and line.
    problem = file_problem(path)
    if problem:
        node.fail(problem)
    return load_obj(path)


def _primitive(name: str, subdivisions: _Node) -> Mesh:
    if name == "icosphere":
        return icosphere(subdivisions.integer(_Interval(0, 7), default=2))
    subdivisions.forbidden('only for "icosphere" meshes')
    return cube() if name == "cube" else plane()


def _colors(node: _Node, mesh: Mesh) -> tuple[torch.Tensor, str]:
    """Albedo ``(V, 3)`` with mode ``"vertex"`` or ``(F, 3)`` with mode ``"face"``, float32."""
    if not node.given and mesh.vertex_colors is not None:
        return mesh.vertex_colors, "vertex"
    if not node.given or isinstance(node.value, list):
        rgb = node.vector(3, _UNIT, default=DEFAULT_COLOR)
        return torch.tensor(rgb, dtype=torch.float32).repeat(mesh.num_vertices, 1), "vertex"
    if not isinstance(node.value, dict):
        node.expected('[r, g, b], {"per_vertex": [...]} or {"per_face": [...]}')
    table = node.object(("per_vertex", "per_face"))
    key = table.either("per_vertex", "per_face")
    mode, count = ("vertex", mesh.num_vertices) if key == "per_vertex" else ("face", mesh.num_faces)
    items = table[key].array()
    if len(items) != count:
        table[key].fail(f"expected {count} colors (one per {mode}), got {len(items)}")
    return torch.tensor([item.vector(3, _UNIT) for item in items], dtype=torch.float32), mode


def _transform(node: _Node) -> Transform:
    default = Transform()
    transform = node.object(("translate", "rotate", "scale"), required=False)
    scale = transform["scale"]
    return Transform(
        translate=transform["translate"].vector(3, default=default.translate),
        rotate=transform["rotate"].vector(3, default=default.rotate),
        scale=(
            scale.vector(3, _POSITIVE)
            if isinstance(scale.value, list)
            else (scale.number(_POSITIVE, default=default.scale[0]),) * 3
        ),
    )


def _camera(node: _Node) -> Camera:
    camera = node.object(
        ("projection", "fov", "half_height", "eye", "orbit", "target", "up", "near", "far",
         "fx_over_fy", "principal_point")
    )  # fmt: skip
    projection = camera["projection"].choice(PROJECTIONS, default="perspective")
    if projection == "perspective":
        fov = camera["fov"].number(_Interval(0, 180, True, True), default=60.0)
        half_height = camera["half_height"].forbidden('only for "orthographic" cameras')
    else:
        fov = camera["fov"].forbidden('only for "perspective" cameras')
        half_height = camera["half_height"].number(_POSITIVE, default=1.0)
    target = camera["target"].vector(3, default=(0.0, 0.0, 0.0))
    up = camera["up"].nonzero_vector(default=(0.0, 1.0, 0.0))
    if camera.either("eye", "orbit") == "eye":
        eye = camera["eye"].vector(3)
    else:
        eye = _orbit_eye(camera["orbit"], target)
    near = camera["near"].number(_POSITIVE, default=NEAR)
    far = camera["far"].number(_POSITIVE, default=FAR)
    if far <= near:
        camera["far"].expected(f"a number > near ({_format_bound(near)})")
    if eye == target:
        node.fail("eye and target are the same point")
    if _parallel(tuple(e - t for e, t in zip(eye, target)), up):
        node.fail("eye - target is parallel to up")
    fx_over_fy = camera["fx_over_fy"].number(_POSITIVE, default=1.0)
    principal_point = camera["principal_point"].vector(2, default=(0.0, 0.0))
    return Camera(
        projection, eye, target, up, fov, half_height, near, far, fx_over_fy, principal_point
    )


def _orbit_eye(node: _Node, target: Vec3) -> Vec3:
    orbit = node.object(("distance", "elevation", "azimuth"))
    distance = orbit["distance"].number(_POSITIVE)
    elevation = math.radians(orbit["elevation"].number(_Interval(-90, 90), default=0.0))
    azimuth = math.radians(orbit["azimuth"].number(default=0.0))
    offset = (
        math.cos(elevation) * math.sin(azimuth),
        math.sin(elevation),
        math.cos(elevation) * math.cos(azimuth),
    )
    eye = tuple(t + distance * o for t, o in zip(target, offset))
    if not all(abs(e) <= FLOAT32_MAX for e in eye):
        node.fail(f"puts the eye {BEYOND_FLOAT32}")
    return eye


def _parallel(a: Vec3, b: Vec3) -> bool:
    """Whether nonzero ``a`` and ``b`` are parallel up to float noise (``|sin angle| <= 1e-9``)."""
    cross = (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])
    return math.hypot(*cross) <= 1e-9 * math.hypot(*a) * math.hypot(*b)


def _lights(node: _Node) -> Lights:
    default = Lights()
    lights = node.object(("ambient", "directional"))
    return Lights(
        ambient=lights["ambient"].number(_NON_NEGATIVE, default=default.ambient),
        directional=tuple(
            _directional_light(item) for item in lights["directional"].array(required=False)
        ),
    )


def _directional_light(node: _Node) -> DirectionalLight:
    light = node.object(("direction", "intensity"))
    direction = light["direction"].nonzero_vector()
    length = math.hypot(*direction)
    return DirectionalLight(
        direction=tuple(d / length for d in direction),
        intensity=light["intensity"].number(_NON_NEGATIVE, default=DirectionalLight.intensity),
    )


def _optimize(node: _Node, cameras: int) -> OptimizeSettings:
    optimize = node.object(tuple(_OPTIMIZE_READERS))
    settings = OptimizeSettings(
        **{key: read(optimize[key]) for key, read in _OPTIMIZE_READERS.items()}
    )
    problem = views_problem(settings, cameras)
    if problem is not None:
        key, message = problem
        optimize[key].fail(message)
    return settings


def held_out_views(holdout: str | Sequence[int] | None, cameras: int) -> tuple[int, ...]:
    """The cameras, increasing, that ``optimize.holdout`` ``holdout`` names among ``cameras``
    (indices out of range included, for :func:`views_problem` to report)."""
    if holdout is None:
        return ()
    if not isinstance(holdout, str):
        return tuple(sorted(holdout))
    if holdout in ("odd", "even"):
        return tuple(range(holdout == "odd", cameras, 2))
    return tuple(range(0, cameras, int(holdout.removeprefix("every:"))))


def views_problem(settings: OptimizeSettings, cameras: int) -> tuple[str, str] | None:
    """What is wrong with ``settings``' ``holdout`` or ``views_per_step`` for a scene of
    ``cameras`` cameras, as ``(key, message)``: a held-out camera that does not exist, no camera
    left to fit, more views per step than cameras to fit; ``None`` if nothing is."""
    held_out = held_out_views(settings.holdout, cameras)
    if held_out and held_out[-1] >= cameras:
        last = cameras - 1
        return "holdout", f"camera {held_out[-1]} does not exist: the cameras are 0 to {last}"
    fit = cameras - len(held_out)
    if fit == 0:
        return "holdout", "holds out every camera: none is left to fit"
    steps = settings.views_per_step
    if steps is not None and steps > fit:
        what = "cameras to fit, not held out" if held_out else "cameras"
        return "views_per_step", f"expected at most the number of {what} ({fit}), got {steps}"
    return None


def override_optimize(
    settings: OptimizeSettings, key: str, value: object, source: str, cameras: int | None = None
) -> OptimizeSettings:
    """``settings`` with field ``key`` read from ``value`` as if the ``optimize`` section gave it,
    with the same checks (against a scene of ``cameras`` cameras, if given); errors name
    ``source`` (a flag such as ``--lr``) instead of the file."""
    settings = replace(settings, **{key: _OPTIMIZE_READERS[key](_Node(value, source))})
    problem = None if cameras is None else views_problem(settings, cameras)
    if problem is not None:
        theirs, message = problem
        if theirs != key:  # the holdout left too few cameras for the file's views_per_step
            fit = cameras - len(held_out_views(settings.holdout, cameras))
            message = (
                f"the cameras left to fit ({fit}) are fewer than optimize.views_per_step "
                f"({settings.views_per_step})"
            )
        raise InputError(source, "", message)
    return settings


def holdout_from_text(text: str) -> str | list[int]:
    """``optimize.holdout`` as a command line gives it: ``"3,7,11"`` (or ``"5"``) is the array
    of those indices, any other text the string as the scene file would have it."""
    if re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        return [int(index) for index in text.split(",")]
    return text


def _optimized_parameters(node: _Node) -> tuple[str, ...] | None:
    if not node.given:
        return _DEFAULT_OPTIMIZE.parameters
    names: list[str] = []
    for item in node.array(min_length=1):
        name = item.choice(OPTIMIZABLE)
        if name in names:
            item.fail(f"{show_value(name)} is listed twice")
        names.append(name)
    return tuple(names)


def _loss(node: _Node) -> dict[str, float] | None:
    if not node.given:
        return _DEFAULT_OPTIMIZE.loss
    terms = node.object(LOSS_TERMS)
    loss = {term: terms[term].number(_NON_NEGATIVE, default=0.0) for term in LOSS_TERMS}
    if not any(loss[term] > 0 for term in IMAGE_LOSS_TERMS):
        node.fail(
            "at least one of " + ", ".join(f'"{t}"' for t in IMAGE_LOSS_TERMS) + " must be > 0"
        )
    return loss


def _sigma_schedule(node: _Node) -> tuple[float, float] | None:
    if not node.given:
        return _DEFAULT_OPTIMIZE.sigma_schedule
    schedule = node.object(("start", "end"))
    return schedule["start"].number(_POSITIVE), schedule["end"].number(_POSITIVE)


def _holdout(node: _Node) -> str | tuple[int, ...] | None:
    if not node.given:
        return _DEFAULT_OPTIMIZE.holdout
    if isinstance(node.value, list):
        indices: list[int] = []
        for item in node.array(min_length=1):
            index = item.integer(_Interval(0))
            if index in indices:
                item.fail(f"camera {index} is listed twice")
            indices.append(index)
        return tuple(indices)
    if isinstance(node.value, str):
        every = re.fullmatch(r"every:(\d+)", node.value)
        if node.value in ("odd", "even") or (every and int(every[1]) >= 2):
            return node.value if not every else f"every:{int(every[1])}"
    node.expected('"odd", "even", "every:K" (K an integer >= 2) or an array of camera indices')


def _remesh(node: _Node) -> RemeshSettings | None:
    if not node.given:
        return _DEFAULT_OPTIMIZE.remesh
    remesh = node.object(("edge_length", "every", "until"))
    length = remesh["edge_length"]
    if isinstance(length.value, list):
        edge_length = length.vector(2, _POSITIVE)
    else:
        edge_length = (length.number(_POSITIVE),) * 2
    default = RemeshSettings(edge_length)
    return RemeshSettings(
        edge_length=edge_length,
        every=remesh["every"].integer(_Interval(1), default=default.every),
        until=remesh["until"].number(_Interval(0, 1, open_lo=True), default=default.until),
    )


def _texture_resolution(node: _Node) -> tuple[int, int] | None:
    if not node.given:
        return _DEFAULT_OPTIMIZE.texture_resolution
    width, height = (item.integer(_Interval(1, 4096)) for item in node.array(min_length=2, max_length=2))
    return width, height


_DEFAULT_OPTIMIZE = OptimizeSettings()

#: One reader per field of the ``optimize`` section (and of :func:`override_optimize`); each
#: returns the field's value, or its default when the key is absent.
_OPTIMIZE_READERS: dict[str, Callable[[_Node], Any]] = {
    "parameters": _optimized_parameters,
    "vertex_parametrization": lambda node: node.choice(
        VERTEX_PARAMETRIZATIONS, default=_DEFAULT_OPTIMIZE.vertex_parametrization
    ),
    "loss": _loss,
    "mask_rgb": lambda node: node.boolean(default=_DEFAULT_OPTIMIZE.mask_rgb),
    "lr": lambda node: node.number(_Interval(0, 10, open_lo=True), default=_DEFAULT_OPTIMIZE.lr),
    "betas": lambda node: node.vector(
        2, _Interval(0, 1, open_hi=True), default=_DEFAULT_OPTIMIZE.betas
    ),
    "lr_schedule": lambda node: node.choice(LR_SCHEDULES, default=_DEFAULT_OPTIMIZE.lr_schedule),
    "iterations": lambda node: node.integer(
        _Interval(1, 10_000_000), default=_DEFAULT_OPTIMIZE.iterations
    ),
    "sigma_schedule": _sigma_schedule,
    "views_per_step": lambda node: node.integer(
        _Interval(1), default=_DEFAULT_OPTIMIZE.views_per_step
    ),
    "holdout": _holdout,
    "remesh": _remesh,
    "texture_resolution": _texture_resolution,
}


# ---------------------------------------------------------------------------------------------
# Writing


def input_files(scene: Scene) -> dict[Path, str]:
    """The files ``scene`` was read from, resolved, each with its role in messages: ``"the scene
    file"``, ``"the scene's camera file"`` or ``"a mesh of the scene"``. A primitive's name
    (``"cube"``) gives a path that is no file, which no output path matches in practice."""
    inputs = {Path(scene.source).resolve(): "the scene file"}
    if scene.camera_file is not None:
        inputs.setdefault(scene.camera_file.path.resolve(), "the scene's camera file")
    for scene_mesh in scene.meshes:
        inputs.setdefault(
            (Path(scene.source).parent / scene_mesh.name).resolve(), "a mesh of the scene"
        )
    return inputs


def scene_to_json(scene: Scene, mesh_files: Sequence[str]) -> dict[str, Any]:
    """The scene as a JSON object that :func:`parse_scene` reads back to the same scene.

    ``mesh_files[i]`` is the path, relative to the folder the JSON will be written to, of an OBJ
    file holding ``scene.meshes[i].mesh`` and, for per-vertex colors, those colors (as
    ``save_obj(mesh, path, vertex_colors=colors)`` writes it): per-vertex colors live in the OBJ
    only, per-face colors in the JSON, since OBJ has no face colors.
    """
    if len(mesh_files) != len(scene.meshes):
        raise ValueError(f"{len(mesh_files)} mesh files for {len(scene.meshes)} meshes")
    render = scene.render
    data: dict[str, Any] = {
        "image": {"width": render.width, "height": render.height},
        "render": {
            "sigma": render.sigma,
            "gamma": render.gamma,
            "eps": render.eps,
            "eps_d": render.eps_d,
            "background": list(render.background),
            "cull_backfaces": render.cull_backfaces,
            "backend": render.backend,
        },
        "meshes": [_mesh_json(mesh, file) for mesh, file in zip(scene.meshes, mesh_files)],
        "cameras": [_camera_json(camera) for camera in scene.cameras],
    }
    if scene.lights is not None:
        data["lights"] = {
            "ambient": scene.lights.ambient,
            "directional": [
                {"direction": list(light.direction), "intensity": light.intensity}
                for light in scene.lights.directional
            ],
        }
    if scene.optimize is not None:
        data["optimize"] = _optimize_json(scene.optimize)
    return data


def _mesh_json(scene_mesh: SceneMesh, file: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": file}
    transform = scene_mesh.transform
    if transform != Transform():
        entry["transform"] = {
            "translate": list(transform.translate),
            "rotate": list(transform.rotate),
            "scale": list(transform.scale),
        }
    if scene_mesh.color_mode == "face":
        entry["color"] = {"per_face": scene_mesh.colors.tolist()}
    return entry


def _camera_json(camera: Camera) -> dict[str, Any]:
    if camera.projection == "perspective":
        lens = {"fov": camera.fov}
    else:
        lens = {"half_height": camera.half_height}
    entry = {
        "projection": camera.projection,
        **lens,
        "eye": list(camera.eye),
        "target": list(camera.target),
        "up": list(camera.up),
        "near": camera.near,
        "far": camera.far,
    }
    if camera.fx_over_fy != 1.0:
        entry["fx_over_fy"] = camera.fx_over_fy
    if camera.principal_point != (0.0, 0.0):
        entry["principal_point"] = list(camera.principal_point)
    return entry


def _optimize_json(settings: OptimizeSettings) -> dict[str, Any]:
    """The fields that are set (``None`` ones take their defaults again when read back)."""
    data = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in vars(settings).items()
        if value is not None
    }
    if settings.sigma_schedule is not None:
        start, end = settings.sigma_schedule
        data["sigma_schedule"] = {"start": start, "end": end}
    if settings.remesh is not None:
        data["remesh"] = {**vars(settings.remesh), "edge_length": list(settings.remesh.edge_length)}
    return data


# ---------------------------------------------------------------------------------------------
# Reading JSON values with one-line errors


class _JSONObject(dict):
    """A JSON object that remembers keys given more than once (``json`` keeps only the last)."""

    duplicates: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _JSONObject:
        obj = cls(pairs)
        if len(obj) < len(pairs):
            obj.duplicates = tuple(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        return obj


@dataclass(frozen=True)
class _Interval:
    """Allowed numbers: bounds (``None`` = unbounded), each closed unless marked open."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.lo is None or (x > self.lo if self.open_lo else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.open_hi else x <= self.hi)
        return above and below

    def describe(self, noun: str) -> str:
        """E.g. ``a number in (0, 180)``, ``a number > 0``, ``an integer in [1, 16384]``."""
        if self.lo is None and self.hi is None:
            return noun
        if self.hi is None:
            return f"{noun} {'>' if self.open_lo else '>='} {_format_bound(self.lo)}"
        if self.lo is None:
            return f"{noun} {'<' if self.open_hi else '<='} {_format_bound(self.hi)}"
        left, right = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
        return f"{noun} in {left}{_format_bound(self.lo)}, {_format_bound(self.hi)}{right}"


_ANY = _Interval()
_POSITIVE = _Interval(0, open_lo=True)
_NON_NEGATIVE = _Interval(0)
_UNIT = _Interval(0, 1)


def _format_bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


_REQUIRED: Any = object()  # the ``default`` of a reader whose key must be given
_MISSING: Any = object()  # the value of a node for a key that is absent


class _Node:
    """One JSON value and its place in the file; its readers return Python values or raise.

    A node for an absent key (``given`` is false) returns its reader's ``default``, or reports the
    key missing at the parent when there is none.
    """

    def __init__(self, value: Any, source: str, path: str = "", parent: str = "", key: str = ""):
        self.value, self.source, self.path = value, source, path
        self.parent, self.key = parent, key

    @property
    def given(self) -> bool:
        return self.value is not _MISSING

    def fail(self, message: str) -> NoReturn:
        raise InputError(self.source, self.path, message)

    def expected(self, what: str) -> NoReturn:
        self.fail(f"expected {what}, got {show_value(self.value)}")

    def missing(self) -> NoReturn:
        raise InputError(self.source, self.parent, f'missing key "{self.key}"')

    def _default(self, default: Any) -> Any:
        if default is _REQUIRED:
            self.missing()
        return default

    def number(self, allowed: _Interval = _ANY, *, default: Any = _REQUIRED) -> float:
        """A JSON number (not a boolean) that is finite, fits float32 and is ``in allowed``."""
        if not self.given:
            return self._default(default)
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            self.expected(allowed.describe("a number"))
        try:
            value = float(self.value)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):
            self.expected("a finite number")
        if abs(value) > FLOAT32_MAX:
            self.fail(f"{show_value(self.value)} is {BEYOND_FLOAT32}")
        if value not in allowed:
            self.expected(allowed.describe("a number"))
        return value

    def integer(self, allowed: _Interval, *, default: Any = _REQUIRED) -> int:
        if not self.given:
            return self._default(default)
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            self.expected(allowed.describe("an integer"))
        return value

    def boolean(self, *, default: Any = _REQUIRED) -> bool:
        if not self.given:
            return self._default(default)
        if not isinstance(self.value, bool):
            self.expected("true or false")
        return self.value

    def string(self) -> str:
        """A non-empty string."""
        if not self.given:
            self.missing()
        if not isinstance(self.value, str) or not self.value:
            self.expected("a non-empty string")
        return self.value

    def choice(self, options: tuple[str, ...], *, default: Any = _REQUIRED) -> str:
        if not self.given:
            return self._default(default)
        if not isinstance(self.value, str) or self.value not in options:
            self.expected("one of " + ", ".join(f'"{option}"' for option in options))
        return self.value

    def vector(self, n: int, allowed: _Interval = _ANY, *, default: Any = _REQUIRED) -> tuple:
        """An array of ``n`` numbers ``in allowed``, as a tuple of floats."""
        if not self.given:
            return self._default(default)
        if not isinstance(self.value, list) or len(self.value) != n:
            self.expected(f"an array of {n} numbers")
        return tuple(item.number(allowed) for item in self.array())

    def nonzero_vector(self, *, default: Any = _REQUIRED) -> Vec3:
        """Three numbers, not all zero."""
        vector = self.vector(3, default=default)
        if not any(vector):
            self.expected("a nonzero vector")
        return vector

    def forbidden(self, reason: str) -> None:
        """For a key that the rest of its object rules out."""
        if self.given:
            self.fail(reason)

    def array(
        self, *, min_length: int = 0, max_length: int | None = None, required: bool = True
    ) -> list[_Node]:
        """The items of an array of ``min_length`` to ``max_length`` items; a missing optional one
        is empty."""
        if not self.given:
            if required:
                self.missing()
            return []
        if not isinstance(self.value, list):
            self.expected("an array")
        if len(self.value) < min_length:
            self.expected(f"an array of at least {min_length} item{'s' * (min_length > 1)}")
        if max_length is not None and len(self.value) > max_length:
            # The items themselves would make a line of megabytes: their count says it.
            self.fail(f"expected at most {max_length} items, got {len(self.value)}")
        return [_Node(item, self.source, f"{self.path}[{i}]") for i, item in enumerate(self.value)]

    def object(self, keys: tuple[str, ...], *, required: bool = True) -> _Object:
        """An object whose keys are all among ``keys``; a missing optional one is empty."""
        if not self.given:
            if required:
                self.missing()
            return _Object(self, {})
        if not isinstance(self.value, dict):
            self.expected("an object")
        for key in getattr(self.value, "duplicates", ()):
            self.fail(f"duplicate key {show_value(key)}")
        for key in self.value:
            if key not in keys:
                raise InputError(self.source, _join(self.path, key), _unknown_key(key, keys))
        return _Object(self, self.value)


class _Object:
    """A checked JSON object: ``obj[key]`` is the node of one of its known keys."""

    def __init__(self, node: _Node, value: dict):
        self.node, self.value = node, value

    def __getitem__(self, key: str) -> _Node:
        path = _join(self.node.path, key)
        return _Node(self.value.get(key, _MISSING), self.node.source, path, self.node.path, key)

    def either(self, first: str, second: str) -> str:
        """Which of two alternative keys is given; exactly one must be."""
        given = [key for key in (first, second) if key in self.value]
        if not given:
            self.node.fail(f'missing key "{first}" (or give "{second}")')
        if len(given) == 2:
            self.node.fail(f'give "{first}" or "{second}", not both')
        return given[0]


def _join(path: str, key: str) -> str:
    """The JSON path of ``key`` in the object at ``path``: ``cameras[0].fov``. A key that is not
    a plain name (empty, with spaces, dots or line breaks) is quoted: ``cameras[0]."fo\\nv"``."""
    name = str(key)
    if not _PLAIN_KEY.fullmatch(name):
        name = json.dumps(name)
    return f"{path}.{name}" if path else name


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _unknown_key(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    if close:
        return f'unknown key (did you mean "{close[0]}"?)'
    return "unknown key (expected one of " + ", ".join(f'"{k}"' for k in known) + ")"
