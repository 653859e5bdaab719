"""Check microDR on a machine with an NVIDIA GPU and write one report of what passed and how long.

    python scripts/gpu_check.py [-o REPORT.md] [--force] [--budget SECONDS] [--data DIR]

Says what it found (GPU, driver, nvcc, pycuda), then runs, each as a subprocess with its own
timeout and all within ``--budget`` seconds (default 570, under 10 minutes): ``microdr info``;
the tests marked ``gpu`` (one that skips fails the step); ``microdr gradcheck --backend cuda``
on every bundled scene (``scenes/*.json``, ``scenes/tasks/*.json``) in float32 and float64;
``scripts/bench.py``'s full grid on the ``cuda`` backend, one face count per step (1024 x 1024
with 81,920 faces and batch 8 among them, and the few large faces); and SoftRas's airplane task
(``scripts/softras_airplane.py --holdout odd``) fitted by ``microdr optimize --backend cuda``
(skipped, saying so, where ``--data`` has no SoftRas data). The report (default
``gpu_check_report.md``) has a table of the steps (pass, FAIL, timeout, skipped; wall seconds),
``microdr info`` and the bench tables in full, the tails of the gpu tests and of the fit, and
the output's tail of each step that did not pass. Exits 0 if every step that ran passed, else 1.

Without an NVIDIA GPU (``nvidia-smi`` missing or listing none) it prints one line saying why and
exits 0; with one where the cuda backend cannot run (no pycuda, a torch without CUDA) it
prints one line saying why and exits 1.
An existing report file is refused (exit code 2) unless ``--force``, and so is a report in a
folder that does not exist.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from softras_airplane import DEFAULT_DATA  # noqa: E402

#: Under 10 minutes on an H100-class GPU, the machine's start and this script's own work included.
BUDGET_S = 570.0
#: A step is not started with less than this left of the budget: it would only time out.
MIN_STEP_S = 5.0
#: Lines of a step's output the report keeps when the step did not pass (or shows a tail).
TAIL_LINES = 40
#: scripts/bench.py's face counts, one step each (its ``--only f<faces>_`` selects them): the
#: icospheres, then the few large faces (2 and 12 at 1024 x 1024, whose backward is split into
#: chunks of at most 64 pixels).
BENCH_FACES = (1280, 5120, 20480, 81920, 2, 12)
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Step:
    """One command of the check: ``argv`` runs in the repository root within ``timeout_s``
    seconds. ``show``: what of its output the report keeps when it passes (``"all"``,
    ``"tail"`` or ``"none"``; a failure always keeps the tail). ``skip``: why it is not run
    (None: it runs). ``after``: the name of a step that must pass first. ``fails_on``: a regular
    expression that, found in the output of a step that exits 0, makes it fail."""

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    show: str = "none"
    skip: str | None = None
    after: str | None = None
    fails_on: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How a step ended: ``status`` is ``"pass"``, ``"FAIL"``, ``"timeout"`` or ``"skipped"``
    (``note`` says why); ``seconds`` is its wall time; ``output`` is stdout and stderr together."""

    step: Step
    status: str
    seconds: float
    output: str = ""
    note: str = ""


def bundled_scenes() -> list[Path]:
    """The scene files that ship with microDR, relative to the repository root."""
    return [p.relative_to(ROOT) for pattern in ("scenes/*.json", "scenes/tasks/*.json")
            for p in sorted(ROOT.glob(pattern))]


def steps(python: str, work: Path, data: Path) -> list[Step]:
    """Every step of the check, in order. ``python``: the interpreter to run them with; ``work``:
    a folder for what they write (the airplane task and its fit); ``data``:
    SoftRas's demo data (the airplane steps are skipped, saying so, where it is absent)."""
    microdr = (python, "-m", "microdr")
    listed = [Step("microdr info", (*microdr, "info"), 60, show="all"),
              # A gpu test that skips here (no pycuda, no device) is a failure of the check.
              Step("tests marked gpu", (python, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests"), 240,
                   show="tail", fails_on=r"\d+ skipped")]
    listed += [Step(f"gradcheck {scene} {dtype}",
                    (*microdr, "gradcheck", str(scene), "--backend", "cuda", "--dtype", dtype), 60)
               for scene in bundled_scenes() for dtype in DTYPES]
    listed += [Step(f"bench cuda, {faces} faces",
                    (python, "scripts/bench.py", "--backends", "cuda", "--only", f"f{faces}_"), 150, show="all")
               for faces in BENCH_FACES]
    airplane = work / "airplane"
    absent = None if (data / "source.npy").is_file() else f"no SoftRas data in {data} (--data DIR)"
    listed += [
        Step("airplane task", (python, "scripts/softras_airplane.py", "--data", str(data), "--holdout", "odd",
                               "-o", str(airplane)), 60, skip=absent),
        Step("airplane optimize cuda", (*microdr, "optimize", str(airplane / "scene.json"), str(airplane / "targets"),
                                        "-o", str(airplane / "result"), "--backend", "cuda"), 300,
             show="tail", skip=absent, after="airplane task"),
    ]
    return listed


def run_step(step: Step, timeout_s: float) -> Outcome:
    """Runs ``step`` from the repository root, killing its whole process group after
    ``timeout_s`` seconds (so a hung child of a test cannot outlive it)."""
    start = time.perf_counter()
    process = subprocess.Popen(step.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return Outcome(step, "timeout", time.perf_counter() - start, output, f"killed after {timeout_s:.0f} s")
    except BaseException:  # Ctrl-C: its own session does not see the terminal's SIGINT
        os.killpg(process.pid, signal.SIGKILL)
        raise
    seconds = time.perf_counter() - start
    if process.returncode == 0:
        if step.fails_on and re.search(step.fails_on, output):
            return Outcome(step, "FAIL", seconds, output, f"the output has '{step.fails_on}'")
        return Outcome(step, "pass", seconds, output)
    return Outcome(step, "FAIL", seconds, output, f"exit code {process.returncode}")


def run_all(listed: list[Step], budget_s: float, progress=lambda outcome: None) -> list[Outcome]:
    """Runs the steps in order, each within its timeout and what is left of ``budget_s``;
    ``progress`` sees each outcome as it comes."""
    start, outcomes, passed = time.perf_counter(), [], set()
    for step in listed:
        left = budget_s - (time.perf_counter() - start)
        if step.skip:
            outcomes.append(Outcome(step, "skipped", 0.0, note=step.skip))
        elif step.after and step.after not in passed:
            outcomes.append(Outcome(step, "skipped", 0.0, note=f"'{step.after}' did not pass"))
        elif left < MIN_STEP_S:
            outcomes.append(Outcome(step, "skipped", 0.0, note=f"the {budget_s:.0f} s budget is spent"))
        else:
            outcome = run_step(step, min(step.timeout_s, left))
            outcomes.append(outcome)
            if outcome.status == "pass":
                passed.add(step.name)
        progress(outcomes[-1])
    return outcomes


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def report(machine: list[tuple[str, str]], outcomes: list[Outcome], budget_s: float, header: str) -> str:
    """The Markdown report: ``machine`` as a two-column table, then one row per step, then the
    output each step keeps (see :class:`Step`)."""
    counts = {status: sum(o.status == status for o in outcomes) for status in ("pass", "FAIL", "timeout", "skipped")}
    total = sum(o.seconds for o in outcomes)
    lines = ["# microDR GPU check", "", header, "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in machine]
    lines += ["", f"**{counts['pass']} passed, {counts['FAIL']} failed, {counts['timeout']} timed out, "
                  f"{counts['skipped']} skipped** in {total:.1f} s (budget {budget_s:.0f} s)", "",
              "| step | result | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {o.step.name} | {o.status} | {o.seconds:.1f} | {o.note} |" for o in outcomes]
    for o in outcomes:
        kept = o.output.rstrip() if o.status == "pass" and o.step.show == "all" else (
            tail(o.output) if o.status in ("FAIL", "timeout") or o.step.show == "tail" else "")
        if o.status != "skipped" and kept:
            lines += ["", f"## {o.step.name}: {o.status}", "", "`" + " ".join(o.step.argv) + "`", "",
                      "```", kept, "```"]
    return "\n".join(lines) + "\n"


def command_output(argv: list[str]) -> str | None:
    """The stripped stdout of ``argv``, or None if it cannot run or fails."""
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def find_gpu() -> tuple[str | None, str]:
    """``(gpus, why)``: the lines of ``nvidia-smi``'s name, driver and memory query, or None and
    why there is no GPU to check."""
    if shutil.which("nvidia-smi") is None:
        return None, "nvidia-smi not found"
    gpus = command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if not gpus:
        return None, "nvidia-smi lists no GPU"
    return gpus, ""


def machine_table(gpus: str) -> list[tuple[str, str]]:
    """What the report says of the machine: ``gpus`` (see :func:`find_gpu`), nvcc, torch,
    pycuda, the interpreter and the commit."""
    import torch
    from importlib.metadata import version

    nvcc = command_output(["nvcc", "--version"])
    commit = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "(not a git checkout)"
    rows = [(f"GPU {i} (name, driver, memory)", line.strip()) for i, line in enumerate(gpus.splitlines())]
    release = [line for line in (nvcc or "").splitlines() if "release" in line]
    rows += [("nvcc", release[0] if release else "not found"),
             ("torch", f"{torch.__version__}, CUDA {torch.version.cuda}"), ("pycuda", version("pycuda")),
             ("python", sys.executable), ("commit", commit)]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("gpu_check_report.md"),
                        help="the report (Markdown; default gpu_check_report.md)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing report")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for all steps (default {BUDGET_S:.0f})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="SoftRas's demo data, for the airplane task (default ../shared/data/softras)")
    args = parser.parse_args()
    refusal = (f"{args.output} is a folder" if args.output.is_dir() else
               f"{args.output} exists; not overwritten (--force to replace it)"
               if args.output.exists() and not args.force else
               f"{args.output}: no folder {args.output.parent}" if not args.output.parent.is_dir() else None)
    if refusal:
        print(f"gpu_check: -o {refusal}", file=sys.stderr)
        return 2
    gpus, why = find_gpu()
    if gpus is None:
        print(f"gpu_check: no NVIDIA GPU here ({why}); nothing to check")
        return 0
    from microdr.raster.cuda import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        print(f"gpu_check: found {gpus.splitlines()[0]} but the cuda backend cannot run: {reason}")
        return 1
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_table(gpus)
    print(f"gpu_check: {gpus.splitlines()[0]}; running the steps (at most {args.budget:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="microdr_gpu_check_") as work:
        outcomes = run_all(steps(sys.executable, Path(work), args.data), args.budget,
                           lambda o: print(f"  {o.status:8} {o.seconds:6.1f} s  {o.step.name}", flush=True))
    header = f"{started:%Y-%m-%d %H:%M} UTC: `python scripts/gpu_check.py`"
    args.output.write_text(report(machine, outcomes, args.budget, header))
    failed = [o for o in outcomes if o.status in ("FAIL", "timeout")]
    print(f"gpu_check: {len(failed)} of {len(outcomes)} steps did not pass; report: {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
