"""How microDR's airplane pipeline got where it is: each setting measured on held-out views.

    python scripts/airplane_experiments.py [--data DIR] [-o OUTDIR] [--seeds 0,1,2] [--only TEXT]
                                           [--csv FILE]

Every experiment fits the 60 even views of SoftRas's airplane (``scripts/airplane_heldout.py``'s
``fit``: the airplane script's scene with an ``optimize`` section of the experiment's own) once
per seed (the seed draws the views of each iteration), and scores the written ``mesh.obj`` by
hard silhouette IoU on the 60 odd views, which never enter the loss. Printed per experiment: the
held-out mean and min of each seed, their average over the seeds, the fit views' mean, the
faces of the result and the optimization's seconds (wall time on the threads torch uses here;
noisy on a shared machine). ``--csv`` writes one row per (experiment, seed).

The experiments are a ladder, each rung adding one setting to the one above it, from the
settings before issue 12 to the airplane script's now; then single changes to the rungs, to
show what each alternative does.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import microdr  # noqa: E402,F401  (before torch: it sets torch's OpenMP wait policy)
import airplane_heldout as heldout  # noqa: E402
import softras_airplane as airplane  # noqa: E402

from microdr.io.files import write_files  # noqa: E402
from microdr.optimize.loop import DEFAULT_SILHOUETTE_SIGMA_END, DEFAULT_SILHOUETTE_SIGMA_START  # noqa: E402

#: The default schedule for the airplane's sigma (3e-4 -> 3e-6), as the optimizer computes it.
SCHEDULE = {"sigma_schedule": {"start": airplane.SIGMA * DEFAULT_SILHOUETTE_SIGMA_START,
                               "end": airplane.SIGMA * DEFAULT_SILHOUETTE_SIGMA_END}}
TWELVE_VIEWS = {"views_per_step": 12}
NO_FLATTEN = {"loss": {"silhouette_iou": 1.0, "laplacian": 0.03, "flatten": 0.0}}
REMESH = {
    "vertex_parametrization": "offset",
    "lr": 0.002,
    "remesh": {"edge_length": [0.05, 0.03], "every": 50, "until": 0.7},
}
# The rungs: (label, optimize section).
LADDER = [
    ("before issue 12: SoftRas's settings, sigma 1e-4", heldout.BEFORE),
    ("+ sigma 3e-4 -> 3e-6 (the default now)", {**heldout.BEFORE, **SCHEDULE}),
    ("+ 12 views per iteration, not 24", {**heldout.BEFORE, **SCHEDULE, **TWELVE_VIEWS}),
    ("+ no flatten term (the default now)", {**heldout.BEFORE, **SCHEDULE, **TWELVE_VIEWS, **NO_FLATTEN}),
    ("+ remeshing (offsets, lr 0.002): the script now", {**heldout.BEFORE, **SCHEDULE, **TWELVE_VIEWS,
                                                         **NO_FLATTEN, **REMESH}),
]
NO_REMESH = LADDER[3][1]
NOW = LADDER[4][1]
# Single changes: (label, optimize section).
ALTERNATIVES = [
    ("no remeshing, 1500 iterations", {**NO_REMESH, "iterations": 1500}),
    ("no remeshing, 1500 iterations, flatten 0.0003",
     {**NO_REMESH, "iterations": 1500, "loss": heldout.BEFORE["loss"]}),
    ("no remeshing, sigma 1e-3 -> 3e-6", {**NO_REMESH, "sigma_schedule": {"start": 1e-3, "end": 3e-6}}),
    ("no remeshing, Laplacian 0.01", {**NO_REMESH, "loss": {**NO_FLATTEN["loss"], "laplacian": 0.01}}),
    ("no remeshing, cosine learning rate", {**NO_REMESH, "lr_schedule": "cosine"}),
    ("remeshing, 1500 iterations", {**NOW, "iterations": 1500}),
    ("remeshing, 8 views per iteration", {**NOW, "views_per_step": 8}),
    ("remeshing, edge length term 0.1 (the RGB default)",
     {**NOW, "loss": {**NO_FLATTEN["loss"], "edge_length": 0.1}}),
]
FIELDS = ("experiment", "seed", "held_out_mean", "held_out_min", "fit_mean", "faces", "seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=airplane.DEFAULT_DATA, help="SoftRas demo data folder")
    parser.add_argument("-o", "--output", type=Path, default=Path("out/airplane_experiments"),
                        help="output folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each")
    parser.add_argument("--only", default="", help="run only the experiments whose label contains TEXT")
    parser.add_argument("--csv", type=Path, help="write one row per (experiment, seed) here")
    args = parser.parse_args()
    if not (args.data / "source.npy").is_file():
        raise SystemExit(f"{args.data}: no SoftRas demo data here (source.npy); give --data")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    odd, even = (airplane.parse_views(spec, 120) for spec in ("odd", "even"))
    camera_list, targets = airplane.cameras(np.load(args.data / "camera.npy")), airplane.silhouettes(args.data)
    rows = []
    print("| experiment | held-out IoU, mean (per seed) | held-out IoU, min (per seed) | fit IoU | faces | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for number, (label, section) in enumerate(LADDER + ALTERNATIVES):
        if args.only not in label:
            continue
        runs = []
        for seed in seeds:
            mesh, seconds = heldout.fit(args.data, args.output / f"{number:02d}_seed{seed}", dict(section), seed)
            held_out, fitted = (heldout.hard_ious(mesh, camera_list, targets, views) for views in (odd, even))
            runs.append((held_out.mean(), held_out.min(), fitted.mean(), mesh.num_faces, seconds))
            rows.append(dict(zip(FIELDS, (label, seed, *runs[-1]))))
        means, mins, fits, faces, times = (np.array(column) for column in zip(*runs))

        def each(values: np.ndarray) -> str:
            return f"**{values.mean():.3f}** ({' / '.join(f'{v:.3f}' for v in values)})"

        print(f"| {label} | {each(means)} | {each(mins)} | {fits.mean():.3f} | {faces.mean():.0f} "
              f"| {times.mean():.1f} |", flush=True)
    if args.csv is not None:
        text = io.StringIO()
        writer = csv.DictWriter(text, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_files({args.csv: text.getvalue().encode()})


if __name__ == "__main__":
    main()
