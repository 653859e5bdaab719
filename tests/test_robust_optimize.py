"""Robustness of ``microdr optimize``: a NaN or an infinity stops a run at its last good state;
flags and scene settings that would make one are refused up front; an output folder in use is
locked; a full disk or a killed process never leaves a checkpoint that ``--resume`` would load
wrong. Two tests run a second, real process: one holding a lock, one killed while writing."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from test_optimize import files_under, invoke, parse, scene_data

from microdr import cli, outputs
from microdr.checkpoint import read_checkpoint
from microdr.errors import InputError
from microdr.mesh import load_obj
from microdr.optimize import CHECKPOINT, NonFiniteError, Optimization, optimize
from microdr.outputs import LOCK
from microdr.render import render_scene, scene_faces
from microdr.scene import load_scene
from microdr.targets import read_targets

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
from microdr.outputs import outdir_lock

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
    """What microDR logged (other libraries may log too: matplotlib, building its font cache)."""
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

    resumed = invoke("optimize", scene_path, targets, "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    [note] = notes(caplog)
    assert re.fullmatch(taken_over(out, killed.pid, "that run no longer exists"), note), note
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert (final["iterations"], final["stopped"]) == (ITERATIONS, None)
    assert not (out / LOCK).exists()


@needs_proc
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    scene_path, targets = silhouette_task(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", failing_fsync("full"))
    result = invoke("optimize", scene_path, targets, "-o", out, "--checkpoint-every", 1)
    assert result.exit_code == 2
    assert result.stderr == f"{out / CHECKPOINT}: cannot write: No space left on device\n"
    # No temporary file, no lock: only the first checkpoint, whole.
    assert [p.name for p in out.iterdir()] == [CHECKPOINT]
    assert read_checkpoint(out / CHECKPOINT)["iteration"] == 1
