"""SoftRas's airplane demo as a microDR task: a scene and silhouette targets from its data.

    python scripts/softras_airplane.py [--data DIR] [-o OUTDIR] [--views SPEC] [--holdout SPEC] [--check]
    python scripts/softras_airplane.py --score MESH.obj [--views SPEC]

Reads ``source.npy`` (120 RGBA renders, 64 x 64, made by SoftRas), ``camera.npy`` (distance,
elevation, azimuth per view) and the template ``sphere_1352.obj`` from ``--data`` (default
``../shared/data/softras`` beside the repository) and writes into OUTDIR:

- ``template.obj``: the sphere, scaled by 0.5 as in SoftRas's ``demo_deform.py``;
- ``targets/view_NNN.png``: RGBA targets, the alpha channel being the silhouette;
- ``scene.json``: the template, one camera per chosen view, and an ``optimize`` section
  (:data:`OPTIMIZE`): microDR's defaults for silhouettes (negative IoU + SoftRas's Laplacian,
  sigma annealed from 3e-4 to 3e-6) with remeshing toward edges of 0.05 to 0.03 units every 50
  iterations up to 70 % of the run (free vertices as offsets, Adam lr 0.002, betas 0.5 / 0.99),
  1000 iterations of 12 views drawn at random (``--views-per-step``, ``--iterations``); with
  ``--holdout SPEC``, ``optimize.holdout`` is SPEC (``odd``: the scene's odd cameras never enter
  the loss, only the metrics). ``scripts/airplane_experiments.py`` measures how each setting
  got there.

Then ``microdr optimize OUTDIR/scene.json OUTDIR/targets`` recovers the airplane. With all 120
views and ``--holdout odd`` it fits the 60 even views and scores the 60 odd ones: ``metrics.json``
``final.held_out``.

``--score MESH.obj`` writes nothing: it prints the hard silhouette IoU
(:func:`microdr.render.hard_silhouettes`: exact coverage of pixel centers, against the targets'
alpha > 0.5) of a mesh, e.g. a result's ``mesh.obj`` or SoftRas's ``plane.obj``, on the views
``--views`` names (``odd``: the 60 views held out by a fit on the even ones), mean and min.

Camera convention (checked by ``--check``, which renders SoftRas's own result ``plane.obj``
with these cameras and compares silhouettes): the eye of view ``(d, el, az)`` is at
``(d cos el sin az, d sin el, -d cos el cos az)`` looking at the origin with up +y, vertical
field of view 30 degrees. SoftRas's camera x axis is ``cross(up, forward)``, the mirror image of
a right-handed camera's, so the targets are flipped left-right here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import microdr  # noqa: E402,F401  (before torch: it sets torch's OpenMP wait policy)
import torch  # noqa: E402

from microdr.io.files import write_files  # noqa: E402
from microdr.io.images import encode_png  # noqa: E402
from microdr.io.mesh import Mesh, load_obj, save_obj  # noqa: E402
from microdr.render import hard_silhouettes, render_faces  # noqa: E402
from microdr.errors import InputError  # noqa: E402
from microdr.io.scene import (  # noqa: E402
    Camera,
    OptimizeSettings,
    RenderSettings,
    held_out_views,
    holdout_from_text,
    override_optimize,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "softras"
FOV = 30.0  # SoftRas's viewing_angle = 15 is the half-angle
SIZE = 64
SIGMA = 1e-4
TEMPLATE_SCALE = 0.5
#: The task's ``optimize`` section, but for ``iterations``, ``views_per_step`` and ``holdout``.
OPTIMIZE = {
    "parameters": ["vertices"],
    "vertex_parametrization": "offset",
    "lr": 0.002,
    "betas": [0.5, 0.99],
    "remesh": {"edge_length": [0.05, 0.03], "every": 50, "until": 0.7},
}
VIEWS_PER_STEP = 12
ITERATIONS = 1000


def softras_eye(distance: float, elevation: float, azimuth: float) -> tuple[float, float, float]:
    el, az = math.radians(elevation), math.radians(azimuth)
    return (distance * math.cos(el) * math.sin(az), distance * math.sin(el),
            -distance * math.cos(el) * math.cos(az))


def cameras(camera_table: np.ndarray) -> list[Camera]:
    return [Camera("perspective", softras_eye(*row), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), FOV, None, 0.1, 100.0)
            for row in camera_table.tolist()]


def parse_views(spec: str, total: int) -> list[int]:
    """``all``, a count ``N`` (N views spread evenly), or the views that ``optimize.holdout``
    would name (:func:`microdr.io.scene.held_out_views`): ``odd``, ``even``, ``every:K``, or a comma
    list of indices."""
    if spec == "all":
        return list(range(total))
    if "," not in spec and spec.isdigit() and not spec.startswith("0"):
        count = int(spec)
        if not 1 <= count <= total:
            raise SystemExit(f"--views: expected 1 to {total} views, got {count}")
        return sorted({round(i * total / count) % total for i in range(count)})
    try:
        named = override_optimize(OptimizeSettings(), "holdout", holdout_from_text(spec), "--views")
    except InputError as error:
        raise SystemExit(str(error)) from None
    views = held_out_views(named.holdout, total)
    if any(not 0 <= v < total for v in views):
        raise SystemExit(f"--views: indices must be in [0, {total})")
    return list(views)


def silhouettes(data: Path) -> np.ndarray:
    """The targets' alpha ``(120, 64, 64)`` in [0, 1], flipped left-right (see the docstring)."""
    source = np.load(data / "source.npy")
    return source[:, 3, :, ::-1].astype(np.float32) / 255.0


def scene_json(views: list[int], camera_list: list[Camera], views_per_step: int, iterations: int,
               holdout: str | None = None) -> dict:
    """The task's scene: one camera per view of ``views``; ``holdout``: its ``optimize.holdout``
    (as ``--holdout`` gives it, over the scene's cameras), checked here."""
    optimize = {**OPTIMIZE, "iterations": iterations}
    fit = len(views)
    if holdout is not None:
        try:
            settings = override_optimize(
                OptimizeSettings(), "holdout", holdout_from_text(holdout), "--holdout", len(views)
            )
        except InputError as error:
            raise SystemExit(str(error)) from None
        held_out = settings.holdout
        optimize["holdout"] = held_out if isinstance(held_out, str) else list(held_out)
        fit -= len(held_out_views(held_out, len(views)))
    optimize["views_per_step"] = min(views_per_step, fit)
    return {
        "image": {"width": SIZE, "height": SIZE},
        "render": {"sigma": SIGMA, "gamma": 1e-4},
        "meshes": [{"file": "template.obj", "color": [0.8, 0.8, 0.8]}],
        "cameras": [{"eye": list(camera_list[v].eye), "fov": FOV} for v in views],
        "optimize": optimize,
    }


def hard_iou(mesh: Mesh, camera_list: list[Camera], targets: np.ndarray) -> np.ndarray:
    """Per view, the hard silhouette IoU of ``mesh`` seen by ``camera_list`` against ``targets``
    ``(N, 64, 64)`` (alpha in [0, 1], thresholded at 0.5)."""
    render = RenderSettings(width=SIZE, height=SIZE, sigma=SIGMA)
    mine = hard_silhouettes(mesh.vertices[mesh.faces], camera_list, render).numpy()
    theirs = targets > 0.5
    return (mine & theirs).sum((1, 2)) / np.maximum((mine | theirs).sum((1, 2)), 1)


def check_convention(data: Path, camera_list: list[Camera], targets: np.ndarray) -> None:
    """Render SoftRas's result ``plane.obj`` with these cameras; print the silhouette IoU."""
    plane = load_obj(data / "plane.obj")
    render = RenderSettings(width=SIZE, height=SIZE, sigma=SIGMA)
    corners = plane.vertices[plane.faces]
    albedo = torch.ones_like(corners)
    alpha = render_faces(corners, albedo, camera_list, render, None)[:, 3].numpy()
    for name, target in (("flipped (used)", targets), ("as stored", targets[:, :, ::-1])):
        a, t = alpha > 0.5, target > 0.5
        iou = (a & t).sum((1, 2)) / np.maximum((a | t).sum((1, 2)), 1)
        print(f"plane.obj vs targets {name}: mean IoU {iou.mean():.4f}, min {iou.min():.4f}")


def write_task(data: Path, output: Path, views: list[int], scene: dict) -> None:
    """Write ``scene`` (a scene's JSON, one camera per view of ``views``) as ``output/scene.json``,
    the template and the targets of ``views`` beside it."""
    targets = silhouettes(data)
    files = {}
    for v in views:
        rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
        rgba[..., 3] = np.round(targets[v] * 255).astype(np.uint8)
        files[output / "targets" / f"view_{v:03d}.png"] = encode_png(rgba)
    files[output / "scene.json"] = (json.dumps(scene, indent=2) + "\n").encode()
    write_files(files)
    template = load_obj(data / "sphere_1352.obj")
    save_obj(Mesh(template.vertices * TEMPLATE_SCALE, template.faces), output / "template.obj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SoftRas demo data folder")
    parser.add_argument("-o", "--output", type=Path, default=Path("out/airplane"), help="output folder")
    parser.add_argument("--views", default="all",
                        help='"all", a count N (evenly spread), "odd", "even", "every:K" or "0,15,30"')
    parser.add_argument("--holdout", metavar="SPEC",
                        help='optimize.holdout: cameras of the scene scored but never fit ("odd", "even", '
                        '"every:K", "3,7,11")')
    parser.add_argument("--views-per-step", type=int, default=VIEWS_PER_STEP,
                        help="views rendered per iteration, drawn at random (SoftRas renders all 120)")
    parser.add_argument("--iterations", type=int, default=ITERATIONS, help="optimizer iterations (SoftRas: 2000)")
    parser.add_argument("--check", action="store_true", help="check the camera convention with plane.obj")
    parser.add_argument("--score", type=Path, metavar="MESH",
                        help="print the hard IoU of MESH (an OBJ) on --views, then exit")
    args = parser.parse_args()
    if not (args.data / "source.npy").is_file():
        raise SystemExit(f"{args.data}: no SoftRas demo data here (source.npy); give --data")
    camera_list = cameras(np.load(args.data / "camera.npy"))
    targets = silhouettes(args.data)
    if args.check:
        check_convention(args.data, camera_list, targets)
    views = parse_views(args.views, len(camera_list))
    if args.score is not None:
        ious = hard_iou(load_obj(args.score), [camera_list[v] for v in views], targets[views])
        print(f"{args.score}: hard IoU on {len(views)} views ({args.views}): mean {ious.mean():.4f}, "
              f"min {ious.min():.4f} (view {views[int(ious.argmin())]})")
        return
    scene = scene_json(views, camera_list, args.views_per_step, args.iterations, args.holdout)
    write_task(args.data, args.output, views, scene)
    print(f"wrote {args.output}/scene.json, template.obj and {len(views)} targets")
    print(f"next: microdr optimize {args.output}/scene.json {args.output}/targets -o {args.output}/result")


if __name__ == "__main__":
    main()
