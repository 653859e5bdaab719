"""The bundled tasks (scripts/make_tasks.py): each loads, its committed targets are the truth's
renders for the task's cameras, and its settings start to converge. Cheap: the full runs and
their floors are ``python scripts/make_tasks.py --run``."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from microdr.optimize.loop import optimize
from microdr.render import render_scene
from microdr.io.scene import load_scene
from microdr.io.targets import read_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_tasks  # noqa: E402


@pytest.mark.parametrize("task", make_tasks.TASKS, ids=lambda task: task.name)
def test_committed_targets_are_the_truths_renders(task):
    scene, truth = load_scene(task.scene), load_scene(task.truth)
    assert scene.optimize is not None
    assert scene.cameras == truth.cameras and scene.render == truth.render
    size = (scene.render.width, scene.render.height)
    # One target per camera, of the scene's size (read_targets checks both).
    targets = read_targets([str(task.targets)], len(scene.cameras), size)
    assert len(scene.cameras) >= (8 if task.min_iou is not None else 1)
    # Up to date with the truth (8-bit files saturate lit colors above 1); one 8-bit step
    # allows for another compiler's rounding.
    rendered = render_scene(truth, backend="cpu").clamp(0, 1)
    torch.testing.assert_close(targets.images, rendered, atol=1 / 255 + 1e-6, rtol=0)
    # Shape tasks fit silhouettes; the colors tasks have color to recover.
    assert targets.has_silhouette.all()
    assert bool(targets.has_rgb.all()) == task.recovers_colors


@pytest.mark.parametrize("task", make_tasks.TASKS, ids=lambda task: task.name)
def test_held_out_cameras_are_not_fitting_cameras(task):
    cameras = load_scene(task.scene).cameras
    held_out = make_tasks.held_out_cameras(cameras[0])
    assert len(held_out) == 8
    fitting = {tuple(round(x, 6) for x in camera.eye) for camera in cameras}
    assert not fitting & {tuple(round(x, 6) for x in camera.eye) for camera in held_out}


@pytest.mark.parametrize("task", make_tasks.TASKS, ids=lambda task: task.name)
def test_each_task_starts_to_converge_from_its_committed_targets(task):
    """A few iterations of the task's own settings, as ``microdr optimize`` reads it."""
    scene = load_scene(task.scene)
    size = (scene.render.width, scene.render.height)
    targets = read_targets([str(task.targets)], len(scene.cameras), size)
    result = optimize(scene, targets, replace(scene.optimize, iterations=5), backend="cpu")
    losses = [row["loss"] for row in result.history.rows]
    assert losses[-1] < losses[0]
