"""Cameras from the files other tools write, and NeRF's format written back.

A scene's ``cameras`` may be ``{"from": PATH}`` (relative to the scene file) instead of an array;
the format is told apart by content:

- a folder: a COLMAP text model (``cameras.txt`` with ``PINHOLE`` or ``SIMPLE_PINHOLE``
  cameras, ``images.txt``), cameras in ``images.txt``'s order;
- a JSON object with ``"frames"``: NeRF's ``transforms.json`` (``camera_angle_x``, or
  ``fl_x``/``fl_y``/``cx``/``cy``; ``w``/``h``; each frame's camera-to-world
  ``transform_matrix`` in OpenGL axes), cameras in the frames' order;
- a JSON array, or an object with ``"cameras"``: OpenCV-style cameras, each with ``K`` (3 x 3),
  ``R`` (3 x 3) and ``t`` (3) mapping a world point ``X`` to ``R X + t`` in camera space,
  ``width``, ``height`` and ``image``.

Their axes and pixel centers are :mod:`microdr.conventions`'s (``docs/CAMERAS.md`` draws them).
Lens distortion is not modelled: a camera with any is refused. Every problem is one
:class:`InputError` naming the file and the place in it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from ..conventions import OPENCV_AXES, PIXEL_CENTER, look_at_rotation, to_pixels, to_screen
from ..defaults import FAR, NEAR
from ..errors import InputError, show_value
from .files import file_problem, read_text
from .scene import (
    MAX_CAMERAS,
    MAX_IMAGE_SIDE,
    Camera,
    CameraFile,
    _Interval,
    _Node,
    _Object,
    _format_bound,
    read_json,
    too_many_pixels,
)

#: How far ``R R^T`` may be from the identity for ``R`` to be taken as a rotation: files hold
#: rotations rounded to a few digits, and cameras are rebuilt from them orthonormal.
ROTATION_TOLERANCE = 1e-3
#: The lens distortion coefficients of NeRF-style files (nerfstudio's, instant-ngp's).
NERF_DISTORTION = ("k1", "k2", "k3", "k4", "p1", "p2")
#: COLMAP's camera models with lens distortion (all but the pinhole ones).
COLMAP_DISTORTED = (
    "SIMPLE_RADIAL", "RADIAL", "OPENCV", "OPENCV_FISHEYE", "FULL_OPENCV", "FOV",
    "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE", "THIN_PRISM_FISHEYE",
)  # fmt: skip
UNDISTORT = "which microDR does not model; undistort the images first (colmap image_undistorter)"

_SIDE = _Interval(1, MAX_IMAGE_SIDE)
_POSITIVE = _Interval(0, open_lo=True)


@dataclass(frozen=True)
class Pinhole:
    """One camera as a file gives it, in microDR's axes.

    ``rotation``: ``(3, 3)`` float64, world to camera: its rows are the camera's x (right), y
    (up) and z (back) axes in world space. ``center``: ``(3,)`` float64, in world space.
    ``fx``, ``fy``, ``cx``, ``cy``: pixels, with pixel ``c`` spanning ``[c, c + 1]``.
    ``image``: the image file it names, as written.
    """

    rotation: np.ndarray
    center: np.ndarray
    fx: float
    fy: float
    cx: float
    cy: float
    image: str


def read_cameras(
    node: _Node, base_dir: Path, scene_size: tuple[int, int] | None
) -> tuple[tuple[Camera, ...], CameraFile, tuple[int, int]]:
    """The cameras of a scene's ``cameras: {"from": PATH, "images": FOLDER, "near": n, "far":
    f}``, where they came from, and the scene's image size ``(width, height)``.

    ``scene_size``: the scene's ``image`` size if it gives one: it must have the camera file's
    aspect ratio (the cameras are in screen units, so they fit any such size; targets of
    another size need ``--resize``). ``None``: the camera file's size is the scene's.
    ``FOLDER``: where the images that the file names are, relative to the scene file; default
    the camera file's folder (a COLMAP model's folder). ``near``, ``far``: as a camera's.
    """
    entry = node.object(("from", "images", "near", "far"))
    path = base_dir / entry["from"].string()
    if path.is_dir():
        pinholes, size = _colmap(path)
    else:
        problem = file_problem(path)
        if problem:
            entry["from"].fail(problem)
        pinholes, size = _json_cameras(path, scene_size)
    if len(pinholes) > MAX_CAMERAS:
        entry["from"].fail(f"{path}: {len(pinholes)} cameras, more than the limit of {MAX_CAMERAS}")
    width, height = size
    if scene_size is not None and scene_size[0] * height != scene_size[1] * width:
        entry["from"].fail(
            f"{path} has {width} x {height} pixel images but the scene's image is "
            f"{scene_size[0]} x {scene_size[1]}: expected the same aspect ratio (or leave out the "
            "image section to render at the camera file's size)"
        )
    near = entry["near"].number(_POSITIVE, default=NEAR)
    far = entry["far"].number(_POSITIVE, default=FAR)
    if far <= near:
        entry["far"].expected(f"a number > near ({_format_bound(near)})")
    cameras = tuple(_camera(p, width, height, near, far) for p in pinholes)
    if entry["images"].given:
        folder = base_dir / entry["images"].string()
    else:
        folder = path if path.is_dir() else path.parent
    return cameras, CameraFile(path, tuple(folder / p.image for p in pinholes)), scene_size or size


def image_files(camera_file: CameraFile) -> list[Path]:
    """The images a camera file names, one per camera in its order: each as named, or with
    ``.png`` added if only that exists (NeRF's ``file_path`` leaves the suffix out)."""
    paths = []
    for i, path in enumerate(camera_file.images):
        png = path.with_name(path.name + ".png")
        if not path.is_file() and png.is_file():
            path = png
        elif not path.is_file():
            message = f"camera {i}'s image {path}: no such file (nor {png.name})"
            raise InputError(str(camera_file.path), "", message)
        paths.append(path)
    return paths


def _camera(pinhole: Pinhole, width: int, height: int, near: float, far: float) -> Camera:
    """A :class:`Camera` that projects as ``pinhole`` does on a ``width`` x ``height`` image.

    The target is the point of the optical axis nearest the world origin (where captures put
    their object, so that optimizing the eye turns the camera about it), or as far ahead as the
    eye is from the origin when that point is not ahead of it."""
    focal, fx_over_fy, principal_point = to_screen(
        pinhole.fx, pinhole.fy, pinhole.cx, pinhole.cy, width, height
    )
    _, up, back = pinhole.rotation
    eye = pinhole.center
    distance = float(np.dot(eye, back))  # along the view direction -back, to the origin
    reach = float(np.linalg.norm(eye))
    if distance <= 1e-3 * reach:
        distance = reach or 1.0
    return Camera(
        projection="perspective",
        eye=_floats(eye),
        target=_floats(eye - distance * back),
        up=_floats(up),
        fov=math.degrees(2 * math.atan(1 / focal)),
        half_height=None,
        near=near,
        far=far,
        fx_over_fy=fx_over_fy,
        principal_point=principal_point,
    )


def _floats(vector: np.ndarray) -> tuple[float, ...]:
    return tuple(float(x) for x in vector)


# ---------------------------------------------------------------------------------------------
# JSON formats


def _json_cameras(path: Path, scene_size: tuple[int, int] | None):
    root = _Node(read_json(path), str(path))
    if isinstance(root.value, dict) and "frames" in root.value:
        return _nerf(root, scene_size)
    if isinstance(root.value, list) or (isinstance(root.value, dict) and "cameras" in root.value):
        return _opencv(root)
    root.fail(
        'not a camera file microDR reads: expected NeRF\'s transforms.json (an object with '
        '"frames"), OpenCV-style cameras (an array, or an object with "cameras") or a COLMAP '
        "text model's folder"
    )


def _fields(node: _Node) -> _Object:
    """A JSON object's fields; other keys are let be (camera files hold many microDR does not
    use)."""
    if not isinstance(node.value, dict):
        node.expected("an object")
    for key in getattr(node.value, "duplicates", ()):
        node.fail(f"duplicate key {show_value(key)}")
    return _Object(node, node.value)


def _matrix(node: _Node, rows: int, columns: int) -> np.ndarray:
    """An array of ``rows`` arrays of ``columns`` numbers, float64 ``(rows, columns)``."""
    if not isinstance(node.value, list) or len(node.value) != rows:
        node.expected(f"an array of {rows} rows of {columns} numbers")
    return np.array([item.vector(columns) for item in node.array()], dtype=np.float64)


def _rotation(node: _Node, matrix: np.ndarray) -> np.ndarray:
    """``matrix`` ``(3, 3)`` if it is a rotation (orthonormal within :data:`ROTATION_TOLERANCE`,
    determinant +1)."""
    error = np.abs(matrix @ matrix.T - np.eye(3)).max()
    if not error <= ROTATION_TOLERANCE or np.linalg.det(matrix) <= 0:
        what = "a reflection" if error <= ROTATION_TOLERANCE else f"off by {error:.2g}"
        tolerance = f"orthonormal within {ROTATION_TOLERANCE:g}"
        node.fail(f"expected a rotation ({tolerance}, det +1), {what}")
    return matrix


def _nerf(root: _Node, scene_size: tuple[int, int] | None) -> tuple[list[Pinhole], tuple[int, int]]:
    """NeRF's ``transforms.json``: intrinsics at the top, which a frame may override (as
    nerfstudio's files do); ``w`` and ``h`` default to the scene's image size."""
    top = _fields(root)
    pinholes, size = [], None
    for frame_node in top["frames"].array(min_length=1):
        frame = _fields(frame_node)

        def field(key: str) -> _Node:
            return frame[key] if frame[key].given else top[key]

        for key in NERF_DISTORTION:
            if field(key).number(default=0.0) != 0:
                field(key).fail(f"lens distortion ({key} = {field(key).value}), {UNDISTORT}")
        model = field("camera_model")
        if model.given and model.value not in ("OPENCV", "PINHOLE"):
            model.fail(f"camera model {show_value(model.value)}: microDR has pinhole cameras only")
        if not (field("w").given or field("h").given or scene_size):
            frame_node.fail('no image size: expected "w" and "h" (in the frame or at the top), '
                            "or the scene's image section")
        if field("w").given or field("h").given:
            frame_size = (field("w").integer(_SIDE), field("h").integer(_SIDE))
        else:
            frame_size = scene_size
        if size is not None and frame_size != size:
            frame_node.fail(f"image size {frame_size[0]} x {frame_size[1]} differs from the first "
                            f"frame's {size[0]} x {size[1]}: a scene's cameras share one size")
        size = width, height = frame_size
        if not (field("fl_x").given or field("camera_angle_x").given):
            frame_node.fail('no focal length: expected "fl_x" or "camera_angle_x" (in the frame '
                            "or at the top)")
        fx = _focal(field("fl_x"), field("camera_angle_x"), width)
        fy = _focal(field("fl_y"), field("camera_angle_y"), height) if (
            field("fl_y").given or field("camera_angle_y").given) else fx
        shift = 0.5 - PIXEL_CENTER["nerf"]
        cx = field("cx").number(default=width / 2) + shift
        cy = field("cy").number(default=height / 2) + shift
        matrix = frame["transform_matrix"]
        if not isinstance(matrix.value, list) or len(matrix.value) not in (3, 4):
            matrix.expected("a 4 x 4 camera-to-world matrix")
        to_world = _matrix(matrix, len(matrix.value), 4)
        rotation = _rotation(matrix, to_world[:3, :3]).T  # OpenGL camera axes are microDR's
        image = frame["file_path"].string()
        pinholes.append(Pinhole(rotation, to_world[:3, 3], fx, fy, cx, cy, image))
    _check_size(root, size)
    return pinholes, size


def _focal(length: _Node, angle: _Node, side: int) -> float:
    """A focal length in pixels: ``length`` if given, else from the field of view ``angle``
    (radians) across ``side`` pixels."""
    if length.given or not angle.given:
        return length.number(_POSITIVE)
    return side / 2 / math.tan(angle.number(_Interval(0, math.pi, True, True)) / 2)


def _opencv(root: _Node) -> tuple[list[Pinhole], tuple[int, int]]:
    items = root if isinstance(root.value, list) else _fields(root)["cameras"]
    pinholes, size = [], None
    for item in items.array(min_length=1):
        camera = _fields(item)
        for key in ("dist", "D"):
            value = camera[key].value
            if camera[key].given and (not isinstance(value, list) or any(value)):
                camera[key].fail(f"lens distortion {show_value(value)}, {UNDISTORT}")
        k = _matrix(camera["K"], 3, 3)
        if k[0, 1] != 0:
            camera["K"].fail(f"skew K[0][1] = {k[0, 1]:g}, which microDR does not model")
        if (k[1, 0], k[2, 0], k[2, 1], k[2, 2]) != (0, 0, 0, 1) or k[0, 0] <= 0 or k[1, 1] <= 0:
            camera["K"].expected("[[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
        r = _rotation(camera["R"], _matrix(camera["R"], 3, 3))
        t = camera["t"]
        if isinstance(t.value, list) and all(isinstance(x, list) for x in t.value):
            translation = _matrix(t, 3, 1)[:, 0]  # a column vector, as OpenCV writes it
        else:
            translation = np.array(t.vector(3), dtype=np.float64)
        item_size = (camera["width"].integer(_SIDE), camera["height"].integer(_SIDE))
        if size is not None and item_size != size:
            item.fail(f"image size {item_size[0]} x {item_size[1]} differs from the first "
                      f"camera's {size[0]} x {size[1]}: a scene's cameras share one size")
        size = item_size
        axes = np.array(OPENCV_AXES)
        shift = 0.5 - PIXEL_CENTER["opencv"]
        pinholes.append(Pinhole(
            axes @ r, -r.T @ translation, k[0, 0], k[1, 1], k[0, 2] + shift, k[1, 2] + shift,
            camera["image"].string(),
        ))  # fmt: skip
    _check_size(root, size)
    return pinholes, size


def _check_size(node: _Node, size: tuple[int, int]) -> None:
    problem = too_many_pixels(*size)
    if problem:
        node.fail(problem)


# ---------------------------------------------------------------------------------------------
# COLMAP's text model


def _colmap(folder: Path) -> tuple[list[Pinhole], tuple[int, int]]:
    """A COLMAP text model: ``cameras.txt`` (``CAMERA_ID MODEL WIDTH HEIGHT PARAMS...``) and
    ``images.txt`` (``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME``, each followed by a line
    of 2-D points), one camera per image in ``images.txt``'s order."""
    cameras_txt, images_txt = folder / "cameras.txt", folder / "images.txt"
    if not cameras_txt.is_file() and (folder / "cameras.bin").is_file():
        raise InputError(
            str(folder), "", "a binary COLMAP model: convert it to text first "
            "(colmap model_converter --output_type TXT)",
        )  # fmt: skip
    intrinsics = {}
    for number, fields in _data_lines(cameras_txt):
        where = _LineError(cameras_txt, number)
        if len(fields) < 4:
            where.fail("expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS...")
        camera_id, model = fields[0], fields[1]
        if model in COLMAP_DISTORTED:
            where.fail(f"camera {camera_id}: model {model} has lens distortion, {UNDISTORT}")
        counts = {"SIMPLE_PINHOLE": 3, "PINHOLE": 4}
        if model not in counts:
            where.fail(f"camera {camera_id}: unknown model {model} (expected PINHOLE or "
                       "SIMPLE_PINHOLE)")
        if len(fields) != 4 + counts[model]:
            where.fail(f"camera {camera_id}: model {model} takes {counts[model]} parameters, got "
                       f"{len(fields) - 4}")
        width, height = (where.parse(text, int) for text in fields[2:4])
        params = [where.parse(text, float) for text in fields[4:]]
        fx, fy = (params[0], params[0]) if model == "SIMPLE_PINHOLE" else params[:2]
        if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE and fx > 0 < fy):
            where.fail(f"camera {camera_id}: expected sides in [1, {MAX_IMAGE_SIDE}] and focal "
                       "lengths > 0")
        shift = 0.5 - PIXEL_CENTER["colmap"]
        intrinsics[camera_id] = ((width, height), fx, fy, params[-2] + shift, params[-1] + shift)
    pinholes, size = [], None
    # Each image's line is followed by its points' line, which may be empty.
    lines = _data_lines(images_txt, keep_empty=True)
    while lines and not lines[-1][1]:  # blank lines at the end
        lines.pop()
    for number, fields in lines[::2]:
        where = _LineError(images_txt, number)
        if len(fields) < 10:
            where.fail("expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME")
        q = np.array([where.parse(text, float) for text in fields[1:5]])
        translation = np.array([where.parse(text, float) for text in fields[5:8]])
        if fields[8] not in intrinsics:
            where.fail(f"camera {fields[8]} is not in cameras.txt")
        image_size, fx, fy, cx, cy = intrinsics[fields[8]]
        if size is not None and image_size != size:
            where.fail(f"camera {fields[8]} is {image_size[0]} x {image_size[1]} pixels, the "
                       f"first image's {size[0]} x {size[1]}: a scene's cameras share one size")
        size = image_size
        norm = np.linalg.norm(q)
        if not norm > 0:
            where.fail("the rotation quaternion is zero")
        r = _quaternion_rotation(q / norm)
        name = " ".join(fields[9:])
        axes = np.array(OPENCV_AXES)
        pinholes.append(Pinhole(axes @ r, -r.T @ translation, fx, fy, cx, cy, name))
    if not pinholes:
        raise InputError(str(images_txt), "", "no images: a scene needs at least one camera")
    return pinholes, size


@dataclass(frozen=True)
class _LineError:
    """Errors at one line of a COLMAP text file."""

    path: Path
    number: int

    def fail(self, message: str) -> NoReturn:
        raise InputError(str(self.path), f"line {self.number}", message)

    def parse(self, text: str, kind: type) -> Any:
        """``text`` as a finite ``kind`` (``int`` or ``float``)."""
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            noun = "an integer" if kind is int else "a number"
            self.fail(f"expected {noun}, got {show_value(text)}")
        return value


def _data_lines(path: Path, keep_empty: bool = False) -> list[tuple[int, list[str]]]:
    """The lines of a COLMAP text file that are not comments, numbered from 1, split at blanks;
    empty ones too if ``keep_empty``."""
    lines = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.startswith("#") or (not line.strip() and not keep_empty):
            continue
        lines.append((number, line.split()))
    return lines


def _quaternion_rotation(q: np.ndarray) -> np.ndarray:
    """The rotation matrix of the unit quaternion ``(w, x, y, z)`` (COLMAP's, Hamilton's)."""
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Writing NeRF's format


def nerf_transforms(
    cameras: Sequence[Camera], width: int, height: int, images: Sequence[str], source: str
) -> dict[str, Any]:
    """``transforms.json`` of perspective ``cameras`` on ``width`` x ``height`` images, frame
    ``i`` naming the file ``images[i]`` (relative to the JSON's folder): ``w``, ``h``, ``fl_x``,
    ``fl_y``, ``cx``, ``cy``, ``camera_angle_x`` and ``camera_angle_y`` at the top when the
    cameras share them, else in each frame; each frame's camera-to-world ``transform_matrix``.
    An orthographic camera is an :class:`InputError` naming ``source`` (the flag asking for it).
    """
    frames, lenses = [], []
    for i, (camera, image) in enumerate(zip(cameras, images, strict=True)):
        if camera.projection != "perspective":
            raise InputError(source, "", f"camera {i} is orthographic: NeRF's format has only "
                             "perspective cameras")
        focal = 1 / math.tan(math.radians(camera.fov) / 2)
        fx, fy, cx, cy = to_pixels(focal, camera.fx_over_fy, camera.principal_point, width, height)
        shift = PIXEL_CENTER["nerf"] - 0.5
        lenses.append({
            "camera_angle_x": 2 * math.atan(width / 2 / fx),
            "camera_angle_y": 2 * math.atan(height / 2 / fy),
            "fl_x": fx, "fl_y": fy, "cx": cx + shift, "cy": cy + shift,
        })  # fmt: skip
        look_at = (camera.eye, camera.target, camera.up)
        pose = (torch.tensor(v, dtype=torch.float64) for v in look_at)
        to_world = np.eye(4)
        to_world[:3, :3] = look_at_rotation(*pose).numpy().T
        to_world[:3, 3] = camera.eye
        frames.append({"file_path": image, "transform_matrix": to_world.tolist()})
    shared = all(lens == lenses[0] for lens in lenses)
    if not shared:
        frames = [{**frame, **lens} for frame, lens in zip(frames, lenses)]
    return {**(lenses[0] if shared else {}), "w": width, "h": height, "frames": frames}


def relative_path(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder``, with ``/`` separators (as camera files write paths)."""
    return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()


def transforms_text(data: dict[str, Any]) -> str:
    """JSON text of :func:`nerf_transforms`'s ``data``, indented, each matrix row on one line."""
    text = json.dumps(data, indent=2)

    def one_line(row: re.Match) -> str:
        return "[" + re.sub(r",\s+", ", ", row[1]) + "]"

    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", one_line, text) + "\n"
