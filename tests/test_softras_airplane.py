"""scripts/softras_airplane.py: SoftRas's cameras and targets, checked against SoftRas's mesh."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from microdr.io.mesh import load_obj
from microdr.optimize.loop import Optimization
from microdr.render import render_faces
from microdr.io.scene import RenderSettings, load_scene
from microdr.io.targets import read_targets

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "softras"
sys.path.insert(0, str(SCRIPTS))
softras_airplane = pytest.importorskip("softras_airplane")

pytestmark = pytest.mark.skipif(
    not (DATA / "source.npy").is_file(), reason=f"SoftRas demo data not found at {DATA} (../shared is absent)"
)


def silhouette_iou(alpha: np.ndarray, target: np.ndarray) -> np.ndarray:
    a, t = alpha > 0.5, target > 0.5
    return (a & t).sum((-2, -1)) / np.maximum((a | t).sum((-2, -1)), 1)


def test_softras_cameras_and_flip_reproduce_its_silhouettes():
    # plane.obj is SoftRas's own result for these targets: with the right camera convention its
    # silhouettes overlap the targets; without the left-right flip they do not.
    cameras = softras_airplane.cameras(np.load(DATA / "camera.npy"))
    targets = softras_airplane.silhouettes(DATA)
    plane = load_obj(DATA / "plane.obj")
    corners = plane.vertices[plane.faces]
    render = RenderSettings(width=64, height=64, sigma=1e-4)
    alpha = render_faces(corners, torch.ones_like(corners), cameras, render, None)[:, 3].numpy()
    flipped = silhouette_iou(alpha, targets)
    as_stored = silhouette_iou(alpha, targets[:, :, ::-1])
    assert flipped.mean() > 0.88
    assert np.median(flipped) > 0.93
    assert as_stored.mean() < 0.5


def test_script_writes_a_scene_microdr_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["softras_airplane.py", "--data", str(DATA), "-o", str(tmp_path), "--views", "6"])
    softras_airplane.main()
    scene = load_scene(tmp_path / "scene.json")
    targets = sorted((tmp_path / "targets").iterdir())
    assert len(scene.cameras) == len(targets) == 6
    assert scene.render.width == scene.render.height == 64
    assert scene.meshes[0].mesh.num_faces == 2700
    assert float(scene.meshes[0].mesh.vertices.abs().max()) < 0.51  # the sphere, scaled by 0.5
    first = iio.imread(targets[0])
    assert first.shape == (64, 64, 4) and first[..., 3].max() == 255
    # The script's recipe, remeshing included, is what the scene holds.
    section = json.loads((tmp_path / "scene.json").read_text())["optimize"]
    assert section == {**softras_airplane.OPTIMIZE, "iterations": 1000, "views_per_step": 6}
    assert scene.optimize.remesh is not None and scene.optimize.vertex_parametrization == "offset"


def test_score_is_the_hard_iou_of_the_mesh_on_the_chosen_views(capsys, monkeypatch):
    # The hard IoU is thinner than the soft one (SoftRas's soft metric overstated its result), and
    # "odd" means the 60 views that a fit on the even ones never sees.
    cameras = softras_airplane.cameras(np.load(DATA / "camera.npy"))
    targets = softras_airplane.silhouettes(DATA)
    plane = load_obj(DATA / "plane.obj")
    odd = softras_airplane.parse_views("odd", 120)
    assert odd == list(range(1, 120, 2))
    hard = softras_airplane.hard_iou(plane, [cameras[v] for v in odd], targets[odd])
    corners = plane.vertices[plane.faces]
    render = RenderSettings(width=64, height=64, sigma=1e-4)
    alpha = render_faces(corners, torch.ones_like(corners), [cameras[v] for v in odd], render, None)[:, 3]
    soft = silhouette_iou(alpha.numpy(), targets[odd])
    assert 0.7 < hard.mean() < soft.mean() - 0.05
    monkeypatch.setattr(sys, "argv", ["softras_airplane.py", "--data", str(DATA), "--score", str(DATA / "plane.obj"), "--views", "odd"])
    softras_airplane.main()
    assert f"mean {hard.mean():.4f}, min {hard.min():.4f}" in capsys.readouterr().out


def test_holdout_odd_fits_the_even_views_and_scores_the_odd_ones(tmp_path, monkeypatch):
    arguments = ["softras_airplane.py", "--data", str(DATA), "-o", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*arguments, "--holdout", "odd"])
    softras_airplane.main()
    scene = load_scene(tmp_path / "scene.json")
    assert len(scene.cameras) == len(list((tmp_path / "targets").iterdir())) == 120
    assert scene.optimize.holdout == "odd" and scene.optimize.views_per_step == 12
    run = Optimization(scene, read_targets([str(tmp_path / "targets")], 120, (64, 64)))
    assert run.fit == tuple(range(0, 120, 2)) and run.held_out == tuple(range(1, 120, 2))
    # A held-out split that leaves fewer views to fit than are drawn per step draws them all.
    monkeypatch.setattr(sys, "argv", [*arguments, "--views", "8", "--holdout", "every:2"])
    softras_airplane.main()
    assert load_scene(tmp_path / "scene.json").optimize.views_per_step == 4


def test_the_experiments_last_rung_is_the_airplane_scripts_recipe(tmp_path, monkeypatch):
    """airplane_experiments.py spells out what the script's scene leaves to the defaults: once
    resolved, the two are the same settings (so the README's ladder ends at the script)."""
    import airplane_experiments
    import airplane_heldout

    monkeypatch.setattr(sys, "argv", ["softras_airplane.py", "--data", str(DATA), "-o", str(tmp_path), "--views", "even"])
    softras_airplane.main()
    scene_file = tmp_path / "scene.json"
    targets = read_targets([str(tmp_path / "targets")], 60, (64, 64))
    resolved = []
    for section in (airplane_heldout.now(), airplane_experiments.NOW):
        scene = json.loads(scene_file.read_text())
        scene["optimize"] = section
        scene_file.write_text(json.dumps(scene))
        resolved.append(Optimization(load_scene(scene_file), targets).settings)
    assert resolved[0] == resolved[1]
    assert resolved[0].loss["flatten"] == 0 and resolved[0].sigma_schedule == pytest.approx((3e-4, 3e-6))
