"""Measure what ``microdr gradcheck`` costs on every bundled scene: wall time and peak RSS.

    python scripts/gradcheck_cost.py [--threads N] [--csv FILE] [--only TEXT]

Each scene of ``scenes/`` and ``scenes/tasks/`` is checked in float32 and float64 (the default
``--max-side 64``), each run a fresh ``python -m microdr gradcheck`` process with
``OMP_NUM_THREADS=N`` (default 2). Peak RSS is the child's own maximum resident set size
(``wait4``'s ``ru_maxrss``), so it includes Python and torch (~300 MB before any work). Time is
the whole process, start-up included. The table also says whether the check passed.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float64")


def measure(scene: Path, dtype: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "microdr", "gradcheck", str(scene), "--dtype", dtype]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    output = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return {
        "scene": str(scene.relative_to(REPO)),
        "dtype": dtype,
        "threads": threads,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "passed": child.returncode == 0,
        "worst_ratio": worst_ratio(output),
    }


def worst_ratio(output: str) -> str:
    """The largest error / tolerance of the command's table ("" if there is none)."""
    ratios = []
    for line in output.splitlines():
        cells = line.split()
        if len(cells) >= 5 and cells[-1] in ("ok", "FAIL") and cells[0] != "quantity":
            error = float(cells[1] if cells[-2] == "(abs)" else cells[2])
            ratios.append(error / float(cells[3]))
    return f"{max(ratios):.2f}" if ratios else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    parser.add_argument("--only", default="", help="only scenes whose path contains this text")
    args = parser.parse_args()
    scenes = sorted((REPO / "scenes").glob("*.json")) + sorted((REPO / "scenes" / "tasks").glob("*.json"))
    rows = []
    columns = ("scene", "dtype", "threads", "seconds", "peak_rss_mb", "passed", "worst_ratio")
    print("  ".join(columns), flush=True)
    for scene in scenes:
        if args.only not in str(scene.relative_to(REPO)):
            continue
        for dtype in DTYPES:
            row = measure(scene, dtype, args.threads)
            rows.append(row)
            print("  ".join(str(row[name]) for name in columns), flush=True)
    if args.csv:
        with args.csv.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
