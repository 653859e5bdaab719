"""Triangle meshes: the :class:`Mesh` container, OBJ reading and writing, and primitives.

Tensor contracts used throughout:

- ``vertices``: ``(V, 3)`` floating point (float32 unless stated), world units.
- ``faces``: ``(F, 3)`` int64, 0-based vertex indices, wound counter-clockwise when seen from
  outside, so the right-hand rule gives the outward normal.
- ``vertex_colors``: ``(V, 3)`` float32 RGB in ``[0, 1]``.
- ``face_uvs``: ``(F, 3, 2)`` float32 texture coordinates ``(u, v)`` of each face corner (per corner,
  not per vertex: a UV seam gives one vertex several), OBJ's convention (``v = 0`` at the image's
  bottom).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, show_value
from .files import read_text, write_files

#: The largest float32: vertices are float32, so coordinates beyond it would become infinite.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: How errors say that a number, or what is made of numbers, does not fit in float32.
BEYOND_FLOAT32 = "beyond float32's range (magnitude at most 3.4e38)"
#: The largest OBJ file read, checked before reading it. Reading takes up to about 6x the
#: file's size in memory (its bytes, its text, its lines, the joined "v" and "f" lines): a
#: 222 MB file of 5.2M faces peaked at 1.3 GB. The face limit below is usually reached first
#: (2**23 triangles with texture and normal indices are about 0.8 GB of text).
MAX_OBJ_BYTES = 2**30
#: The most vertices and faces (triangles, after splitting polygons) of an OBJ mesh, checked
#: before their numbers are parsed. At 2**23 faces reading peaks near 2 GB (about 250 bytes a
#: face); a forward + backward on the CPU kernels grew the resident set by 70 to 170 bytes a
#: face beyond its inputs (1.3M to 82k faces at 256 x 256). So a few GB in all, for 100x the
#: largest benchmarked mesh (81,920 faces); the kernels' hard limit is 2**31 (int32 indices).
MAX_MESH_VERTICES = 2**23
MAX_MESH_FACES = 2**23


@dataclass(frozen=True, eq=False)
class Texture:
    """A mesh's color map (an MTL's ``map_Kd``).

    ``image`` ``(Ht, Wt, 3)`` float32 RGB in ``[0, 1]``, row 0 the image's top: the file's stored
    values divided by their full scale, with no sRGB decoding (a texture fit to images and
    written back round-trips; a renderer that decodes sRGB would show it darker). ``wrap``:
    coordinates outside ``[0, 1]`` wrap around (MTL's default) or take the edge texels
    (``-clamp on``). Sampled as ``microdr.raster.texture`` says.
    """

    image: torch.Tensor = field(repr=False)
    wrap: bool = True


@dataclass
class Mesh:
    """A triangle mesh.

    ``vertices`` ``(V, 3)`` floating point (float32 by convention), world units.
    ``faces`` ``(F, 3)`` int64, 0-based, counter-clockwise seen from outside (outward normal by the
    right-hand rule). ``vertex_colors`` ``(V, 3)`` float32 in ``[0, 1]``, or ``None``.
    ``face_uvs`` ``(F, 3, 2)`` float32 per-corner texture coordinates, or ``None``; ``texture``:
    its :class:`Texture`, or ``None`` (a texture needs ``face_uvs``).
    Vertices that no face uses are allowed.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_colors: torch.Tensor | None = None
    face_uvs: torch.Tensor | None = None
    texture: Texture | None = None

    def __post_init__(self) -> None:
        # Shapes are checked once here so that a wrong tensor fails where it was made, not deep
        # inside a rasterizer kernel.
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"Mesh.vertices must be (V, 3), got {tuple(self.vertices.shape)}")
        if not self.vertices.is_floating_point():
            raise ValueError(f"Mesh.vertices must be floating point, got {self.vertices.dtype}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3 or self.faces.dtype != torch.int64:
            raise ValueError(
                f"Mesh.faces must be (F, 3) int64, got {tuple(self.faces.shape)} {self.faces.dtype}"
            )
        if self.vertex_colors is not None and self.vertex_colors.shape != self.vertices.shape:
            raise ValueError(
                f"Mesh.vertex_colors must be {tuple(self.vertices.shape)} like the vertices, "
                f"got {tuple(self.vertex_colors.shape)}"
            )
        if self.face_uvs is not None and self.face_uvs.shape != (self.faces.shape[0], 3, 2):
            raise ValueError(f"Mesh.face_uvs must be (F, 3, 2), got {tuple(self.face_uvs.shape)}")
        if self.texture is not None and self.face_uvs is None:
            raise ValueError("a Mesh with a texture needs face_uvs")

    @property
    def num_vertices(self) -> int:
        return self.vertices.shape[0]

    @property
    def num_faces(self) -> int:
        return self.faces.shape[0]

    def face_normals(self) -> torch.Tensor:
        """Unit outward normals ``(F, 3)``: :func:`triangle_normals` of the faces."""
        return triangle_normals(self.vertices[self.faces])


def triangle_normals(corners: torch.Tensor) -> torch.Tensor:
    """Unit normals ``(..., 3)`` of triangles ``(..., 3 corners, 3)`` by the right-hand rule
    (outward for counter-clockwise faces), in their dtype; zero-area faces give 0.

    Differentiable with respect to the corners; the gradient is finite everywhere (zero for
    zero-area faces).
    """
    normals = torch.linalg.cross(corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :])
    length = torch.linalg.vector_norm(normals, dim=-1, keepdim=True)
    nonzero = length > 0
    # Dividing by a safe length inside the masked branch keeps both the value and the gradient
    # of zero-area faces at 0 instead of 0/0 = NaN.
    safe = torch.where(nonzero, length, torch.ones_like(length))
    return torch.where(nonzero, normals / safe, torch.zeros_like(normals))


# ---------------------------------------------------------------------------------------------
# OBJ reading

# Valid OBJ statements that carry nothing microDR uses (texture coordinates, normals, groups,
# materials, free-form geometry, lines and points).
_IGNORED_STATEMENTS = frozenset(
    "vt vn vp o g s mg usemtl mtllib usemap maplib l p cstype deg bmat step curv curv2 surf "
    "parm trim hole scrv sp end con bevel c_interp d_interp lod shadow_obj trace_obj ctech stech "
    "call csh".split()
)

# OBJ numbers as C writes them. Python's float() and int() would also take "1_0" and non-ASCII
# digits, which no OBJ writer produces, so a typo there would pass silently.
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)
_INT = re.compile(r"[+-]?[0-9]+")


def load_obj(path: str | os.PathLike) -> Mesh:
    """Read a Wavefront OBJ file into a :class:`Mesh`.

    Reads ``v x y z``, ``v x y z w`` and ``v x y z r g b`` (colors in ``[0, 1]``, all vertices or
    none) and ``f`` with ``i``, ``i/t``, ``i//n`` or ``i/t/n`` corners, 1-based or negative
    (relative) indices; polygons are fan-triangulated as ``(v0, vi, vi+1)``. A file that names a
    material library (``mtllib``) and whose faces have texture coordinates (``i/t``) also has its
    ``vt u [v [w]]`` read, and when the materials its faces use (``usemtl``; without any, the library's) have a ``map_Kd``, the mesh gets its
    :class:`Texture` and per-corner ``face_uvs`` (``microdr.io.materials``). Other valid OBJ
    statements are ignored. The weight ``w`` is read and ignored: OBJ's specification gives it
    to rational curves and surfaces only, not to polygon vertices (it is no homogeneous divisor).
    Lines end with LF, CR LF or CR; a backslash at the end of a line continues the statement on
    the next; a UTF-8 byte order mark at the start is skipped. Every problem raises
    :class:`InputError` naming the file and the line (a statement's first line).
    """
    source = str(path)
    text = read_text(path, max_bytes=MAX_OBJ_BYTES)
    lines = _obj_lines(text)
    # A backslash may continue any line, a comment too, and change what the next one is.
    mesh = _load_common_obj(lines, source) if "\\" not in text else None
    if mesh is not None:
        return mesh
    parser = _ObjParser(source)
    for number, statement in obj_statements(lines):
        parser.parse_line(statement, number)
    return parser.finish()


def _obj_lines(text: str) -> list[str]:
    """The lines of OBJ ``text``: a leading byte order mark dropped, LF, CR LF or CR ending each."""
    text = text.removeprefix("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def obj_statements(lines: list[str]) -> Iterator[tuple[int, str]]:
    """``(line number, statement)`` of OBJ ``lines``, 1-based: what each line holds, with lines
    ending in a backslash (and spaces) joined to the next by a space, numbered by their first."""
    continued, first = "", 0
    for number, line in enumerate(lines, start=1):
        if line.rstrip(" \t").endswith("\\"):
            first = first or number
            continued += line.rstrip(" \t")[:-1] + " "
        elif continued:
            yield first, continued + line
            continued, first = "", 0
        else:
            yield number, line
    if continued:
        yield first, continued


# The common form of OBJ files, which _load_common_obj reads in bulk: "v" lines of one length
# (3, 4 or 6 numbers) and "f" lines of positive indices, at the start of their lines, numbers
# separated by spaces or tabs, no comment after a statement.
# Each pattern matches whole lines, joined by "\n" and ending with one. The grammar is
# deterministic, so possessive quantifiers (++, *+, ?+) match the same lines, without keeping
# the backtracking state that makes a pattern over millions of lines slow.
_FLOAT_TEXT = r"[+-]?+(?:[0-9]++\.?+[0-9]*+|\.[0-9]++)(?:[eE][+-]?+[0-9]++)?+"
_VERTEX_LINES = {
    count: re.compile(rf"(?:v(?:[ \t]++{_FLOAT_TEXT}){{{count}}}+[ \t]*+\n)*+")
    for count in (3, 4, 6)
}
_FACE_LINES = re.compile(r"(?:f(?:[ \t]++[0-9]++(?:/[0-9]*+(?:/[0-9]++)?+)?+){3,}+[ \t]*+\n)*+")
_TEXTURE_AND_NORMAL = re.compile(r"/[0-9]*(?:/[0-9]+)?")


def _load_common_obj(lines: list[str], source: str) -> Mesh | None:
    """The mesh of an OBJ file of the common form (above), parsed in bulk by numpy: the same
    :class:`Mesh` as :class:`_ObjParser` makes, about 6x as fast; or ``None`` for any other file
    (relative indices, a comment after a statement, an error...), which :class:`_ObjParser`
    then reads line by line and reports on. Lines must not be continued (no backslash).
    More vertices or faces than the limits raise :class:`InputError` before numbers are parsed.
    """
    vertex_lines, face_lines = [], []
    for line in lines:
        key = line[:2]
        if key == "v " or key == "v\t":
            vertex_lines.append(line)
        elif key == "f " or key == "f\t":
            face_lines.append(line)
        elif line and line[0] != "#":
            words = line.split(None, 1)
            if words and (words[0] not in _IGNORED_STATEMENTS or words[0] == "mtllib"):
                return None  # mtllib: the texture coordinates count
    if not vertex_lines or not face_lines:
        return None
    if len(vertex_lines) > MAX_MESH_VERTICES:
        raise _too_many_vertices(source, _line_of(lines, "v", MAX_MESH_VERTICES + 1))
    if len(face_lines) > MAX_MESH_FACES:
        raise _too_many_faces(source, _line_of(lines, "f", MAX_MESH_FACES + 1))
    values = _common_vertices(vertex_lines)
    triangles = _common_faces(face_lines, len(vertex_lines), source, lines)
    if values is None or triangles is None:
        return None
    colors = values[:, 3:] if values.shape[1] == 6 else None
    if colors is not None and not ((colors >= 0) & (colors <= 1)).all():
        return None
    return Mesh(
        vertices=torch.from_numpy(values[:, :3].astype(np.float32)),
        faces=torch.from_numpy(triangles),
        vertex_colors=torch.from_numpy(colors.astype(np.float32)) if colors is not None else None,
    )


def _common_vertices(vertex_lines: list[str]) -> np.ndarray | None:
    """``(V, 3, 4 or 6)`` float64 numbers of ``v`` lines of one length, within float32's range."""
    count = len(vertex_lines[0].split()) - 1
    text = "\n".join(vertex_lines) + "\n"
    if count not in _VERTEX_LINES or not _VERTEX_LINES[count].fullmatch(text):
        return None
    # Checked above: the only letter "v" is each line's keyword, and every number is decimal.
    # numpy's text parser rounds correctly, as float() does.
    values = np.fromstring(text.replace("v", " "), dtype=np.float64, sep=" ")
    if values.size != len(vertex_lines) * count:
        return None
    values = values.reshape(-1, count)
    # Every number, w and colors too: the line-by-line parser refuses any beyond float32.
    return values if (np.abs(values) <= FLOAT32_MAX).all() else None


def _common_faces(
    face_lines: list[str], vertices: int, source: str, lines: list[str]
) -> np.ndarray | None:
    """``(F, 3)`` int64 0-based triangles of ``f`` lines of indices in 1 to ``vertices``, polygons
    fan-triangulated as :meth:`_ObjParser.parse_face` does; ``lines`` (the whole file's) name
    the face past :data:`MAX_MESH_FACES` triangles, if any."""
    text = "\n".join(face_lines) + "\n"
    if not _FACE_LINES.fullmatch(text):
        return None
    text = text.replace("f", " ")
    if "/" in text:
        text = _TEXTURE_AND_NORMAL.sub("", text)
    # An index beyond int64 is read as int64's largest (strtoll saturates): out of range below.
    corners = np.fromstring(text, dtype=np.int64, sep=" ") - 1
    if corners.min() < 0 or corners.max() >= vertices:
        return None
    if corners.size == 3 * len(face_lines):  # all triangles: at least 3 corners each
        return corners.reshape(-1, 3)
    counts = np.array([len(line.split()) - 1 for line in face_lines], dtype=np.int64)
    fans = counts - 2  # triangles per polygon: (v0, vi, vi+1) for i = 1 .. count - 2
    if fans.sum() > MAX_MESH_FACES:
        polygon = int(np.searchsorted(np.cumsum(fans), MAX_MESH_FACES + 1))
        raise _too_many_faces(source, _line_of(lines, "f", polygon + 1))
    polygon_start = np.repeat(np.cumsum(counts) - counts, fans)
    i = np.arange(fans.sum()) - np.repeat(np.cumsum(fans) - fans, fans) + 1
    return np.stack(
        [corners[polygon_start], corners[polygon_start + i], corners[polygon_start + i + 1]], axis=1
    )


def _line_of(lines: list[str], keyword: str, occurrence: int) -> int:
    """The 1-based number of the line that holds the ``occurrence``-th ``keyword`` statement."""
    seen = 0
    for number, line in enumerate(lines, start=1):
        words = line.split(None, 1)
        seen += bool(words) and words[0] == keyword
        if seen == occurrence:
            return number
    raise ValueError(f"fewer than {occurrence} {keyword!r} lines")


def _too_many_vertices(source: str, line: int) -> InputError:
    return InputError(
        source, f"line {line}", f"more than {MAX_MESH_VERTICES:,} vertices, the limit for a mesh"
    )


def _too_many_faces(source: str, line: int) -> InputError:
    return InputError(
        source,
        f"line {line}",
        f"more than {MAX_MESH_FACES:,} faces (triangles), the limit for a mesh",
    )


class _ObjParser:
    """Accumulates an OBJ file's vertices and triangles line by line."""

    def __init__(self, source: str):
        self.source = source
        self.positions: list[list[float]] = []
        self.colors: list[list[float]] = []
        self.triangles: list[tuple[int, int, int]] = []
        # The line each triangle came from, to name it when an index turns out out of range.
        self.triangle_lines: list[int] = []
        self.first_vertex_line = 0
        # Texture coordinates, read in files with a material library: (u, v) per vt, the vt of
        # each triangle corner (None where a corner has none), and the mtllib and usemtl names
        # with their lines.
        self.uvs: list[tuple[float, float]] = []
        self.triangle_uvs: list[tuple[int | None, int | None, int | None]] = []
        self.libraries: list[tuple[str, int]] = []
        self.materials: list[tuple[str, int]] = []

    def fail(self, line: int, message: str) -> InputError:
        return InputError(self.source, f"line {line}", message)

    def parse_line(self, line: str, number: int) -> None:
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            return
        keyword, args = tokens[0], tokens[1:]
        if keyword == "v":
            self.parse_vertex(args, number)
        elif keyword == "f":
            self.parse_face(args, number)
        elif keyword == "vt":
            if not 1 <= len(args) <= 3:
                raise self.fail(number, f'expected "vt u", "vt u v" or "vt u v w", got {len(args)} values')
            values = [self.parse_float(arg, number) for arg in args]
            self.uvs.append((values[0], values[1] if len(values) > 1 else 0.0))
        elif keyword == "mtllib":
            self.libraries += [(name, number) for name in args]
        elif keyword == "usemtl":
            if args:
                self.materials.append((" ".join(args), number))
        elif keyword not in _IGNORED_STATEMENTS:
            raise self.fail(number, f"unknown statement {show_value(keyword)} (not OBJ)")

    def parse_vertex(self, args: list[str], number: int) -> None:
        if len(args) not in (3, 4, 6):
            raise self.fail(
                number,
                f'expected "v x y z", "v x y z w" or "v x y z r g b", got {len(args)} values',
            )
        values = [self.parse_float(arg, number) for arg in args]
        if len(values) == 4:
            values = values[:3]  # w: a weight of rational curves and surfaces, none here
        if not self.positions:
            self.first_vertex_line = number
        elif (len(values) == 6) != bool(self.colors):
            has, first = ("has a", "does not") if len(values) == 6 else ("has no", "does")
            raise self.fail(
                number,
                f"this vertex {has} color but the first vertex (line {self.first_vertex_line}) "
                f"{first}; give every vertex a color or none",
            )
        if len(self.positions) == MAX_MESH_VERTICES:
            raise _too_many_vertices(self.source, number)
        self.positions.append(values[:3])
        if len(values) == 6:
            for value in values[3:]:
                if not 0.0 <= value <= 1.0:
                    raise self.fail(number, f"vertex color {value:g} is outside [0, 1]")
            self.colors.append(values[3:])

    def parse_float(self, token: str, number: int) -> float:
        if _NON_FINITE.fullmatch(token):
            raise self.fail(number, f"{show_value(token)} is not a finite number")
        if not _FLOAT.fullmatch(token):
            raise self.fail(number, f"{show_value(token)} is not a number")
        value = float(token)
        if abs(value) > FLOAT32_MAX:
            raise self.fail(number, f"{token} is {BEYOND_FLOAT32}")
        return value

    def parse_face(self, args: list[str], number: int) -> None:
        if len(args) < 3:
            raise self.fail(number, f"a face needs at least 3 vertices, got {len(args)}")
        corners = [self.parse_corner(arg, number) for arg in args]
        if len(self.triangles) + len(corners) - 2 > MAX_MESH_FACES:
            raise _too_many_faces(self.source, number)
        for i in range(1, len(corners) - 1):
            triangle = (corners[0], corners[i], corners[i + 1])
            self.triangles.append(tuple(vertex for vertex, _ in triangle))
            self.triangle_uvs.append(tuple(uv for _, uv in triangle))
            self.triangle_lines.append(number)

    def parse_corner(self, token: str, number: int) -> tuple[int, int | None]:
        """The 0-based vertex index of one face corner ``i``, ``i/t``, ``i//n`` or ``i/t/n``, and
        its texture coordinates' index (``None`` without one)."""
        vertex, *rest = token.split("/")
        if len(rest) > 2 or not _is_int(vertex) or not all(p == "" or _is_int(p) for p in rest):
            raise self.fail(
                number,
                f"face vertex {show_value(token)} is not i, i/t, i//n or i/t/n with integers",
            )
        uv = self.index(rest[0], len(self.uvs), "texture coordinate", number) if rest and rest[0] else None
        return self.index(vertex, len(self.positions), "face", number), uv

    def index(self, text: str, defined: int, what: str, number: int) -> int:
        """The 0-based index that OBJ's 1-based or negative (relative to the ``defined`` items
        so far) ``text`` means."""
        index = int(text)
        if index == 0:
            raise self.fail(number, f"{what} index 0 is invalid (OBJ indices start at 1)")
        if index > 0:
            # Positive indices may refer to items defined later; finish() checks their range.
            return index - 1
        if -index > defined:
            things = _vertices(defined) if what == "face" else f"{defined} texture coordinates"
            raise self.fail(number, f"{what} index {index} out of range ({things} defined before this line)")
        return defined + index

    def finish(self) -> Mesh:
        if not self.triangles:
            raise InputError(self.source, "", "no faces")
        count = len(self.positions)
        # Checked in Python, before making a tensor: an index may not even fit in int64.
        for triangle, line in zip(self.triangles, self.triangle_lines):
            if max(triangle) >= count:
                index = next(i for i in triangle if i >= count) + 1
                raise self.fail(
                    line, f"face index {index} out of range (the file has {_vertices(count)})"
                )
        # A material library matters only to faces with texture coordinates: OBJ files often
        # name one that is missing, and must still load.
        has_uvs = any(uv is not None for triangle in self.triangle_uvs for uv in triangle)
        face_uvs, texture = self.texture() if self.libraries and has_uvs else (None, None)
        return Mesh(
            vertices=torch.tensor(self.positions, dtype=torch.float32),
            faces=torch.tensor(self.triangles, dtype=torch.int64),
            vertex_colors=torch.tensor(self.colors, dtype=torch.float32) if self.colors else None,
            face_uvs=face_uvs,
            texture=texture,
        )

    def texture(self) -> tuple[torch.Tensor | None, Texture | None]:
        """``(face_uvs, texture)`` of a file with a material library: ``face_uvs`` when every
        face corner has a ``vt`` (else ``None``), the texture of its materials' ``map_Kd`` (else
        ``None``), which needs ``face_uvs``."""
        from .materials import mesh_texture  # materials reads images (targets), which need scenes

        texture = mesh_texture(self.source, self.libraries, self.materials)
        for triangle, line in zip(self.triangle_uvs, self.triangle_lines):
            if None in triangle:
                if texture is None:
                    return None, None
                raise self.fail(line, "a face corner without texture coordinates (i/t) in a textured mesh")
            if max(triangle) >= len(self.uvs):
                raise self.fail(
                    line, f"texture coordinate index {max(triangle) + 1} out of range (the file has {len(self.uvs)})"
                )
        uvs = torch.tensor(self.uvs, dtype=torch.float32)
        return uvs[torch.tensor(self.triangle_uvs, dtype=torch.int64)], texture


def _vertices(count: int) -> str:
    return f"{count} vertex" if count == 1 else f"{count} vertices"


def _is_int(text: str) -> bool:
    return _INT.fullmatch(text) is not None


# ---------------------------------------------------------------------------------------------
# OBJ writing


def save_obj(
    mesh: Mesh, path: str | os.PathLike, *, vertex_colors: torch.Tensor | None = None
) -> None:
    """Write ``mesh`` as OBJ: ``v x y z [r g b]`` lines, then 1-based ``f a b c`` lines.

    ``vertex_colors`` ``(V, 3)`` in ``[0, 1]`` are written instead of ``mesh.vertex_colors`` when
    given. Numbers are written as the shortest text that reads back to the same value of their
    dtype, so a float32 mesh round-trips exactly. The file is replaced atomically: a crash leaves
    either the old file or the new one, never a part. Non-finite vertices, and files that cannot
    be written, raise :class:`InputError`.
    """
    write_files({Path(path): obj_text(mesh, vertex_colors=vertex_colors, source=str(path)).encode("utf-8")})


def obj_text(
    mesh: Mesh, *, vertex_colors: torch.Tensor | None = None, material_library: str | None = None,
    source: str = "",
) -> str:
    """The OBJ text :func:`save_obj` writes; with a ``material_library`` (a textured mesh's), it
    names it (``mtllib``, ``usemtl texture``) and gives each face corner its ``vt``, in face order
    (``f a/t b/t c/t``). Non-finite vertices raise :class:`InputError` naming ``source``."""
    colors = mesh.vertex_colors if vertex_colors is None else vertex_colors
    if colors is not None and colors.shape != mesh.vertices.shape:
        raise ValueError(
            f"vertex_colors must be {tuple(mesh.vertices.shape)}, got {tuple(colors.shape)}"
        )
    vertices = mesh.vertices.detach().cpu().numpy()
    if not np.isfinite(vertices).all():
        raise InputError(source, "", "refusing to write non-finite (NaN or inf) vertices")
    columns = vertices if colors is None else np.hstack([vertices, colors.detach().cpu().numpy()])
    lines = ["# written by microDR"]
    if material_library is not None:
        lines += [f"mtllib {material_library}", "usemtl texture"]
    # str() of a numpy scalar is its shortest round-trip representation for that dtype.
    lines += ["v " + " ".join(str(x) for x in row) for row in columns]
    faces = (mesh.faces.detach().cpu() + 1).tolist()
    if material_library is None:
        lines += [f"f {a} {b} {c}" for a, b, c in faces]
    else:
        lines += ["vt " + " ".join(str(x) for x in uv) for uv in mesh.face_uvs.detach().cpu().numpy().reshape(-1, 2)]
        lines += [f"f {a}/{3 * i + 1} {b}/{3 * i + 2} {c}/{3 * i + 3}" for i, (a, b, c) in enumerate(faces)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Primitives

_GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0

_ICOSAHEDRON_VERTICES = [
    (-1, _GOLDEN, 0), (1, _GOLDEN, 0), (-1, -_GOLDEN, 0), (1, -_GOLDEN, 0),
    (0, -1, _GOLDEN), (0, 1, _GOLDEN), (0, -1, -_GOLDEN), (0, 1, -_GOLDEN),
    (_GOLDEN, 0, -1), (_GOLDEN, 0, 1), (-_GOLDEN, 0, -1), (-_GOLDEN, 0, 1),
]  # fmt: skip

_ICOSAHEDRON_FACES = [
    (0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11),
    (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6), (7, 1, 8),
    (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9),
    (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1),
]  # fmt: skip


def icosphere(subdivisions: int = 2, radius: float = 1.0) -> Mesh:
    """A geodesic sphere centered at the origin: ``20 * 4**subdivisions`` faces.

    Level 0 is the icosahedron; each level splits every triangle into four at its edge midpoints
    (shared between neighbours, so there are ``10 * 4**subdivisions + 2`` vertices) and pushes the
    new vertices onto the sphere. Float32, outward counter-clockwise winding.
    """
    if not isinstance(subdivisions, int) or subdivisions < 0:
        raise ValueError(f"subdivisions must be an integer >= 0, got {subdivisions!r}")
    _check_positive("radius", radius)
    # Built in float64 so that the final float32 vertices are as close to the sphere as possible.
    vertices = _on_unit_sphere(torch.tensor(_ICOSAHEDRON_VERTICES, dtype=torch.float64))
    faces = torch.tensor(_ICOSAHEDRON_FACES, dtype=torch.int64)
    for _ in range(subdivisions):
        vertices, faces = _subdivide(vertices, faces)
        vertices = _on_unit_sphere(vertices)
    return Mesh((vertices * radius).to(torch.float32), faces)


def _on_unit_sphere(points: torch.Tensor) -> torch.Tensor:
    return points / torch.linalg.vector_norm(points, dim=1, keepdim=True)


def _subdivide(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each triangle ``(a, b, c)`` into four at its edge midpoints, keeping the winding.

    Each undirected edge gets one midpoint vertex (appended after the old vertices), shared by
    the two faces on it; ``torch.unique`` over the sorted edge pairs is the edge -> midpoint cache.
    """
    edges = faces[:, [[0, 1], [1, 2], [2, 0]]]  # (F, 3 edges ab bc ca, 2)
    unique_edges, edge_ids = torch.unique(
        edges.sort(dim=-1).values.reshape(-1, 2), dim=0, return_inverse=True
    )
    midpoints = vertices[unique_edges].mean(dim=1)
    a, b, c = faces.unbind(dim=1)
    ab, bc, ca = (edge_ids + len(vertices)).reshape(-1, 3).unbind(dim=1)
    children = [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
    new_faces = torch.stack([torch.stack(child, dim=1) for child in children], dim=1)
    return torch.cat([vertices, midpoints]), new_faces.reshape(-1, 3)


def cube(size: float = 2.0) -> Mesh:
    """An axis-aligned cube of edge ``size`` centered at the origin: 8 vertices, 12 triangles.

    Float32, outward counter-clockwise winding.
    """
    _check_positive("size", size)
    # Vertex i has x, y, z = bits 0, 1, 2 of i (0 -> -size/2, 1 -> +size/2).
    corners = [[(i >> axis) & 1 for axis in range(3)] for i in range(8)]
    vertices = (torch.tensor(corners, dtype=torch.float32) - 0.5) * size
    faces = torch.tensor(
        [
            (0, 4, 6), (0, 6, 2),  # -x
            (1, 3, 7), (1, 7, 5),  # +x
            (0, 1, 5), (0, 5, 4),  # -y
            (2, 6, 7), (2, 7, 3),  # +y
            (0, 2, 3), (0, 3, 1),  # -z
            (4, 5, 7), (4, 7, 6),  # +z
        ],
        dtype=torch.int64,
    )  # fmt: skip
    return Mesh(vertices, faces)


def plane(size: float = 2.0) -> Mesh:
    """A ``size`` x ``size`` square in the xz plane (y = 0), centered, facing +y.

    4 vertices, 2 triangles, float32, counter-clockwise seen from +y.
    """
    _check_positive("size", size)
    half = size / 2.0
    vertices = torch.tensor(
        [(-half, 0, -half), (half, 0, -half), (half, 0, half), (-half, 0, half)],
        dtype=torch.float32,
    )
    faces = torch.tensor([(0, 2, 1), (0, 3, 2)], dtype=torch.int64)
    return Mesh(vertices, faces)


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
