"""Compare the CPU kernels of two checkouts in one run: each kernel's time per call, case by case.

    python scripts/bench_compare.py OLD [NEW] [--rounds N] [--repeats N] [--threads N] [--only TEXT]

OLD and NEW are commits (checked out into temporary git worktrees, removed after) or directories
holding a checkout; NEW defaults to this checkout. The cases are bench.py's RGB ones with a
one-pixel edge that the issues' floors name: 256 x 256 with 5,120 faces, 1024 x 1024 with 81,920,
and the two large-face cases at 1024 x 1024 (2 faces, the 12-face cube), built once here so both
sides render the same inputs. Each round runs OLD and NEW, alternating which goes first, each in a
fresh process that renders every case ``repeats`` times (forward and backward) and times each
kernel launch: with 1 thread the calling thread's CPU time (time.thread_time, which the machine's
other work does not inflate), with more the wall time. The table is each kernel's minimum over all
rounds and repeats, in milliseconds, with NEW / OLD for the whole backward (backward and reduce).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The cases, as bench.Case arguments (faces, size, batch, channels, sigma rule).
CASES = {"f5120_256px": (5120, 256, 1, 3, "1px"), "f81920_1024px": (81920, 1024, 1, 3, "1px"),
         "f2_1024px": (2, 1024, 1, 3, "1px"), "f12_1024px": (12, 1024, 1, 3, "1px")}
#: The kernels, in launch order (kernels.STAGES; a checkout from before the reduce has none).
STAGES = ("setup", "bin", "forward", "backward", "reduce")


def worker(cases_file: str, threads: int, repeats: int) -> dict:
    """In a process whose ``microdr`` is the checkout's: ``{case: {kernel: least ms}}``."""
    import microdr  # noqa: F401  (before torch: it sets torch's OpenMP wait policy)
    import torch
    from microdr.raster import SoftRasSettings, rasterize
    from microdr.raster.cpu import cpu_target

    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    target, spent = cpu_target(), {}
    launch = target.launch

    def timed_launch(kernel, args, grid, block):
        start = clock()
        launch(kernel, args, grid, block)
        stage = kernel.split("_")[1]  # softras_<stage>_<dtype>
        spent[stage] = spent.get(stage, 0.0) + clock() - start

    target.launch = timed_launch
    least = {}
    for name, (verts, attrs, sigma, size) in torch.load(cases_file).items():
        for _ in range(repeats):
            spent.clear()
            v, c = verts.clone().requires_grad_(), attrs.clone().requires_grad_()
            rasterize(v, c, size, size, SoftRasSettings(sigma=sigma), backend="cpu").sum().backward()
            for stage, seconds in spent.items():
                least.setdefault(name, {})[stage] = min(least.get(name, {}).get(stage, float("inf")), 1e3 * seconds)
    return least


def merge(runs: list[dict]) -> dict:
    """The least time per case and kernel over several workers' results."""
    merged = {}
    for run in runs:
        for case, stages in run.items():
            for stage, ms in stages.items():
                merged.setdefault(case, {})[stage] = min(merged.get(case, {}).get(stage, float("inf")), ms)
    return merged


def backward_ms(stages: dict) -> float:
    """The whole backward: the backward kernel and, where the checkout has one, the reduce."""
    return stages.get("backward", 0.0) + stages.get("reduce", 0.0)


def checkout(spec: str, scratch: Path) -> Path:
    """A directory holding ``spec``: itself if it is one, else a git worktree of that commit."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    path = scratch / spec.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), spec], check=True,
                   capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", nargs="?", help="a commit or a checkout's directory")
    parser.add_argument("new", nargs="?", default=str(ROOT), help="likewise (default: this checkout)")
    parser.add_argument("--rounds", type=int, default=4, help="processes per side (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="renders per case and process (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="kernel threads (default 1)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # CASES_FILE THREADS REPEATS
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return
    if args.old is None:
        parser.error("OLD: a commit or a checkout's directory is needed")
    if min(args.rounds, args.repeats, args.threads) < 1:
        parser.error("--rounds, --repeats and --threads must be at least 1")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    import torch

    chosen = {name: bench.Case(*spec) for name, spec in CASES.items() if args.only in name}
    if not chosen:
        parser.error(f"--only: no case name contains {args.only!r} (cases: {', '.join(CASES)})")
    worktrees = []
    with tempfile.TemporaryDirectory() as scratch:
        try:
            sides = []
            for spec in (args.old, args.new):
                sides.append(checkout(spec, Path(scratch)))
                if not Path(spec).is_dir():
                    worktrees.append(sides[-1])
            cases_file = str(Path(scratch) / "cases.pt")
            torch.save({name: (*bench.inputs(case, "cpu")[:2], case.sigma, case.size) for name, case in chosen.items()},
                       cases_file)
            runs = {side: [] for side in sides}
            for round_ in range(args.rounds):
                for side in sides if round_ % 2 == 0 else sides[::-1]:
                    done = subprocess.run(
                        [sys.executable, __file__, "--worker", cases_file, str(args.threads), str(args.repeats)],
                        env=dict(os.environ, PYTHONPATH=str(side)), capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.exit(f"bench_compare.py: {side}: {done.stderr.strip().splitlines()[-1]}")
                    runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"# round {round_ + 1} of {args.rounds}; load average {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            for path in worktrees:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
    old, new = (merge(runs[side]) for side in sides)
    print(f"# least ms per kernel, {args.threads} thread(s); old = {args.old}, new = {args.new}")
    print("case,side,setup,bin,forward,backward,reduce,whole_backward")
    for name in chosen:
        for label, result in (("old", old), ("new", new)):
            stages = result[name]
            cells = [f"{stages[s]:.3f}" if s in stages else "" for s in STAGES]
            print(",".join([name, label, *cells, f"{backward_ms(stages):.3f}"]))
        print(f"# {name}: backward new / old = {backward_ms(new[name]) / backward_ms(old[name]):.3f}")


if __name__ == "__main__":
    main()
