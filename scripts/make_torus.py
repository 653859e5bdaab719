"""Write ``scenes/meshes/torus.obj``: a torus with rainbow vertex colors for the bundled scene.

The ring lies in the xz plane around the y axis; the hue goes once around the ring. Run from
anywhere with microDR importable (installed, or ``PYTHONPATH=.``):
``python scripts/make_torus.py [OUT]``.
"""

from __future__ import annotations

import colorsys
import math
import sys
from pathlib import Path

import torch

from microdr.io.mesh import Mesh, save_obj

RING_RADIUS = 1.0
TUBE_RADIUS = 0.4
RING_SEGMENTS = 48
TUBE_SEGMENTS = 24
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "scenes" / "meshes" / "torus.obj"


def torus() -> tuple[Mesh, torch.Tensor]:
    """The torus mesh (outward counter-clockwise winding) and its rainbow colors ``(V, 3)``."""
    positions, colors = [], []
    for i in range(RING_SEGMENTS):
        u = 2 * math.pi * i / RING_SEGMENTS
        rgb = colorsys.hsv_to_rgb(i / RING_SEGMENTS, 0.8, 1.0)
        for j in range(TUBE_SEGMENTS):
            v = 2 * math.pi * j / TUBE_SEGMENTS
            # Distance from the y axis.
            radius = RING_RADIUS + TUBE_RADIUS * math.cos(v)
            y = TUBE_RADIUS * math.sin(v)
            positions.append((radius * math.cos(u), y, radius * math.sin(u)))
            colors.append(rgb)
    faces = []
    for i in range(RING_SEGMENTS):
        for j in range(TUBE_SEGMENTS):
            a, b = _index(i, j), _index(i, j + 1)
            c, d = _index(i + 1, j + 1), _index(i + 1, j)
            # Around the tube (j) first, then along the ring (i): that order turns
            # counter-clockwise seen from outside.
            faces += [(a, b, c), (a, c, d)]
    mesh = Mesh(torch.tensor(positions, dtype=torch.float32), torch.tensor(faces))
    return mesh, torch.tensor(colors, dtype=torch.float32)


def _index(i: int, j: int) -> int:
    """The vertex at ring step ``i`` and tube step ``j``; both wrap around."""
    return (i % RING_SEGMENTS) * TUBE_SEGMENTS + j % TUBE_SEGMENTS


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    mesh, colors = torus()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_obj(mesh, out, vertex_colors=colors)
    print(f"wrote {out} ({mesh.num_vertices} vertices, {mesh.num_faces} faces)")


if __name__ == "__main__":
    main()
