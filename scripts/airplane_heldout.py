"""The airplane judged on views it never saw: SoftRas's result, microDR's old default and its
current pipeline, side by side.

    python scripts/airplane_heldout.py [--data DIR] [-o OUTDIR] [--picture PNG] [--only NAME]
                                       [--optimize JSON]

Each microDR run fits the 60 even views of SoftRas's airplane (``scripts/softras_airplane.py``,
64 x 64 silhouettes) and is scored on the 60 odd views, which never enter its loss. The score is
the hard silhouette IoU (:func:`microdr.render.hard_silhouettes`: a pixel is covered when its
center lies inside a drawn face; the target's alpha > 0.5), per view, then the mean and the min
over the 60 views. SoftRas's published ``plane.obj`` is scored on the same views; note that it
was fit on all 120 views (2000 iterations), the held-out ones included.

The runs:

- ``microDR before issue 12``: the settings the airplane script wrote before (SoftRas's: sigma
  1e-4 throughout, lr 0.01, betas 0.5 / 0.99, bounded vertices, 1000 iterations of 24 views).
- ``microDR now``: the scene the airplane script writes now (its ``OPTIMIZE``: microDR's
  defaults for silhouettes, remeshing, 1000 iterations of 12 views); with ``--optimize JSON``,
  those keys of its ``optimize`` section replaced (e.g. ``'{"iterations": 1500}'``), to try
  settings. ``scripts/airplane_experiments.py`` measures each setting on its own.

Writes ``OUTDIR/<run>/`` (each run's task and ``microdr optimize`` outputs) and
``OUTDIR/heldout.md`` (the table, also printed); ``--picture`` writes a picture of held-out views:
per view, the target and each mesh's hard silhouette over it (white: both, red: the target
alone, blue: the mesh alone). Seconds are the optimization's wall time (``metrics.json``), on the
threads torch uses here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import microdr  # noqa: E402,F401  (before torch: it sets torch's OpenMP wait policy)
import softras_airplane as airplane  # noqa: E402

from microdr.optimize.drawing import labeled_grid  # noqa: E402
from microdr.io.files import write_files  # noqa: E402
from microdr.io.images import encode_png  # noqa: E402
from microdr.io.mesh import Mesh, load_obj  # noqa: E402
from microdr.optimize.loop import optimize  # noqa: E402
from microdr.render import hard_silhouettes  # noqa: E402
from microdr.io.scene import Camera, RenderSettings, load_scene  # noqa: E402
from microdr.io.targets import read_targets  # noqa: E402

#: The airplane script's ``optimize`` section before issue 12 (SoftRas's demo settings, but 24
#: views drawn per iteration and 1000 iterations).
BEFORE = {
    "parameters": ["vertices"],
    "vertex_parametrization": "bounded",
    "loss": {"silhouette_iou": 1.0, "laplacian": 0.03, "flatten": 0.0003},
    "lr": 0.01,
    "betas": [0.5, 0.99],
    "iterations": 1000,
    "views_per_step": 24,
    "sigma_schedule": {"start": 1e-4, "end": 1e-4},  # before the default schedule
}
RUNS = {"before": "microDR before issue 12", "now": "microDR now"}
#: Held-out views shown in the picture.
SHOWN = (1, 31, 61, 91)


def now() -> dict:
    """The ``optimize`` section that the airplane script writes now."""
    return {**airplane.OPTIMIZE, "iterations": airplane.ITERATIONS, "views_per_step": airplane.VIEWS_PER_STEP}


def fit(data: Path, task: Path, section: dict, seed: int = 0) -> tuple[Mesh, float]:
    """Fit the even views with the airplane script's scene and ``optimize`` section ``section``,
    writing the task and its outputs into ``task``; the mesh and the optimization seconds."""
    camera_list = airplane.cameras(np.load(data / "camera.npy"))
    even = airplane.parse_views("even", len(camera_list))
    scene_json = airplane.scene_json(even, camera_list, airplane.VIEWS_PER_STEP, airplane.ITERATIONS)
    scene_json["optimize"] = section
    airplane.write_task(data, task, even, scene_json)
    scene = load_scene(task / "scene.json")
    targets = read_targets([str(task / "targets")], len(scene.cameras), (scene.render.width, scene.render.height))
    result = optimize(scene, targets, outdir=task / "out", force=True, seed=seed)
    return load_obj(task / "out" / "mesh.obj"), result.seconds


def hard_ious(mesh: Mesh, camera_list: list[Camera], targets: np.ndarray, views: list[int]) -> np.ndarray:
    """Per view of ``views``, the hard IoU of ``mesh`` against the airplane's target
    (``camera_list`` and ``targets`` of all 120 views)."""
    return airplane.hard_iou(mesh, [camera_list[v] for v in views], targets[views])


def overlay(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8: white where both cover, red where the target alone, blue where the
    mesh alone."""
    picture = np.zeros((*mine.shape, 3), dtype=np.uint8)
    picture[mine & theirs] = (255, 255, 255)
    picture[theirs & ~mine] = (230, 60, 60)
    picture[mine & ~theirs] = (70, 130, 255)
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=airplane.DEFAULT_DATA, help="SoftRas demo data folder")
    parser.add_argument("-o", "--output", type=Path, default=Path("out/airplane_heldout"), help="output folder")
    parser.add_argument("--picture", type=Path, help="write a picture of held-out views here (PNG)")
    parser.add_argument("--only", choices=sorted(RUNS), help="run only this microDR configuration")
    parser.add_argument("--optimize", type=json.loads, default={}, metavar="JSON",
                        help="an object whose keys replace those of the optimize section of the run now")
    args = parser.parse_args()
    if not (args.data / "source.npy").is_file():
        raise SystemExit(f"{args.data}: no SoftRas demo data here (source.npy); give --data")
    camera_list = airplane.cameras(np.load(args.data / "camera.npy"))
    targets = airplane.silhouettes(args.data)
    odd = airplane.parse_views("odd", len(camera_list))
    even = airplane.parse_views("even", len(camera_list))
    render = RenderSettings(width=airplane.SIZE, height=airplane.SIZE)

    def silhouettes(mesh: Mesh, views: list[int]) -> np.ndarray:
        return hard_silhouettes(mesh.vertices[mesh.faces], [camera_list[v] for v in views], render).numpy()

    meshes = {"SoftRas plane.obj (fit on all 120)": (load_obj(args.data / "plane.obj"), None)}
    for name in [args.only] if args.only else RUNS:
        section = dict(BEFORE) if name == "before" else {**now(), **args.optimize}
        label = RUNS[name] + (f", optimize {json.dumps(args.optimize)}" if name == "now" and args.optimize else "")
        meshes[label] = fit(args.data, args.output / name, section)
    rows = [
        "| mesh | faces | held-out IoU, mean | held-out IoU, min | fit IoU, mean | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, (mesh, seconds) in meshes.items():
        held_out, fitted = (hard_ious(mesh, camera_list, targets, views) for views in (odd, even))
        time = "—" if seconds is None else f"{seconds:.1f}"
        rows.append(
            f"| {label} | {mesh.num_faces} | {held_out.mean():.3f} | {held_out.min():.3f} "
            f"| {fitted.mean():.3f} | {time} |"
        )
    table = "\n".join(rows) + "\n"
    print(table, end="")
    files = {args.output / "heldout.md": table.encode()}
    if args.picture is not None:
        panels, labels = [], []
        for view in SHOWN:
            theirs = targets[view] > 0.5
            panels.append(overlay(theirs, theirs))
            labels.append(f"target, view {view}")
            for label, (mesh, _) in meshes.items():
                panels.append(overlay(silhouettes(mesh, [view])[0], theirs))
                labels.append(label.replace(" (fit on all 120)", "").replace("microDR ", ""))
        picture = labeled_grid(np.stack(panels), labels, 1 + len(meshes), title=(
            "held-out views (never fit): white both, red target only, blue mesh only"))
        files[args.picture] = encode_png(picture)
    write_files(files)


if __name__ == "__main__":
    main()
