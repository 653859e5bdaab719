"""The bundled optimization tasks, whose ground truth is known: targets, runs, numbers, pictures.

    python scripts/make_tasks.py [--task NAME] [--run] [-o OUT] [--pictures]

A task is a pair of scenes in ``scenes/tasks/``: ``<task>_truth.json``, the ground truth, and
``<task>.json``, the start with the ``optimize`` section that recovers the truth. This script
renders each truth into ``scenes/tasks/<task>_targets/view_NN.png`` (8-bit RGBA, one per camera).
The targets are committed, so that on a fresh clone

    microdr optimize scenes/tasks/<task>.json scenes/tasks/<task>_targets

works without running this script first. The tasks, and the floors a run must reach:

- ``colors``: the torus with fixed geometry and lights; its per-vertex colors start random
  (``colors_start.obj``, written here from a fixed seed) and are recovered from 6 RGBA views.
  Mean PSNR of the result's renders against the targets >= 40 dB.
- ``ellipsoid``: an icosphere deformed into an ellipsoid with a bump (a small sphere sunk into
  it) from 8 silhouettes (black on black: the targets hold no color). Mean IoU >= 0.95 on the
  8 fitting views and on 8 held-out views.
- ``shape_color``: a gray icosphere deformed into the RGB color cube (each corner colored by
  its position), vertices and per-vertex colors together from 8 RGBA views. Mean IoU >= 0.95 on
  the fitting and the held-out views, mean PSNR >= 24 dB. The shape's error caps the PSNR: at
  ``sigma = 1e-4`` edges are a third of a pixel wide, so a silhouette off by a fraction of a
  pixel flips whole pixels between a color and the black background; nearly all of the error
  is within two pixels of the silhouette.
- ``cow``: Keenan Crane's spot (``scenes/meshes/spot.obj``) from a level-4 icosphere, 24
  silhouettes at 128 x 128 of which the scene holds out the 12 odd ones (``optimize.holdout``):
  they never enter the loss. microDR's defaults for silhouettes, 500 iterations. Mean IoU >=
  0.92 on the 12 fitting and the 12 held-out views.
- ``cow_texture``: spot's texture (``scenes/meshes/spot_triangulated.obj``, its 1024 x 1024
  ``spot_texture.png``) recovered, geometry fixed, from 12 RGB views at 256 x 256 (sigma
  2.5e-5), starting from a gray texture of 512 x 512 (which can reach 39.6 dB inside the
  silhouettes: the truth's texture averaged down to 512 and rendered); the scene holds out 6
  more views, two at each of its three elevations. Mean PSNR inside the target's silhouette
  (``psnr_inside``) >= 30 dB on the 6 held-out views; 70 iterations of all 12 views.

``--run`` runs each task as ``microdr optimize`` does (targets read from the files, the scene's
``optimize`` section, seed 0), writing the usual outputs into ``OUT/<task>/`` (default
``out/tasks``), then prints a table and exits 1 if a floor is missed. Held-out views: 8 cameras
(unless the scene holds out its own, as the cow does: then those and their targets) at the
distance, field of view and target of the task's first camera, at azimuths halfway between
the fitting ones (22.5 + 45 k degrees) and elevations 10, 65, -10, -65 degrees in turn, so that
the shape is also judged from nearly above and below. Every IoU is the hard one of
``metrics.json`` (:class:`microdr.optimize.losses.Metrics`): the pixels whose center the result's mesh
covers against the target's alpha > 0.5; on the held-out views the target is the truth's render.

``--pictures`` (implies ``--run``) writes ``scenes/previews/task_<task>.png``: truth | start |
result, fitting view 0 above held-out view 1 (from 65 degrees up), at 128 x 128. Silhouette
tasks are shown as gray clay under a light, since neither their targets nor their results have
colors.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import microdr  # noqa: E402,F401  (before torch: it sets torch's OpenMP wait policy)
import torch  # noqa: E402

from microdr.io.files import write_files  # noqa: E402
from microdr.io.images import encode_png, grid, to_uint8  # noqa: E402
from microdr.optimize.losses import IOU_THRESHOLD, mask_iou  # noqa: E402
from microdr.io.mesh import Mesh, load_obj, save_obj  # noqa: E402
from microdr.optimize.loop import Result, optimize  # noqa: E402
from microdr.render import hard_silhouettes, render_scene, scene_faces  # noqa: E402
from microdr.io.scene import Camera, DirectionalLight, Lights, Scene, load_scene  # noqa: E402
from microdr.io.targets import read_targets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "scenes" / "tasks"
PREVIEWS_DIR = REPO / "scenes" / "previews"
#: (elevation, azimuth) in degrees of the held-out cameras.
HELD_OUT = tuple(((10, 65, -10, -65)[k % 4], 22.5 + 45 * k) for k in range(8))
#: The side of each picture panel, in pixels.
PREVIEW_SIDE = 128
#: How silhouette tasks are shown: this albedo under these lights.
CLAY = 0.7
CLAY_LIGHTS = Lights(ambient=0.3, directional=(DirectionalLight((0.5, 1.0, 0.8), 0.8),))
#: The colors task's random start colors: the seed, and the steps per unit they are rounded to
#: (which keeps the OBJ short).
START_COLOR_SEED = 0
START_COLOR_STEPS = 100


@dataclass(frozen=True)
class Task:
    """A bundled task and its floors: ``min_iou`` on the mean IoU of the fitting and of the
    held-out views (``None``: the shape is fixed), ``min_psnr`` (dB) on the mean PSNR of the
    fitting views (``None``: colors are not recovered), ``min_held_out_psnr_inside`` (dB) on the
    mean PSNR inside the silhouettes of the scene's held-out views (``None``: not scored)."""

    name: str
    min_iou: float | None = None
    min_psnr: float | None = None
    min_held_out_psnr_inside: float | None = None

    @property
    def recovers_colors(self) -> bool:
        """Whether the task scores colors (its targets have them); else it fits silhouettes."""
        return self.min_psnr is not None or self.min_held_out_psnr_inside is not None

    @property
    def scene(self) -> Path:
        return TASKS_DIR / f"{self.name}.json"

    @property
    def truth(self) -> Path:
        return TASKS_DIR / f"{self.name}_truth.json"

    @property
    def targets(self) -> Path:
        return TASKS_DIR / f"{self.name}_targets"


TASKS = (
    Task("colors", min_psnr=40.0),
    Task("ellipsoid", min_iou=0.95),
    Task("shape_color", min_iou=0.95, min_psnr=24.0),
    Task("cow", min_iou=0.92),
    Task("cow_texture", min_held_out_psnr_inside=30.0),
)


# ---------------------------------------------------------------------------------------------
# Inputs


def write_colors_start() -> None:
    """``colors_start.obj``, the colors task's start: the torus with random vertex colors."""
    torus = load_obj(REPO / "scenes" / "meshes" / "torus.obj")
    generator = torch.Generator().manual_seed(START_COLOR_SEED)
    colors = torch.rand(torus.num_vertices, 3, generator=generator)
    # Dividing (not multiplying by 0.01) gives the float nearest each hundredth: short text.
    colors = (colors * START_COLOR_STEPS).round() / START_COLOR_STEPS
    mesh = Mesh(torus.vertices, torus.faces)
    save_obj(mesh, TASKS_DIR / "colors_start.obj", vertex_colors=colors)


def write_targets(task: Task) -> None:
    """Render the task's truth into its targets folder, replacing what was there."""
    images = to_uint8(render_scene(load_scene(task.truth)))
    files = {task.targets / f"view_{i:02d}.png": encode_png(im) for i, im in enumerate(images)}
    # A truth with fewer cameras than before leaves no stale view behind.
    stale = set(task.targets.glob("*.png")) - set(files)
    write_files(files)
    for path in stale:
        path.unlink()


# ---------------------------------------------------------------------------------------------
# Runs and measurements


@dataclass(frozen=True)
class Measured:
    """One task's run: its result and how well it matches (``None``: not measured)."""

    task: Task
    result: Result
    views: int
    iou_fit: float | None
    iou_held_out: float | None
    psnr: float | None
    held_out_psnr_inside: float | None = None

    def missed(self) -> list[str]:
        """The floors the run did not reach, as text."""
        task, missed = self.task, []
        if task.min_iou is not None:
            for name, iou in (("IoU fit", self.iou_fit), ("IoU held-out", self.iou_held_out)):
                if iou < task.min_iou:
                    missed.append(f"{name} {iou:.3f} < {task.min_iou}")
        if task.min_psnr is not None and self.psnr < task.min_psnr:
            missed.append(f"PSNR {self.psnr:.2f} < {task.min_psnr}")
        floor = task.min_held_out_psnr_inside
        if floor is not None and self.held_out_psnr_inside < floor:
            missed.append(f"held-out PSNR inside {self.held_out_psnr_inside:.2f} < {floor}")
        return missed


def run_task(task: Task, outdir: Path) -> Measured:
    """Run the task as ``microdr optimize`` does, writing its outputs into ``outdir``, and
    measure the result against its targets and, on held-out views, against the truth."""
    scene = load_scene(task.scene)
    size = (scene.render.width, scene.render.height)
    targets = read_targets(
        [str(task.targets)], len(scene.cameras), size, background=scene.render.background
    )
    result = optimize(scene, targets, outdir=outdir)
    iou_held_out = None
    if result.held_out_metrics is not None:
        iou_held_out = result.held_out_metrics.mean_iou
    elif task.min_iou is not None:
        cameras = held_out_cameras(scene.cameras[0])
        truth = render_scene(replace(load_scene(task.truth), cameras=cameras))
        covered = hard_silhouettes(scene_faces(result.scene).corners, cameras, result.scene.render)
        iou_held_out = mask_iou(covered, truth[:, 3] > IOU_THRESHOLD).mean().item()
    return Measured(
        task=task,
        result=result,
        views=len(scene.cameras),
        iou_fit=result.metrics.mean_iou if task.min_iou is not None else None,
        iou_held_out=iou_held_out,
        psnr=result.metrics.mean_psnr if task.min_psnr is not None else None,
        held_out_psnr_inside=(
            result.held_out_metrics.mean_psnr_inside if task.min_held_out_psnr_inside is not None else None
        ),
    )


def held_out_cameras(camera: Camera) -> list[Camera]:
    """Like ``camera`` (distance to its target, projection, field of view) but looking from the
    :data:`HELD_OUT` directions."""
    distance = math.dist(camera.eye, camera.target)
    cameras = []
    for elevation, azimuth in HELD_OUT:
        el, az = math.radians(elevation), math.radians(azimuth)
        direction = (math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az))
        eye = tuple(t + distance * d for t, d in zip(camera.target, direction))
        cameras.append(replace(camera, eye=eye))
    return cameras


def table(runs: list[Measured]) -> str:
    """The measurements, one row per task."""

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = ("task", "views", "iterations", "seconds", "IoU fit", "IoU held-out", "PSNR dB",
              "held-out PSNR inside dB", "")
    rows = [header]
    for run in runs:
        missed = run.missed()
        rows.append((
            run.task.name, str(run.views), str(run.result.iterations),
            f"{run.result.seconds:.1f}", number(run.iou_fit, 3), number(run.iou_held_out, 3),
            number(run.psnr, 2), number(run.held_out_psnr_inside, 2), "; ".join(missed) if missed else "ok",
        ))  # fmt: skip
    # Names to the left, numbers to the right, the verdict as it is.
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for name, *numbers, verdict in rows:
        cells = [name.ljust(widths[0])] + [n.rjust(w) for n, w in zip(numbers, widths[1:])]
        lines.append("  ".join([*cells, verdict]).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Pictures


def picture(run: Measured) -> np.ndarray:
    """truth | start | result of fitting view 0 above held-out view 1, ``(H, W, 3)`` uint8."""
    start = load_scene(run.task.scene)
    cameras = [start.cameras[0], held_out_cameras(start.cameras[0])[1]]
    # A task that recovers no colors has none to show.
    clay = not run.task.recovers_colors
    shown = [
        preview(scene, cameras, clay)
        for scene in (load_scene(run.task.truth), start, run.result.scene)
    ]
    # Row by row: each camera's truth, start and result.
    panels = np.stack([images[row] for row in range(len(cameras)) for images in shown])
    return grid(panels, columns=len(shown))


def preview(scene: Scene, cameras: list[Camera], clay: bool) -> np.ndarray:
    """``scene`` through ``cameras`` at :data:`PREVIEW_SIDE` pixels, ``(N, H, W, 3)`` uint8;
    ``clay``: in :data:`CLAY` gray under :data:`CLAY_LIGHTS`."""
    render = scene.render
    # The soft edge keeps its width in pixels: sigma is in squared screen units.
    sigma = render.sigma * (render.height / PREVIEW_SIDE) ** 2
    render = replace(render, width=PREVIEW_SIDE, height=PREVIEW_SIDE, sigma=sigma)
    scene = replace(scene, render=render, cameras=tuple(cameras))
    if clay:
        meshes = tuple(replace(m, colors=torch.full_like(m.colors, CLAY)) for m in scene.meshes)
        scene = replace(scene, meshes=meshes, lights=CLAY_LIGHTS)
    return to_uint8(render_scene(scene)[:, :3])


# ---------------------------------------------------------------------------------------------
# The command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=[t.name for t in TASKS], help="Only this task.")
    parser.add_argument("--run", action="store_true", help="Run the tasks and check the floors.")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "out" / "tasks",
                        help="Where the runs write (a folder per task). Default: out/tasks.")
    parser.add_argument("--pictures", action="store_true",
                        help="Write scenes/previews/task_<task>.png (implies --run).")
    args = parser.parse_args()  # fmt: skip
    tasks = [t for t in TASKS if args.task in (None, t.name)]
    if any(t.name == "colors" for t in tasks):
        write_colors_start()
    for task in tasks:
        write_targets(task)
        print(f"wrote {task.targets.relative_to(REPO)}")
    if not (args.run or args.pictures):
        return
    runs = []
    for task in tasks:
        runs.append(run_task(task, args.output / task.name))
        if args.pictures:
            path = PREVIEWS_DIR / f"task_{task.name}.png"
            write_files({path: encode_png(picture(runs[-1]))})
            print(f"wrote {path.relative_to(REPO)}")
    print(table(runs))
    if any(run.missed() for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
