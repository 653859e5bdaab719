"""One process with 2 threads against 2 processes with 1 thread each: time per iteration.

    python scripts/bench_distributed.py [--tasks airplane,large] [--iterations 50,3] [--repeat 3]
        [--views 480] [--views-per-step N] [--size 256] [--subdivisions 5] [--csv FILE]

Tasks: ``airplane``, SoftRas's airplane (``scripts/softras_airplane.py``: 120 views of 64 x 64,
12 drawn per iteration, a 1352-face sphere remeshed); ``large``, a sphere of
``20 * 4 ** subdivisions`` faces (20,480) fit to the silhouettes of the cow
(``scenes/meshes/spot.obj``) from ``--views`` cameras (480) of ``--size`` pixels square (256),
all of them (or ``--views-per-step``) each iteration.

Each configuration runs ``--repeat`` times in fresh processes, as a user's own torch.distributed
program would (:mod:`microdr.optimize.distributed`: every rank builds the same
:class:`~microdr.optimize.loop.Optimization`; ``gloo`` on loopback): after 2 iterations of warm-up
(kernels, caches; the first also measures the hard metrics) rank 0 times ``--iterations``
iterations (a count per task); the best repeat's mean is kept (the machine may be shared).
Efficiency is the 1-process time over the 2-process one (1.0: as fast; the floor is 0.8, i.e.
within 1.25x).
The bytes each rank but the last sends per iteration, and the last broadcasts, are
:func:`microdr.optimize.distributed.chain_length` numbers of float32.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import microdr  # noqa: E402,F401  (before torch: it sets torch's OpenMP wait policy)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from microdr.optimize.distributed import chain_length  # noqa: E402
from microdr.optimize.losses import VIEW_TERMS  # noqa: E402
from microdr.optimize.loop import Optimization  # noqa: E402
from microdr.render import render_scene  # noqa: E402
from microdr.io.scene import load_scene, parse_scene  # noqa: E402
from microdr.io.targets import Targets, read_targets  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "softras"
#: Configurations: (processes, threads per process).
CONFIGS = ((1, 2), (2, 1))


def airplane(folder: Path) -> tuple[Path, Path]:
    """SoftRas's airplane task, written once into ``folder``: the scene and its targets."""
    if not (folder / "scene.json").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "softras_airplane.py"), "--data", str(DATA),
             "-o", str(folder)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return folder / "scene.json", folder / "targets"


def orbit(count: int) -> list[dict]:
    """``count`` cameras on a sphere's spiral (elevations -60 to 60 degrees, golden-angle
    azimuths), looking at the origin."""
    return [
        {
            "orbit": {
                "distance": 2.732,
                "elevation": -60 + 120 * i / max(count - 1, 1),
                "azimuth": (i * 137.50776) % 360,
            },
            "fov": 30,
        }
        for i in range(count)
    ]


def large(folder: Path, views: int, size: int, subdivisions: int, per_step: int | None):
    """The large task, written once into ``folder``: ``scene.json`` and ``targets.pt`` (the
    cow's silhouettes)."""
    base = {
        "image": {"width": size, "height": size},
        "render": {"sigma": 2.5e-5},
        "cameras": orbit(views),
    }
    start = {
        **base,
        "meshes": [{"primitive": "icosphere", "subdivisions": subdivisions,
                    "transform": {"scale": 0.5}}],
        "optimize": {
            "parameters": ["vertices"], "vertex_parametrization": "bounded",
            "betas": [0.5, 0.99], "iterations": 1000,
            **({"views_per_step": per_step} if per_step else {}),
        },
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scene.json").write_text(json.dumps(start))
    if not (folder / "targets.pt").exists():
        truth = {
            **base,
            "meshes": [{"file": str(ROOT / "scenes" / "meshes" / "spot.obj"),
                        "transform": {"translate": [0, -0.0758, -0.1332], "scale": 0.7}}],
        }  # fmt: skip
        images = render_scene(parse_scene(truth, "truth.json", folder))
        torch.save(images[:, 3:].contiguous(), folder / "targets.pt")
    return folder / "scene.json", folder / "targets.pt"


def load_task(scene_path: Path, targets_path: Path):
    scene = load_scene(scene_path)
    if targets_path.suffix == ".pt":
        targets = Targets.from_images(torch.load(targets_path))
    else:
        size = (scene.render.width, scene.render.height)
        targets = read_targets([str(targets_path)], len(scene.cameras), size,
                               background=scene.render.background)  # fmt: skip
    return scene, targets


def worker(scene_path: Path, targets_path: Path, iterations: int) -> None:
    """One rank (or the only process): time ``iterations`` iterations after 2 of warm-up; rank 0
    prints a JSON line of the seconds per iteration and the buffer's size."""
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    scene, targets = load_task(scene_path, targets_path)
    run = Optimization(scene, targets)
    for _ in range(2):
        run.step()
    started, work = time.perf_counter(), run.work_seconds
    for _ in range(iterations):
        step = run.step()
    seconds = (time.perf_counter() - started) / iterations
    if run.ranks.first:
        faces = len(run.parameters.start.faces)
        terms = [name for name in step.terms if name in VIEW_TERMS]
        numbers = chain_length(faces, 0, 0, len(step.views), len(terms))
        print(json.dumps({
            "seconds": seconds, "work": (run.work_seconds - work) / iterations,
            "faces": faces, "views": len(step.views), "numbers": numbers,
        }), flush=True)  # fmt: skip
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(processes: int, threads: int, scene: Path, targets: Path, iterations: int) -> dict:
    """Run the worker on ``processes`` processes of ``threads`` threads; rank 0's report."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, __file__, "--worker", str(scene), str(targets),
               "--iterations", str(iterations)]  # fmt: skip
    ranks = []
    for rank in range(processes):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if processes > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))  # fmt: skip
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [rank.communicate()[0] for rank in ranks]
    if any(rank.returncode for rank in ranks):
        raise SystemExit(f"a rank failed: exit codes {[rank.returncode for rank in ranks]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="airplane,large")
    parser.add_argument("--iterations", default="50,3")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--views", type=int, default=480)
    parser.add_argument("--views-per-step", type=int, default=None)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--subdivisions", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/microdr_bench_distributed"))
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, int(args.iterations))
        return
    rows = []
    counts = [int(count) for count in args.iterations.split(",")]
    for name, iterations in zip(args.tasks.split(","), counts):
        if name == "airplane":
            scene, targets = airplane(args.cache / "airplane")
        else:
            scene, targets = large(args.cache / "large", args.views, args.size,
                                   args.subdivisions, args.views_per_step)  # fmt: skip
        times = {}
        for processes, threads in CONFIGS:
            reports = [launch(processes, threads, scene, targets, iterations)
                       for _ in range(args.repeat)]  # fmt: skip
            best = min(reports, key=lambda report: report["seconds"])
            times[processes] = best["seconds"]
            rows.append({
                "task": name, "processes": processes, "threads": threads,
                "faces": best["faces"], "views": best["views"],
                "seconds_per_iteration": round(best["seconds"], 4),
                "all": " ".join(f"{r['seconds']:.4f}" for r in reports),
                "bytes_passed_on": 4 * best["numbers"] if processes > 1 else 0,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        efficiency = times[1] / times[2]
        print(f"{name}: 1 x 2 threads {times[1]:.3f} s/it, 2 x 1 thread {times[2]:.3f} s/it, "
              f"efficiency {efficiency:.2f} (2-process time {1 / efficiency:.2f}x)", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
