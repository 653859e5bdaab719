"""Material libraries (MTL files): a mesh's texture from its ``map_Kd``, and textured OBJ output.

microDR reads one thing from MTL files: the diffuse color map ``map_Kd`` of the materials an OBJ
file's faces use, with its ``-clamp on|off`` option (off, the default, wraps coordinates around).
Other statements (colors, other maps) are ignored; other ``map_Kd`` options change the mapping
and are refused. A mesh takes one texture: faces that use materials with different maps, or
some with a map and some without, are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, show_value
from .files import file_problem, read_text
from .images import encode_png, to_uint8
from .mesh import Mesh, Texture, obj_text
from .targets import read_image


@dataclass(frozen=True)
class ColorMap:
    """One material's ``map_Kd``: the image file (resolved) and whether it wraps."""

    path: Path
    wrap: bool


def mesh_texture(
    obj_source: str, libraries: list[tuple[str, int]], used: list[tuple[str, int]]
) -> Texture | None:
    """The texture of an OBJ file (``obj_source``) naming material ``libraries`` (file name,
    line) whose faces use materials ``used`` (name, line; none: every material of the
    libraries); ``None`` if none of them has a ``map_Kd``."""
    materials: dict[str, ColorMap | None] = {}
    for name, line in libraries:
        path = Path(obj_source).parent / name
        problem = file_problem(path)
        if problem:
            raise InputError(obj_source, f"line {line}", f"material library {show_value(name)}: {problem}")
        materials.update(read_material_library(path))
    if not used:
        used = [(name, 0) for name in materials]
    maps: dict[str, ColorMap | None] = {}
    for name, line in used:
        if name not in materials:
            libraries_named = ", ".join(name for name, _ in libraries)
            raise InputError(obj_source, f"line {line}", f"material {show_value(name)} is in no material library ({libraries_named})")
        maps.setdefault(name, materials[name])
    chosen = set(maps.values())
    if len(chosen) > 1:
        described = ", ".join(f"{name}: {'no map_Kd' if m is None else m.path.name}" for name, m in maps.items())
        raise InputError(obj_source, "", f"its faces use materials with different textures ({described}); a mesh takes one")
    color_map = chosen.pop() if chosen else None
    if color_map is None:
        return None
    return Texture(rgb_texture(read_image(color_map.path)), color_map.wrap)


def rgb_texture(image: torch.Tensor) -> torch.Tensor:
    """``(Ht, Wt, 3)`` RGB from an image ``(C, Ht, Wt)`` as :func:`read_image` gives it: gray
    repeated, alpha dropped."""
    rgb = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    return rgb.permute(1, 2, 0).contiguous()


def read_material_library(path: Path) -> dict[str, ColorMap | None]:
    """Each material of an MTL file with its ``map_Kd``, or ``None`` without one; problems raise
    :class:`InputError` naming the file and line."""
    source = str(path)
    materials: dict[str, ColorMap | None] = {}
    current = None
    for number, line in enumerate(read_text(path).removeprefix("\ufeff").splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "newmtl":
            if len(words) < 2:
                raise InputError(source, f"line {number}", "newmtl without a name")
            current = " ".join(words[1:])
            materials[current] = None
        elif words[0] == "map_Kd":
            if current is None:
                raise InputError(source, f"line {number}", "map_Kd before any newmtl")
            materials[current] = _color_map(words[1:], path.parent, source, number)
    return materials


def _color_map(words: list[str], folder: Path, source: str, number: int) -> ColorMap:
    wrap = True
    while words and words[0].startswith("-"):
        if words[0] != "-clamp" or len(words) < 2 or words[1] not in ("on", "off"):
            raise InputError(
                source, f"line {number}", f"map_Kd option {show_value(words[0])}: microDR reads only -clamp on|off"
            )
        wrap = words[1] == "off"
        words = words[2:]
    if not words:
        raise InputError(source, f"line {number}", "map_Kd without an image file")
    path = folder / " ".join(words)
    problem = file_problem(path)
    if problem:
        raise InputError(source, f"line {number}", f"map_Kd {show_value(' '.join(words))}: {problem}")
    return ColorMap(path, wrap)


def textured_obj_files(mesh: Mesh, obj_name: str, texture_name: str) -> dict[str, bytes]:
    """A textured mesh as files, by name: ``obj_name`` (vertices, per-corner ``vt``, faces
    ``v/vt``, ``mtllib``), the MTL beside it (one material, ``map_Kd`` ``texture_name``,
    ``-clamp on`` unless it wraps) and the texture as an 8-bit RGB PNG."""
    library = Path(obj_name).with_suffix(".mtl").name
    clamp = "" if mesh.texture.wrap else "-clamp on "
    material = f"# written by microDR\nnewmtl texture\nKd 1 1 1\nmap_Kd {clamp}{texture_name}\n"
    image = to_uint8(mesh.texture.image.permute(2, 0, 1))
    return {
        obj_name: obj_text(mesh, material_library=library).encode("utf-8"),
        library: material.encode("utf-8"),
        texture_name: encode_png(np.ascontiguousarray(image)),
    }
