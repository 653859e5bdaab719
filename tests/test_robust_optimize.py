"""Robustness of ``microdr optimize``: a NaN or an infinity stops a run at its last good state;
flags and scene settings that would make one are refused up front; an output folder in use is
locked; a full disk or a killed process never leaves a checkpoint that ``--resume`` would load
wrong; stop signals (Ctrl-C, SIGTERM, SIGHUP) end a run cleanly. Some tests run real processes:
holding a lock, racing for one, killed while writing, signalled."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from test_optimize import (
    OUTPUT_FILES,
    files_under,
    interrupt_at,
    invoke,
    parse,
    resume_task,
    scene_data,
)

from microdr import cli
from microdr.optimize import outputs
from microdr.optimize.checkpoint import read_checkpoint
from microdr.errors import InputError
from microdr.io.mesh import load_obj
from microdr.optimize.loop import (
    CHECKPOINT,
    NonFiniteError,
    Optimization,
    lr_at,
    optimize,
    sigma_at,
)
from microdr.optimize.outputs import LOCK, outdir_lock
from microdr.raster import describe_backend, resolve_backend
from microdr.render import render_scene, scene_faces
from microdr.io.scene import load_scene
from microdr.io.targets import read_targets

ITERATIONS = 6
HOST = socket.gethostname()


def silhouette_task(folder: Path) -> tuple[Path, Path]:
    """A level-1 icosphere (42 vertices) to fit to 2 silhouettes of a squashed one, 32 x 32, one
    random view per iteration (so that a run must restore its draws to resume exactly): the
    scene file and the folder of target PNGs."""
    start = scene_data(views=2, subdivisions=1, transform={"scale": 0.7})
    start["optimize"] = {"iterations": ITERATIONS, "views_per_step": 1}
    scene_path = folder / "start.json"
    scene_path.write_text(json.dumps(start))
    truth = parse(scene_data(views=2, subdivisions=1, transform={"scale": [0.9, 0.6, 0.8]}))
    targets = folder / "targets"
    targets.mkdir()
    for view, image in enumerate(render_scene(truth)):
        iio.imwrite(targets / f"{view}.png", (image[3] * 255).round().byte().numpy())
    return scene_path, targets


def temporary_files(folder: Path) -> list[str]:
    """The names of the temporary files (``*.tmp``) in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def task(tmp_path):
    """The loaded :func:`silhouette_task`: its scene and targets."""
    scene_path, targets = silhouette_task(tmp_path)
    scene = load_scene(scene_path)
    return scene, read_targets([str(targets)], len(scene.cameras), (32, 32))


def silhouette_error(evaluation) -> torch.Tensor:
    """A custom loss: the mean squared error of the silhouettes."""
    return ((evaluation.images[:, 3] - evaluation.targets[:, 3]) ** 2).mean()


class LossWithNaN:
    """:func:`silhouette_error`, NaN at call ``at``; calls count from ``first`` (a resumed run's
    first iteration). Each iteration calls the loss once."""

    def __init__(self, at: int | None = None, first: int = 0):
        self.at, self.calls = at, first

    def __call__(self, evaluation) -> torch.Tensor:
        self.calls += 1
        loss = silhouette_error(evaluation)
        return loss * math.nan if self.calls - 1 == self.at else loss


# --- a NaN or an infinity stops the run -----------------------------------------------------------


def test_output_json_writes_non_finite_numbers_as_null():
    # metrics.json once held NaN (the metrics of NaN pixels) and Infinity (the PSNR of a perfect
    # fit) literals, which strict JSON parsers refuse.
    metrics = {"iou": math.nan, "psnr": math.inf, "views": [{"iou": 0.5, "psnr": -math.inf}], "seconds": 1.5}
    text = outputs._json({"final": metrics}).decode()
    parsed = json.loads(text, parse_constant=lambda literal: pytest.fail(f"{literal} is not strict JSON"))
    assert parsed == {"final": {"iou": None, "psnr": None, "views": [{"iou": 0.5, "psnr": None}], "seconds": 1.5}}


def test_a_nan_loss_stops_the_run_at_its_last_good_state_which_resumes_exactly(tmp_path, task):
    scene, targets = task
    clean = optimize(scene, targets, loss_fn=silhouette_error, outdir=tmp_path / "clean")
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as caught:
        optimize(scene, targets, loss_fn=LossWithNaN(at=3), outdir=out)
    error = caught.value
    assert str(error) == "iteration 4: the loss is not finite (nan)"
    assert (error.iteration, error.result.iterations, error.result.stopped) == (3, 3, str(error))
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert (final["iterations"], final["interrupted"], final["stopped"]) == (3, False, str(error))
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert read_checkpoint(out / CHECKPOINT)["iteration"] == 3
    assert not (out / LOCK).exists()

    # The checkpoint is the state after 3 iterations, random draws included: resumed, the run
    # ends exactly where the clean one did.
    resumed = optimize(scene, targets, loss_fn=LossWithNaN(first=3), outdir=out, resume=True)
    assert (resumed.iterations, resumed.stopped) == (ITERATIONS, None)
    assert torch.equal(resumed.images, clean.images)
    assert (out / "mesh.obj").read_bytes() == (tmp_path / "clean" / "mesh.obj").read_bytes()


def test_a_nan_gradient_under_a_finite_loss_leaves_the_run_as_it_was(task):
    scene, targets = task

    def loss_fn(evaluation):
        # sqrt at 0: the value is 0, the gradient inf * 0 = NaN, for x of vertex 0 alone.
        return silhouette_error(evaluation) + torch.sqrt(evaluation.vertices[0, 0] * 0)

    run = Optimization(scene, targets, loss_fn=loss_fn)
    draws = run.generator.get_state()
    message = "iteration 1: the gradient of vertices (displacement) is not finite (1 of 126 values)"
    with pytest.raises(NonFiniteError, match=f"^{re.escape(message)}$"):
        run.step()
    assert (run.iteration, run.history.rows, run.optimizer.state) == (0, [], {})
    assert torch.equal(run.parameters.displacement, torch.zeros(42, 3))
    assert torch.equal(run.generator.get_state(), draws)


def test_an_update_that_overflows_the_mesh_is_undone_and_the_start_written(tmp_path, task):
    """The scene file caps lr at 10; the API does not. Adam moves the log scale by 1e30, a
    finite number whose exp is not: the parameters stay finite, the mesh does not."""
    scene, targets = task
    settings = replace(scene.optimize, parameters=("scale",), lr=1e30)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as caught:
        optimize(scene, targets, settings, outdir=out)
    assert re.fullmatch(
        r"iteration 1: the mesh after its update is not finite \(\d+ of 126 values\)",
        str(caught.value),
    )
    assert caught.value.result.iterations == 0
    assert torch.equal(read_checkpoint(out / CHECKPOINT)["parameters"]["log_scale"], torch.zeros(3))
    start = scene_faces(scene).vertices
    torch.testing.assert_close(load_obj(out / "mesh.obj").vertices, start, rtol=0, atol=1e-6)


def test_the_command_reports_a_nan_in_one_line_with_exit_code_1(tmp_path, monkeypatch):
    scene_path, targets = silhouette_task(tmp_path)
    real = cli.optimize_scene
    monkeypatch.setattr(
        cli, "optimize_scene", lambda *a, **k: real(*a, **k, loss_fn=LossWithNaN(at=2))
    )
    out = tmp_path / "out"
    result = invoke("optimize", scene_path, targets, "-o", out)
    assert result.exit_code == 1
    assert result.stderr == (
        f"microdr: backend {describe_backend(resolve_backend('auto'))}\n"
        f"stopped at iteration 3: the loss is not finite (nan); {out} holds the last good state, "
        "after 2 iterations\n"
    )
    assert result.stdout.startswith(f"wrote {out}\n")
    assert read_checkpoint(out / CHECKPOINT)["iteration"] == 2
    assert json.loads((out / "metrics.json").read_text())["final"]["iterations"] == 2
    assert not (out / LOCK).exists()


# --- settings that would make a NaN are refused up front -----------------------------------------

EXPECTED_LR = "expected a number in (0, 10], got "
BAD_SETTINGS = {
    "lr NaN": ({"lr": math.nan}, "optimize.lr: expected a finite number, got NaN"),
    "lr inf": ({"lr": math.inf}, "optimize.lr: expected a finite number, got Infinity"),
    "lr negative": ({"lr": -0.01}, f"optimize.lr: {EXPECTED_LR}-0.01"),
    "lr zero": ({"lr": 0}, f"optimize.lr: {EXPECTED_LR}0"),
    "lr huge": ({"lr": 11}, f"optimize.lr: {EXPECTED_LR}11"),
    "lr text": ({"lr": "fast"}, f'optimize.lr: {EXPECTED_LR}"fast"'),
    "lr boolean": ({"lr": True}, f"optimize.lr: {EXPECTED_LR}true"),
    "weight negative": (
        {"loss": {"silhouette_iou": -1}},
        "optimize.loss.silhouette_iou: expected a number >= 0, got -1",
    ),
    "weight NaN": (
        {"loss": {"silhouette_iou": 1, "laplacian": math.nan}},
        "optimize.loss.laplacian: expected a finite number, got NaN",
    ),
    "weight inf": (
        {"loss": {"silhouette_iou": math.inf}},
        "optimize.loss.silhouette_iou: expected a finite number, got Infinity",
    ),
    "weight text": (
        {"loss": {"silhouette_iou": "heavy"}},
        'optimize.loss.silhouette_iou: expected a number >= 0, got "heavy"',
    ),
    "beta NaN": (
        {"betas": [0.9, math.nan]}, "optimize.betas[1]: expected a finite number, got NaN"
    ),
}
BAD_FLAGS = {  # the flag's value and the pattern of the message
    "NaN": ("nan", re.escape("--lr: expected a finite number, got NaN")),
    "inf": ("inf", re.escape("--lr: expected a finite number, got Infinity")),
    "overflow": ("1e400", re.escape("--lr: expected a finite number, got Infinity")),
    "negative": ("-1", re.escape(f"--lr: {EXPECTED_LR}-1.0")),
    "zero": ("0", re.escape(f"--lr: {EXPECTED_LR}0.0")),
    "huge": ("11", re.escape(f"--lr: {EXPECTED_LR}11.0")),
    "text": ("fast", "--lr: .+"),  # the wording of a type error is typer's
}


@pytest.mark.parametrize("name", BAD_SETTINGS)
def test_bad_optimize_settings_are_one_line_exit_code_2(tmp_path, name):
    scene_path, targets = silhouette_task(tmp_path)
    settings, message = BAD_SETTINGS[name]
    data = json.loads(scene_path.read_text())
    scene_path.write_text(json.dumps({**data, "optimize": {**data["optimize"], **settings}}))
    before = files_under(tmp_path)
    result = invoke("optimize", scene_path, targets, "-o", tmp_path / "out")
    assert (result.exit_code, result.stderr) == (2, f"{scene_path}: {message}\n")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("name", BAD_FLAGS)
def test_bad_learning_rate_flags_are_one_line_exit_code_2(tmp_path, name):
    scene_path, targets = silhouette_task(tmp_path)
    value, message = BAD_FLAGS[name]
    result = invoke("optimize", scene_path, targets, "-o", tmp_path / "out", "--lr", value)
    assert result.exit_code == 2
    assert re.fullmatch(message + "\n", result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


# --- the lock of an output folder ----------------------------------------------------------------

HOLD_THE_LOCK = """
import sys
from pathlib import Path
from microdr.optimize.outputs import outdir_lock

with outdir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes it
"""


def in_use(out: Path, pid: int, host: str = HOST) -> str:
    """The pattern of the one line refusing ``out`` while process ``pid`` holds it."""
    return (
        f"{re.escape(str(out))}: in use by process {pid} on host {re.escape(host)} since "
        r"[-0-9: ]+ \(\.microdr\.lock\); wait for it to end, or give --force to write into the "
        "folder anyway"
    )


def taken_over(out: Path, pid: int, why: str) -> str:
    """The pattern of the note of taking over process ``pid``'s lock of ``out``."""
    return (
        f"{re.escape(str(out))}: taking over the lock of process {pid} on host "
        f"{re.escape(HOST)} since [-0-9: ]+: {re.escape(why)}"
    )


def notes(caplog) -> list[str]:
    """What microDR logged (other libraries may log too)."""
    return [record.getMessage() for record in caplog.records if record.name.startswith("microdr")]


def test_a_folder_in_use_by_another_process_is_refused_unless_force(tmp_path, caplog):
    scene_path, targets = silhouette_task(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        refused = invoke("optimize", scene_path, targets, "-o", out)
        assert refused.exit_code == 2
        assert re.fullmatch(in_use(out, holder.pid) + "\n", refused.stderr), refused.stderr
        assert [p.name for p in out.iterdir()] == [LOCK]

        forced = invoke("optimize", scene_path, targets, "-o", out, "--force")
        assert forced.exit_code == 0, forced.output
        [note] = notes(caplog)
        assert re.fullmatch(taken_over(out, holder.pid, "--force"), note), note
        assert (out / "mesh.obj").exists() and not (out / LOCK).exists()
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    # The first holder, ending after the forced run, leaves the folder as that run left it.
    assert (out / "mesh.obj").exists() and not (out / LOCK).exists()


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def lock_of(pid: int, host: str = HOST) -> bytes:
    """The lock file of a run of process ``pid`` on ``host``."""
    return json.dumps({"pid": pid, "host": host, "since": "2024-05-01 12:00:00"}).encode()


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, task, caplog):
    scene, targets = task
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK).write_bytes(lock_of(pid))
    result = optimize(scene, targets, outdir=out)
    assert result.iterations == ITERATIONS
    [note] = notes(caplog)
    assert re.fullmatch(taken_over(out, pid, "that run no longer exists"), note), note
    assert not (out / LOCK).exists() and (out / "metrics.json").exists()


def contend_for_the_lock(out: Path, barrier, results, release) -> None:
    """One of several processes taking ``out``'s lock at once: reports ``("won", pid)`` and
    holds the lock until ``release`` is set, or reports ``("refused", message)``."""
    barrier.wait()
    try:
        with outdir_lock(out):
            results.put(("won", os.getpid()))
            release.wait(timeout=60)
    except InputError as error:
        results.put(("refused", str(error)))


def test_of_runs_that_take_over_a_stale_lock_at_once_exactly_one_does(tmp_path):
    # Forked (cheap: no import of torch each), released from a barrier together.
    context = multiprocessing.get_context("fork")
    out = tmp_path / "out"
    out.mkdir()
    for trial in range(5):
        (out / LOCK).write_bytes(lock_of(dead_pid()))
        count = 6
        barrier, results, release = context.Barrier(count), context.Queue(), context.Event()
        processes = [
            context.Process(target=contend_for_the_lock, args=(out, barrier, results, release))
            for _ in range(count)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in processes]
        held = json.loads((out / LOCK).read_text())["pid"]
        release.set()
        for process in processes:
            process.join(timeout=60)
        winners = [detail for outcome, detail in outcomes if outcome == "won"]
        assert winners == [held], (trial, outcomes)
        refusals = [detail for outcome, detail in outcomes if outcome == "refused"]
        assert all(re.match(f"{re.escape(str(out))}: in use by ", r) for r in refusals), outcomes
        assert [p.name for p in out.iterdir()] == []


UNREADABLE = "another run (its lock file is unreadable)"
OTHER_LOCKS = {  # name: () -> (the lock's bytes, its holder as messages describe it)
    # A pid that is free here may be in use on the other host.
    "another host": lambda: (
        lock_of(pid := dead_pid(), "elsewhere"),
        f"process {pid} on host elsewhere since 2024-05-01 12:00:00",
    ),
    "unreadable": lambda: (b"", UNREADABLE),
    "pid 0": lambda: (lock_of(0), UNREADABLE),  # 0 would name a process group
}


@pytest.mark.parametrize("name", OTHER_LOCKS)
def test_a_lock_that_may_be_live_is_refused_and_force_takes_it(tmp_path, task, name, caplog):
    scene, targets = task
    lock, holder = OTHER_LOCKS[name]()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_bytes(lock)
    with pytest.raises(InputError, match=f"^{re.escape(f'{out}: in use by {holder} (')}"):
        optimize(scene, targets, outdir=out)
    assert files_under(out) == {out / LOCK: lock}

    optimize(scene, targets, outdir=out, force=True)
    [note] = notes(caplog)
    assert note == f"{out}: taking over the lock of {holder}: --force"
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_the_lock_is_removed_however_the_run_ends(tmp_path, task, raised):
    scene, targets = task
    out = tmp_path / "out"

    def stop(step):
        raise raised("stop")

    if raised is KeyboardInterrupt:  # Ctrl-C: the outputs as of the first iteration
        assert optimize(scene, targets, outdir=out, callback=stop).interrupted
        assert not (out / LOCK).exists() and (out / "mesh.obj").exists()
    else:  # a failure before anything was written leaves no folder behind
        with pytest.raises(RuntimeError, match="^stop$"):
            optimize(scene, targets, outdir=out, callback=stop)
        assert not out.exists()


# --- a full disk or a killed process while writing a checkpoint -----------------------------------


def failing_fsync(failure: str, fsync=os.fsync):
    """``os.fsync`` failing at the second checkpoint, once all its bytes are in the temporary
    file and before the rename: ``"hang"`` stops there (for the test to kill the process),
    ``"full"`` raises what a full disk does."""
    checkpoints = []

    def patched(descriptor: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}"))
        if name.startswith(f".{CHECKPOINT}."):
            checkpoints.append(name)
            if len(checkpoints) == 2 and failure == "full":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if len(checkpoints) == 2:
                print("hanging", flush=True)
                time.sleep(600)
        fsync(descriptor)

    return patched


# ``microdr`` with the arguments given, hanging at its second checkpoint.
HANG_AT_A_CHECKPOINT = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_robust_optimize import failing_fsync
from microdr.cli import main

os.fsync = failing_fsync("hang")
sys.argv = ["microdr", *sys.argv[1:]]
main()
"""
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="finds the checkpoint's file through /proc"
)


@needs_proc
def test_a_killed_run_leaves_the_previous_checkpoint_and_a_stale_lock_that_resume_takes(
    tmp_path, caplog
):
    scene_path, targets = silhouette_task(tmp_path)
    out = tmp_path / "out"
    arguments = ["optimize", scene_path, targets, "-o", out, "--checkpoint-every", 1]
    killed = subprocess.Popen(
        [sys.executable, "-c", HANG_AT_A_CHECKPOINT, *map(str, arguments)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert killed.stdout.readline() == "hanging\n"
    finally:
        killed.kill()
        killed.communicate()
    assert read_checkpoint(out / CHECKPOINT)["iteration"] == 1
    assert json.loads((out / LOCK).read_text())["pid"] == killed.pid
    [left] = temporary_files(out)  # the second checkpoint, written but not renamed
    assert left.startswith(f".{CHECKPOINT}.{killed.pid}.")

    resumed = invoke("optimize", scene_path, targets, "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert temporary_files(out) == []
    [note] = notes(caplog)
    assert re.fullmatch(taken_over(out, killed.pid, "that run no longer exists"), note), note
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert (final["iterations"], final["stopped"]) == (ITERATIONS, None)
    assert not (out / LOCK).exists()


def test_a_checkpoint_does_not_grow_with_the_iterations(tmp_path, task):
    """Rewritten every N iterations, a checkpoint that held every row made the disk traffic of a
    run quadratic in its length. The progress frames (at most GIF_FRAMES) are all that grows."""
    scene, targets = task
    out = tmp_path / "out"
    sizes = {}  # frames so far: the checkpoint sizes seen with that many

    def record(step):
        frames = (step.iteration + 1 + 2) // 3  # at 0, 3, 6, ... (every 3rd of 120)
        sizes.setdefault(frames, set()).add((out / CHECKPOINT).stat().st_size)

    settings = replace(scene.optimize, iterations=120)
    optimize(scene, targets, settings, outdir=out, checkpoint_every=1, callback=record)
    assert len(sizes) == 40 and all(len(seen) == 1 for seen in sizes.values()), sizes
    rows = (out / "checkpoint.rows").read_text().splitlines()
    assert [json.loads(row)["iteration"] for row in rows] == list(range(120))


def test_a_journal_that_does_not_match_its_checkpoint_is_one_line_on_resume(tmp_path, task):
    scene, targets = task
    out = tmp_path / "out"
    optimize(scene, targets, outdir=out, callback=interrupt_at(2))
    journal = out / "checkpoint.rows"
    journal.write_bytes(journal.read_bytes()[:-10])
    with pytest.raises(InputError) as caught:
        optimize(scene, targets, outdir=out, resume=True)
    expected = f"{journal}: does not match {CHECKPOINT} (truncated or changed since)"
    assert str(caught.value) == expected


def test_a_run_removes_the_temporary_files_of_dead_processes_and_no_others(tmp_path, task):
    scene, targets = task
    out = tmp_path / "out"
    out.mkdir()
    dead, live = dead_pid(), os.getppid()  # the process that runs pytest's, say
    leftovers = {
        f".mesh.obj.{dead}.0123abcd.tmp": True,  # half a mesh, of a killed run
        f".{CHECKPOINT}.{dead}.89abcdef.tmp": True,
        f".{LOCK}.{dead}.00000000.tmp": True,
        f".render_0.png.{live}.0123abcd.tmp": False,  # a live process's: it may rename it yet
        "notes.tmp": False,  # not ours
        ".mesh.obj.tmp": False,
    }
    for name in leftovers:
        (out / name).write_bytes(b"partial")
    optimize(scene, targets, outdir=out)
    assert sorted(temporary_files(out)) == sorted(n for n, stale in leftovers.items() if not stale)


@needs_proc
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    scene_path, targets = silhouette_task(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", failing_fsync("full"))
    result = invoke("optimize", scene_path, targets, "-o", out, "--checkpoint-every", 1)
    assert result.exit_code == 2
    assert result.stderr == (
        f"microdr: backend {describe_backend(resolve_backend('auto'))}\n"
        f"{out / CHECKPOINT}: cannot write: No space left on device\n"
    )
    # No temporary file, no lock: only the first checkpoint, whole (its journal has a row more).
    assert {p.name for p in out.iterdir()} == {CHECKPOINT, "checkpoint.rows"}
    assert read_checkpoint(out / CHECKPOINT)["iteration"] == 1
    assert len(read_checkpoint(out / CHECKPOINT)["history"]["rows"]) == 1


# --- stop signals: Ctrl-C, SIGTERM, SIGHUP, on a real process -------------------------------------


def start_command(*arguments, python: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -m microdr`` with ``arguments``, the way a shell runs ``microdr``; stderr piped
    and read line by line."""
    return subprocess.Popen(
        [sys.executable, *python, "-m", "microdr", *map(str, arguments)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_line(process: subprocess.Popen, prefix: str) -> list[str]:
    """The stderr lines of ``process`` up to and including the first that starts with
    ``prefix``."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line {prefix!r} on stderr: {''.join(lines)}")


def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_code_130(tmp_path):
    scene_path, targets = silhouette_task(tmp_path)
    out = tmp_path / "out"
    # -X importtime logs each module as it is imported: torch's first is a moment into the
    # import of the command (microdr itself does not import torch), which goes on for a while.
    process = start_command(
        "optimize", scene_path, targets, "-o", out, python=("-X", "importtime")
    )
    for line in process.stderr:
        if "torch" in line:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == "interrupted"
    assert not out.exists()


STOPS = {"SIGINT": ("interrupted", 130), "SIGTERM": ("stopped by SIGTERM", 143),
         "SIGHUP": ("stopped by SIGHUP", 129)}  # fmt: skip


@pytest.mark.parametrize("name", STOPS)
def test_a_stop_signal_mid_run_writes_everything_and_says_so(tmp_path, name):
    scene_path, targets = silhouette_task(tmp_path)
    out = tmp_path / "out"
    total = 100_000  # far more than run before the signal lands
    process = start_command(
        "optimize", scene_path, targets, "-o", out, "--iterations", total, "--log-every", 1
    )
    wait_for_line(process, "iteration 3/")
    process.send_signal(getattr(signal, name))
    stdout, stderr = process.communicate(timeout=120)
    how, code = STOPS[name]
    assert process.returncode == code, stderr
    match = re.fullmatch(
        f"{how} after (\\d+) of {total} iterations; continue with --resume {re.escape(str(out))}",
        stderr.splitlines()[-1],
    )
    assert match, stderr
    done = int(match[1])
    assert stdout.startswith(f"wrote {out}\n")
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert (final["iterations"], final["interrupted"]) == (done, True)
    assert read_checkpoint(out / CHECKPOINT)["iteration"] == done >= 3
    assert {p.name for p in out.iterdir()} >= OUTPUT_FILES
    assert not (out / LOCK).exists() and temporary_files(out) == []


def test_ctrl_c_thrice_while_the_files_are_written_waits_for_them(tmp_path):
    scene_path, targets = silhouette_task(tmp_path)
    out = tmp_path / "out"
    process = start_command("optimize", scene_path, targets, "-o", out, "--log-every", 1)
    # After the last iteration's line come the final render, then the files.
    wait_for_line(process, f"iteration {ITERATIONS}/{ITERATIONS}")
    for _ in range(3):
        process.send_signal(signal.SIGINT)
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert f"finishing the final render and {out}'s files before stopping\n" in stderr
    assert stdout.startswith(f"wrote {out}\n")
    assert {p.name for p in out.iterdir()} >= OUTPUT_FILES
    assert read_checkpoint(out / CHECKPOINT)["iteration"] == ITERATIONS
    assert not (out / LOCK).exists() and temporary_files(out) == []
    resumed = invoke("optimize", scene_path, targets, "--resume", out)
    assert resumed.exit_code == 0, resumed.output


# --- extending a run ------------------------------------------------------------------------------


def test_resume_with_more_iterations_extends_a_finished_run_to_the_uninterrupted_result(tmp_path):
    scene_path, targets = silhouette_task(tmp_path)
    # A sigma that does not follow the number of iterations (the default schedule does).
    scene = json.loads(scene_path.read_text())
    scene["optimize"]["sigma_schedule"] = {"start": 1e-4, "end": 1e-4}
    scene_path.write_text(json.dumps(scene))
    whole, part = tmp_path / "whole", tmp_path / "part"
    total = 2 * ITERATIONS
    uninterrupted = invoke("optimize", scene_path, targets, "-o", whole, "--iterations", total)
    assert uninterrupted.exit_code == 0, uninterrupted.output
    assert invoke("optimize", scene_path, targets, "-o", part).exit_code == 0
    extended = invoke("optimize", scene_path, targets, "--resume", part, "--iterations", total)
    assert extended.exit_code == 0, extended.output
    expected, actual = (read_checkpoint(out / CHECKPOINT) for out in (whole, part))
    assert actual["iteration"] == expected["iteration"] == total
    for name, tensor in expected["parameters"].items():
        assert torch.equal(actual["parameters"][name], tensor), name
    assert torch.equal(actual["generator"], expected["generator"])
    seconds = {"seconds": 0}
    rows = [[{**row, **seconds} for row in c["history"]["rows"]] for c in (expected, actual)]
    assert rows[0] == rows[1] and len(rows[0]) == total
    assert (part / "mesh.obj").read_bytes() == (whole / "mesh.obj").read_bytes()

    # Fewer than are done: one line that says what to give.
    fewer = invoke("optimize", scene_path, targets, "--resume", part)
    assert (fewer.exit_code, fewer.stderr) == (
        2,
        f"{part / CHECKPOINT}: {total} iterations are done, more than the {ITERATIONS} to run; "
        f"resume with --iterations {total} or more\n",
    )


def test_an_extended_run_follows_the_schedules_of_its_new_length_from_the_seam(tmp_path):
    scene, targets = resume_task(tmp_path)
    short = replace(scene.optimize, iterations=4)
    optimize(scene, targets, short, outdir=tmp_path / "out")
    longer = replace(scene.optimize, iterations=10)
    result = optimize(scene, targets, longer, outdir=tmp_path / "out", resume=True)
    rows = result.history.rows
    assert [row["lr"] for row in rows] == [lr_at(short, i) for i in range(4)] + [
        lr_at(longer, i) for i in range(4, 10)
    ]
    assert [row["sigma"] for row in rows] == [sigma_at(short, scene, i) for i in range(4)] + [
        sigma_at(longer, scene, i) for i in range(4, 10)
    ]
