"""The same optimization with ``import torch`` before and after ``import microdr``, timed.

    python scripts/import_order.py [--task ellipsoid] [--iterations 100] [--repeat 3]

torch's OpenMP workers spin between torch's operations unless ``OMP_WAIT_POLICY=PASSIVE`` was
set when torch loaded; ``import microdr`` sets it only when it comes first. The optimizer loop
keeps the CPU kernels fast either way (:func:`microdr.raster.cpu.kernels_own_the_cores`); this
script shows it: each order runs in a fresh process (``OMP_WAIT_POLICY`` removed from the
environment), the best of ``--repeat`` runs is kept, and the ratio of the two is printed. Exit
1 when they are more than 1.2x apart.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The optimization, timed inside the child from just before the run to its end (imports and the
# kernels' compile excluded: the kernel library is loaded before the clock starts).
CHILD = """
import sys, time
{imports}
from dataclasses import replace
from microdr.optimize.loop import optimize
from microdr.raster.cpu import cpu_target
from microdr.io.scene import load_scene
from microdr.io.targets import read_targets
scene = load_scene(sys.argv[1])
settings = replace(scene.optimize, iterations=int(sys.argv[3]))
targets = read_targets([sys.argv[2]], len(scene.cameras), (scene.render.width, scene.render.height))
cpu_target()
started = time.perf_counter()
optimize(scene, targets, settings, backend="cpu")
print(time.perf_counter() - started)
"""


def run_once(imports: str, task: str, iterations: int) -> float:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    scene = ROOT / "scenes" / "tasks" / f"{task}.json"
    targets = ROOT / "scenes" / "tasks" / f"{task}_targets"
    code = CHILD.format(imports=imports)
    finished = subprocess.run(
        [sys.executable, "-c", code, str(scene), str(targets), str(iterations)],
        env=environment, capture_output=True, text=True, check=True,
    )
    return float(finished.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="ellipsoid")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    orders = {
        "import torch; import microdr": "import torch\nimport microdr",
        "import microdr; import torch": "import microdr\nimport torch",
    }
    best = {}
    for name, imports in orders.items():
        times = [run_once(imports, options.task, options.iterations) for _ in range(options.repeat)]
        best[name] = min(times)
        print(f"{name:30s} " + "  ".join(f"{t:6.2f} s" for t in times) + f"   best {best[name]:.2f} s")
    slower, faster = max(best.values()), min(best.values())
    print(f"ratio {slower / faster:.2f} (floor: at most 1.2)")
    return 0 if slower <= 1.2 * faster else 1


if __name__ == "__main__":
    sys.exit(main())
