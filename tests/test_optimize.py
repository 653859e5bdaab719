"""microdr.optimize.loop and ``microdr optimize``: recovering colors and shapes from images rendered
by the renderer itself, resuming, interruption, outputs, losses, and one-line errors for bad
targets. Scenes are small (32 x 32, icosphere levels 0-3, a few views) to keep the file fast."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import png
import pytest
import torch
from typer.testing import CliRunner

from microdr import cli
from microdr.optimize.checkpoint import encode_checkpoint, read_checkpoint
from microdr.optimize.drawing import FRAME
from microdr.optimize.losses import (
    MeshTopology,
    edge_length_loss,
    flatten_loss,
    laplacian_loss,
    psnr,
    silhouette_iou,
    silhouette_iou_loss,
)
from microdr.io.mesh import icosphere, plane
from microdr.optimize.loop import (
    CHECKPOINT,
    Optimization,
    Step,
    _interrupts_held,
    optimize,
    resolve_settings,
    sigma_at,
)
from microdr.optimize.outputs import _dumps
from microdr.raster import describe_backend
from microdr.render import render_scene
from microdr.io.scene import OptimizeSettings, load_scene, parse_scene
from microdr.io.targets import Targets, expand_arguments, read_image
from microdr.verify import shrink

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = {
    "mesh.obj", "scene.json", "progress.gif", "loss.png", "metrics.csv", "metrics.json",
    CHECKPOINT, "checkpoint.rows",
}  # fmt: skip


def cameras(count: int) -> list[dict]:
    """``count`` cameras around the origin, alternately above and below."""
    return [
        {"orbit": {"distance": 3, "elevation": 25 * (-1) ** i, "azimuth": 360 * i / count}}
        for i in range(count)
    ]


def scene_data(views: int = 4, subdivisions: int = 2, **mesh) -> dict:
    """A 32 x 32 icosphere scene; ``mesh`` adds keys to its mesh entry."""
    return {
        "image": {"width": 32, "height": 32},
        "render": {"sigma": 1e-4},
        "meshes": [{"primitive": "icosphere", "subdivisions": subdivisions, **mesh}],
        "cameras": cameras(views),
    }


def parse(data: dict, source: str = "scene.json"):
    return parse_scene(data, source, Path("."))


def random_colors(count: int, seed: int) -> list[list[float]]:
    return torch.rand(count, 3, generator=torch.Generator().manual_seed(seed)).tolist()


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(arg) for arg in args])


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- recovering colors and shapes ---------------------------------------------------------------


def test_colors_task_through_the_command_line(tmp_path):
    """Fixed geometry, random start colors; the targets are the truth's RGBA PNGs, rendered by
    ``microdr render``. Every output is written, and the optimized scene renders the result."""
    truth = scene_data(color={"per_vertex": random_colors(162, seed=1)})
    start = scene_data(color={"per_vertex": random_colors(162, seed=2)})
    start["optimize"] = {
        "parameters": ["colors"],
        "lr": 0.2,
        "betas": [0.5, 0.99],
        "iterations": 60,
    }
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "start.json").write_text(json.dumps(start))
    rendered = invoke(
        "render", tmp_path / "truth.json", "-o", tmp_path / "targets" / "t.png", "--alpha"
    )
    assert rendered.exit_code == 0, rendered.output

    out = tmp_path / "out"
    result = invoke(
        "optimize", tmp_path / "start.json", tmp_path / "targets", "-o", out, "--log-every", 20,
        "--backend", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    wrote, summary = result.stdout.splitlines()
    assert wrote == f"wrote {out}"
    # The geometry is fixed: the hard IoU stays (below 1: the soft target's alpha > 0.5 reaches
    # past the outline, where two faces' soft edges add up).
    iou = summary.split()[1]
    assert summary.startswith(f"IoU {iou} (start {iou}), PSNR ") and float(iou) < 1
    assert summary.endswith(" s, backend cpu") and ", 60 iterations, " in summary
    # Not a terminal: the backend, then one line every 20 iterations.
    backend, *progress = result.stderr.splitlines()
    assert backend == f"microdr: backend {describe_backend('cpu')}"
    assert [line.split("  ")[0] for line in progress] == [
        "iteration 20/60", "iteration 40/60", "iteration 60/60",
    ]  # fmt: skip

    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    assert final["fit"]["psnr"] >= 40 and metrics["start"]["fit"]["psnr"] < 20
    assert [view["camera"] for view in final["fit"]["views"]] == [0, 1, 2, 3]
    assert all(view["psnr"] >= 38 for view in final["fit"]["views"])
    assert final["held_out"] is None and metrics["start"]["held_out"] is None
    assert (final["iterations"], final["backend"], final["interrupted"]) == (60, "cpu", False)
    assert final["seconds"] > 0 and list(metrics) == ["start", "final"]
    names = {p.name for p in out.iterdir()}
    assert names == OUTPUT_FILES | {
        f"{kind}_{i}.png" for kind in ("render", "sheet") for i in range(4)
    }
    # Four panels of 32 x 32 enlarged 8 times, framed, under their labels.
    assert iio.imread(out / "sheet_1.png").shape[1:] == (4 * (8 * 32 + FRAME) + FRAME, 3)
    # The targets of the 4 cameras over their renders every ceil(60 / 50) = 2 iterations, and at
    # the end; 32 x 32 enlarged 4 times.
    frames = iio.imread(out / "progress.gif", index=None)
    assert frames.shape[0] == 31 and frames.shape[2] == 4 * (4 * 32 + FRAME) + FRAME
    assert iio.imread(out / "loss.png").shape[2] in (3, 4)
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == (
        "iteration,loss,rgb_l2,iou,soft_iou,psnr,held_out_iou,held_out_psnr,lr,sigma,seconds"
    )
    assert len(csv_lines) == 61 and csv_lines[-1].startswith("59,")

    # The optimized scene reproduces the final renders; the OBJ holds the colors.
    optimized = load_scene(out / "scene.json")
    assert optimized.meshes[0].name == "mesh.obj"
    rerendered = render_scene(optimized, backend="cpu")[:, :3]
    final_render = torch.from_numpy(iio.imread(out / "render_2.png")).permute(2, 0, 1) / 255
    torch.testing.assert_close(rerendered[2], final_render, atol=0.5 / 255 + 1e-6, rtol=0)


def test_shape_from_silhouettes(tmp_path):
    """An icosphere becomes an ellipsoid from 4 grayscale silhouettes; the loss falls."""
    truth = parse(scene_data(subdivisions=3, transform={"scale": [1.0, 0.55, 0.75]}))
    targets = Targets.from_images(render_scene(truth)[:, 3:])  # (4, 1, 32, 32): silhouettes only
    start = parse(scene_data(transform={"scale": 0.8}))
    settings = resolve_settings(start, targets, OptimizeSettings(iterations=60, lr=0.02))
    assert settings.parameters == ("vertices",)
    # SoftRas's Laplacian; no flatten term, which would keep thin parts thick (see the default).
    assert {k: v for k, v in settings.loss.items() if v} == {"silhouette_iou": 1, "laplacian": 0.03}
    result = optimize(start, targets, settings)
    losses = [row["loss"] for row in result.history.rows]
    assert losses[-1] < 0.5 * losses[0]
    assert result.start_metrics.mean_iou < 0.85
    assert result.metrics.mean_iou >= 0.9
    assert result.metrics.psnr == (None,) * 4 and result.metrics.mean_psnr is None


def shifted_truth(parameter: str) -> tuple[dict, dict]:
    """A start scene and a truth that differs from it in what ``parameter`` changes."""
    lights = {"ambient": 0.3, "directional": [{"direction": [0, 1, 1], "intensity": 0.8}]}
    start = {**scene_data(views=2, subdivisions=1, color=[0.6, 0.5, 0.4]), "lights": lights}
    truth = json.loads(json.dumps(start))
    mesh = truth["meshes"][0]
    if parameter in ("vertices", "bounded"):
        mesh["transform"] = {"scale": [0.8, 0.6, 0.7]}
        start["meshes"][0]["transform"] = {"scale": 0.7, "rotate": [10, 20, 30]}
    elif parameter == "translation":
        mesh["transform"] = {"translate": [0.2, -0.1, 0.1]}
    elif parameter == "scale":
        mesh["transform"] = {"scale": [1.2, 0.9, 1.0]}
    elif parameter == "colors":
        mesh["color"] = [0.2, 0.7, 0.5]
    elif parameter == "light":
        truth["lights"] = {
            "ambient": 0.5,
            "directional": [{"direction": [1, 0.5, 0], "intensity": 0.4}],
        }
    elif parameter == "camera":
        for camera in truth["cameras"]:
            camera["orbit"]["distance"] = 3.4
    return start, truth


@pytest.mark.parametrize(
    "parameter", ["vertices", "bounded", "translation", "scale", "colors", "light", "camera"]
)
def test_each_free_parameter_brings_the_renders_closer(parameter):
    """With the default loss for the task: the image terms fall."""
    start_data, truth_data = shifted_truth(parameter)
    start_data["optimize"] = {
        "parameters": ["vertices" if parameter == "bounded" else parameter],
        "vertex_parametrization": "bounded" if parameter == "bounded" else "offset",
        "lr": 0.05,
        "iterations": 15,
    }
    targets = Targets.from_images(render_scene(parse(truth_data)))
    result = optimize(parse(start_data), targets)
    image_loss = [row["rgb_l2"] + row.get("silhouette_iou", 0) for row in result.history.rows]
    assert image_loss[-1] < 0.8 * image_loss[0], image_loss
    assert result.metrics.mean_psnr > result.start_metrics.mean_psnr
    if parameter == "bounded":
        assert result.scene.meshes[0].mesh.vertices.abs().max() < 1


def test_custom_loss_and_stepping_one_iteration_at_a_time():
    """A notebook's loop: own loss (a dict of named terms), own iteration; the parameters that
    are not free stay exactly as the scene has them."""
    truth = parse({**scene_data(views=2, subdivisions=1), "meshes": [
        {"primitive": "icosphere", "subdivisions": 1, "transform": {"translate": [0.3, 0, 0]}}
    ]})  # fmt: skip
    targets = Targets.from_images(render_scene(truth))
    start = parse(scene_data(views=2, subdivisions=1))
    seen = []

    def silhouette_l1(evaluation):
        seen.append(tuple(evaluation.views.tolist()))
        difference = (evaluation.images[:, 3] - evaluation.targets[:, 3]).abs().mean()
        return {"alpha_l1": difference, "zero": difference * 0}

    settings = OptimizeSettings(parameters=("translation",), iterations=25, lr=0.05)
    run = Optimization(start, targets, settings, loss_fn=silhouette_l1)
    steps = list(run.steps())
    assert [step.iteration for step in steps] == list(range(25))
    assert seen == [(0, 1)] * 25
    assert set(steps[0].terms) == {"alpha_l1", "zero"}
    assert steps[0].images.shape == (2, 4, 32, 32) and not steps[0].images.requires_grad
    assert steps[-1].loss < 0.5 * steps[0].loss
    with pytest.raises(RuntimeError):
        run.step()
    result = run.result()
    shift = (result.meshes[0].vertices - start.meshes[0].mesh.vertices).mean(dim=0)
    assert shift[0] > 0.15 and shift[1:].abs().max() < 0.05
    torch.testing.assert_close(result.colors[0], start.meshes[0].colors)


def test_a_run_computes_its_start_and_a_resumed_state_on_one_thread(monkeypatch):
    """Torch's operations run on one thread wherever a run computes, its start parameters and a
    resumed state included: on two threads, MKL's ``logit`` gave some colors' logits another last
    bit in about one process of 13, so a run could not be repeated. The caller's thread count is
    restored after."""
    import microdr.optimize.loop as loop

    threads = []

    class Recorded(loop.Parameters):
        def __init__(self, *args, **kwargs):
            threads.append(("start", torch.get_num_threads()))
            super().__init__(*args, **kwargs)

        def load_state_dict(self, *args, **kwargs):
            threads.append(("resume", torch.get_num_threads()))
            return super().load_state_dict(*args, **kwargs)

    monkeypatch.setattr(loop, "Parameters", Recorded)
    scene = parse(scene_data(views=2, subdivisions=1))
    targets = Targets.from_images(render_scene(scene))
    settings = OptimizeSettings(parameters=("vertices", "colors"), iterations=2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = Optimization(scene, targets, settings, backend="cpu")
        run.step()
        run.load_state_dict(run.state_dict(), "state")
        assert threads == [("start", 1), ("resume", 1)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_outputs_of_several_meshes_with_face_colors_and_free_lights_and_cameras(tmp_path):
    """Each mesh gets its OBJ, per-face colors stay in the scene, and the optimized scene
    (lights and camera eyes included) renders what the run ended with; float64 runs too."""
    lights = {"ambient": 0.3, "directional": [{"direction": [0, 1, 1], "intensity": 0.8}]}
    data = {
        **scene_data(views=2, subdivisions=0),
        "meshes": [
            {"primitive": "cube", "color": {"per_face": random_colors(12, seed=3)},
             "transform": {"scale": 0.4, "translate": [0.6, 0, 0]}},
            {"primitive": "icosphere", "subdivisions": 0, "transform": {"scale": 0.5}},
        ],
        "lights": lights,
        "optimize": {"parameters": ["colors", "light", "camera", "translation"], "iterations": 3},
    }  # fmt: skip
    scene = parse(data)
    targets = Targets.from_images(render_scene(parse({**data, "lights": {"ambient": 0.6}})))
    result = optimize(scene, targets, outdir=tmp_path / "out", dtype=torch.float64)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"mesh_0.obj", "mesh_1.obj"} <= names and "mesh.obj" not in names
    optimized = load_scene(tmp_path / "out" / "scene.json")
    box, sphere = optimized.meshes
    assert (box.color_mode, sphere.color_mode) == ("face", "vertex")
    torch.testing.assert_close(box.colors, result.colors[0], rtol=0, atol=0)
    assert optimized.lights.ambient != 0.3 and optimized.cameras[0].eye != scene.cameras[0].eye
    # The scene holds float32 numbers: renders of the float64 run differ at the soft edges.
    torch.testing.assert_close(render_scene(optimized).cpu(), result.images, rtol=0, atol=1e-3)


# --- resume and interruption --------------------------------------------------------------------


def resume_task(tmp_path: Path):
    """A run that uses everything resuming must restore: random views, Adam's moments, a cosine
    learning rate and a sigma schedule; its targets (RGBA PNGs) and scene are files."""
    truth = scene_data(subdivisions=1, transform={"scale": [0.9, 0.6, 0.8]}, color=[0.9, 0.4, 0.2])
    start = scene_data(subdivisions=1, transform={"scale": 0.7})
    start["optimize"] = {
        "parameters": ["vertices", "colors", "scale"],
        "iterations": 12,
        "lr_schedule": "cosine",
        "lr": 0.03,
        "sigma_schedule": {"start": 3e-4, "end": 1e-4},
        "views_per_step": 2,
    }
    (tmp_path / "start.json").write_text(json.dumps(start))
    for i, image in enumerate(render_scene(parse(truth)).cpu()):
        path = tmp_path / "targets" / f"view_{i}.png"
        path.parent.mkdir(exist_ok=True)
        iio.imwrite(path, (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
    scene = load_scene(tmp_path / "start.json")
    targets = Targets.from_images(
        [read_image(path) for path in sorted((tmp_path / "targets").iterdir())],
        [str(path) for path in sorted((tmp_path / "targets").iterdir())],
    )
    return scene, targets


def interrupt_at(iteration: int):
    def callback(step):
        if step.iteration == iteration:
            raise KeyboardInterrupt

    return callback


def test_resume_gives_the_result_of_an_uninterrupted_run(tmp_path):
    scene, targets = resume_task(tmp_path)
    drawn = []
    whole = optimize(
        scene,
        targets,
        outdir=tmp_path / "whole",
        checkpoint_every=5,
        callback=lambda step: drawn.append(step.views),
    )
    assert not whole.interrupted and whole.iterations == 12
    assert len(set(drawn)) > 1 and all(len(views) == 2 for views in drawn)

    partial = optimize(scene, targets, outdir=tmp_path / "part", callback=interrupt_at(6))
    assert partial.interrupted and partial.iterations == 7
    resumed = optimize(scene, targets, outdir=tmp_path / "part", resume=True)
    assert not resumed.interrupted and resumed.iterations == 12

    expected = read_checkpoint(tmp_path / "whole" / CHECKPOINT)
    actual = read_checkpoint(tmp_path / "part" / CHECKPOINT)
    assert actual["iteration"] == expected["iteration"] == 12
    for name, tensor in expected["parameters"].items():
        assert torch.equal(actual["parameters"][name], tensor), name
    for index, moments in expected["adam"]["state"].items():
        for key, value in moments.items():
            ours = actual["adam"]["state"][index][key]
            same = torch.equal(ours, value) if isinstance(value, torch.Tensor) else ours == value
            assert same, (index, key)
    assert torch.equal(actual["generator"], expected["generator"])
    for ours, theirs in zip(actual["history"]["rows"], expected["history"]["rows"]):
        assert {**ours, "seconds": 0} == {**theirs, "seconds": 0}
    assert torch.equal(resumed.images, whole.images)
    assert (tmp_path / "part" / "mesh.obj").read_bytes() == (
        tmp_path / "whole" / "mesh.obj"
    ).read_bytes()
    assert len(resumed.history.frames) == len(whole.history.frames) == 12
    assert resumed.history.frame_iterations == whole.history.frame_iterations == list(range(12))


def test_interrupted_run_leaves_complete_outputs_and_the_command_resumes_it(tmp_path):
    scene, targets = resume_task(tmp_path)
    out = tmp_path / "out"
    result = optimize(scene, targets, outdir=out, callback=interrupt_at(3))
    assert result.interrupted and result.iterations == 4
    names = {p.name for p in out.iterdir()}
    assert names == OUTPUT_FILES | {
        f"{kind}_{i}.png" for kind in ("render", "sheet") for i in range(4)
    }
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert (final["iterations"], final["interrupted"]) == (4, True)
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 4
    assert load_scene(out / "scene.json").meshes[0].mesh.num_faces == 80
    assert read_checkpoint(out / CHECKPOINT)["iteration"] == 4

    resumed = invoke("optimize", tmp_path / "start.json", tmp_path / "targets", "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert (final["iterations"], final["interrupted"]) == (12, False)
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 12


def test_the_command_reports_an_interruption_with_exit_code_130(tmp_path, monkeypatch):
    scene_path = tmp_path / "s.json"
    scene_path.write_text(
        json.dumps({**scene_data(views=1, subdivisions=0), "optimize": {"iterations": 5}})
    )
    iio.imwrite(
        tmp_path / "t.png", (render_scene(load_scene(scene_path))[0, 3] * 255).byte().cpu().numpy()
    )
    real = cli.optimize_scene
    monkeypatch.setattr(
        cli, "optimize_scene", lambda *a, **k: real(*a, **{**k, "callback": interrupt_at(1)})
    )
    result = invoke("optimize", scene_path, tmp_path / "t.png", "-o", tmp_path / "out")
    assert result.exit_code == 130
    assert result.stderr.endswith(
        f"interrupted after 2 of 5 iterations; continue with --resume {tmp_path / 'out'}\n"
    )
    assert (tmp_path / "out" / "metrics.json").exists()


def test_progress_on_a_terminal_is_a_bar_with_loss_and_iou(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    step = Step(
        iteration=4, views=(0,), loss=0.5, terms={}, iou=0.75, psnr=None, lr=0.01, sigma=1e-4,
        seconds=2.0, images=torch.zeros(0),
    )  # fmt: skip
    with cli._progress(10, every=3) as progress:
        progress.start("reference")
        progress(step)
    shown = sys.stderr.getvalue()
    assert shown.startswith("microdr: backend reference: PyTorch autograd, slow\n")
    # Nothing for the status before the first iteration; no speed after one (see test_pictures).
    assert "0/10\r" in shown and "None" not in shown
    assert "5/10  loss 0.5  IoU 0.750\x1b" in shown and "it/s" not in shown


def test_slow_progress_is_in_seconds_per_iteration():
    step = Step(
        iteration=4, views=(0,), loss=0.5, terms={}, iou=None, psnr=None, lr=0.01, sigma=1e-4,
        seconds=200.0, images=torch.zeros(0),
    )  # fmt: skip
    pace = cli._Pace(10)
    for done in range(1, 6):  # the first iteration (compile) is left out: 43 s each after it
        pace.add(done, 100.0 + 43.0 * (done - 1))
    assert cli._status(step, pace) == "loss 0.5  43.0 s/it  ETA 3:35"


def test_ctrl_c_waits_for_the_update_to_finish():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("update")
    assert done == ["update"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- targets --------------------------------------------------------------------------------------


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG of ``(H, W, C)`` uint16 pixels (Pillow writes only 16-bit grayscale)."""
    height, width, planes = pixels.shape
    writer = png.Writer(width, height, bitdepth=16, greyscale=planes < 3, alpha=planes in (2, 4))
    with open(path, "wb") as handle:
        writer.write(handle, pixels.reshape(height, width * planes).tolist())


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_are_read_exactly(tmp_path, channels):
    pixels = np.random.default_rng(0).integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    write_png16(tmp_path / "t.png", pixels)
    image = read_image(tmp_path / "t.png")
    assert image.shape == (channels, 5, 7) and image.dtype == torch.float32
    expected = torch.from_numpy(pixels.astype(np.float32) / 65535).permute(2, 0, 1)
    assert torch.equal(image, expected)


def test_what_a_target_constrains_depends_on_its_channels():
    ones = torch.ones(1, 4, 4)
    targets = Targets.from_images(
        [
            ones,
            torch.cat([ones, ones]),
            ones.expand(3, -1, -1),
            torch.cat([0 * ones.expand(3, -1, -1), ones]),
        ]
    )
    assert targets.has_rgb.tolist() == [False, True, True, False]
    assert targets.has_silhouette.tolist() == [True, True, False, True]
    assert targets.images.shape == (4, 4, 4, 4)
    assert targets.images[0, 3].eq(1).all() and targets.images[1, :3].eq(1).all()
    assert targets.names == ("target 0", "target 1", "target 2", "target 3")


def test_folders_and_patterns_expand_sorted_by_name_with_numbers_by_value(tmp_path, monkeypatch):
    for name in ("v10.png", "v2.png", "v1.png", "notes.txt"):
        (tmp_path / "views" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "views" / name).write_bytes(b"")
    folder = [p.name for p in expand_arguments([str(tmp_path / "views")])]
    assert folder == ["v1.png", "v2.png", "v10.png"]
    monkeypatch.chdir(tmp_path)
    assert [str(p) for p in expand_arguments(["views/v*.png", "views/v1.png"])] == [
        "views/v1.png", "views/v2.png", "views/v10.png", "views/v1.png",
    ]  # fmt: skip


def test_resize_resamples_targets_of_another_size(tmp_path):
    scene_path = tmp_path / "s.json"
    scene_path.write_text(
        json.dumps({**scene_data(views=1, subdivisions=0), "optimize": {"iterations": 1}})
    )
    iio.imwrite(tmp_path / "t.png", np.full((64, 48), 255, dtype=np.uint8))
    result = invoke("optimize", scene_path, tmp_path / "t.png", "-o", tmp_path / "out", "--resize")
    assert result.exit_code == 0, result.output
    sheet = iio.imread(tmp_path / "out" / "sheet_0.png")
    # Four panels of 32 x 32 enlarged 8 times, under a line of labels; the target is all white.
    label_line = sheet.shape[0] - 256 - 2 * FRAME
    assert sheet.shape[1:] == (4 * (256 + FRAME) + FRAME, 3) and label_line > 10
    target = sheet[FRAME + label_line : FRAME + label_line + 256, FRAME : FRAME + 256]
    assert (target == 255).all() and not (sheet[:, : FRAME + 257] == 255).all()


# --- one-line errors: exit code 2, nothing written ------------------------------------------------

SCENE = {**scene_data(views=2, subdivisions=0), "optimize": {"iterations": 2}}


def silhouette_png(path: Path, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.full(size[::-1], 255, dtype=np.uint8))


def truncated_png(path: Path) -> None:
    silhouette_png(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


GOOD = ["t/0.png", "t/1.png"]  # two silhouettes that every case makes
COUNTS = "TARGET: expected one image per camera, in the scene's order; cameras: 2, images: "


def case(message, targets=GOOD, flags=(), files=None, scene=None):
    """A bad-input case: the expected message's start ("{tmp}" is the test's folder), the target
    arguments, extra flags, files to make (path -> maker) and the scene (default SCENE)."""
    return scene or SCENE, files or {}, targets, list(flags), message


BAD_TARGETS = {
    "too few": case(COUNTS + "1", ["t/0.png"]),
    "too many": case(COUNTS + "3", ["t"], files={"t/2.png": silhouette_png}),
    "size": case(
        "{tmp}/t/1.png: image is 16 x 24 but the scene renders 32 x 32 (give --resize to resample)",
        files={"t/1.png": lambda path: silhouette_png(path, (16, 24))},
    ),
    "missing": case("{tmp}/t/9.png: no such file", ["t/0.png", "t/9.png"]),
    "truncated": case(
        "{tmp}/t/1.png: not a readable image (ChunkError: Chunk b'IDAT' too short for ",
        files={"t/1.png": truncated_png},
    ),
    "not a png": case(
        "{tmp}/t/1.png: not a PNG file (it does not start with the PNG signature)",
        files={"t/1.png": lambda path: path.write_text("hello")},
    ),
    "not an image": case(
        "{tmp}/t/1.jpg: not an image format microDR reads (PNG, JPEG, BMP, TIFF, GIF, WebP)",
        ["t/0.png", "t/1.jpg"],
        files={"t/1.jpg": lambda path: path.write_text("hello")},
    ),
    "empty folder": case(
        "{tmp}/empty: a folder with no image files (.png, ",
        ["empty"],
        files={"empty/notes.txt": lambda path: path.write_text("")},
    ),
    "no match": case("{tmp}/x*.png: no file matches this pattern", ["{tmp}/x*.png"]),
    "colors without color": case(
        'TARGET: "colors" is a free parameter but no target has color',
        flags=["--params", "vertices,colors"],
    ),
    "bad params": case(
        '--params: [1]: expected one of "vertices", "translation", "scale", "colors", "light", '
        '"camera", "texture", got "verts"',
        flags=["--params", "vertices,verts"],
    ),
    "iterations": case(
        "--iterations: expected an integer in [1, 10000000], got 0", flags=["--iterations", "0"]
    ),
    "output holds the scene": case(
        "{tmp}: refusing to write into it: it holds {tmp}/s.json, the scene file",
        flags=["-o", "{tmp}"],
    ),
    "output holds a target": case(
        "{tmp}/t: refusing to write into it: it holds {tmp}/t/0.png, a target",
        flags=["-o", "{tmp}/t"],
    ),
    "bounded outside the box": case(
        "{tmp}/s.json: meshes[0]: vertex 0 is at (-1, -1, -1) in the world, outside the open box "
        '(-1, 1)^3 that vertex_parametrization "bounded" needs (scale the mesh down with '
        "transform.scale)",
        scene={
            **SCENE,
            "meshes": [{"primitive": "cube"}],
            "optimize": {"vertex_parametrization": "bounded"},
        },
    ),
    "light without lights": case(
        '{tmp}/s.json: "light" is a free parameter but there is no "lights" section',
        flags=["--params", "light"],
    ),
    "resume and -o": case(
        "-o: a resumed run writes into the folder it resumes: leave -o out",
        flags=["--resume", "{tmp}/a", "-o", "{tmp}/b"],
    ),
    "resume without checkpoint": case(
        "{tmp}/none/checkpoint.pt: no such file", flags=["--resume", "{tmp}/none"]
    ),
}


def make_targets_case(tmp_path: Path, name: str) -> tuple[list[str], str]:
    scene, makers, arguments, flags, message = BAD_TARGETS[name]
    (tmp_path / "s.json").write_text(json.dumps(scene))
    for index in range(2):
        silhouette_png(tmp_path / "t" / f"{index}.png")
    for relative, make in makers.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        make(tmp_path / relative)

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path))

    # Relative targets are given from the test's folder, as the messages show them absolute.
    args = ["optimize", str(tmp_path / "s.json")]
    args += [fill(a) if "{tmp}" in a else str(tmp_path / a) for a in arguments]
    args += [fill(flag) for flag in flags]
    return args, fill(message)


# imageio, failing to read the ".jpg" that is no image, warns while it tries its legacy plugins.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:imageio")
@pytest.mark.filterwarnings("ignore:The legacy `DICOM` plugin:DeprecationWarning")
@pytest.mark.parametrize("name", BAD_TARGETS)
def test_bad_input_is_one_line_exit_code_2_and_writes_nothing(tmp_path, monkeypatch, name):
    args, message = make_targets_case(tmp_path, name)
    monkeypatch.chdir(tmp_path)  # the default output folder would be here
    before = files_under(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""
    assert files_under(tmp_path) == before


def checkpointed_run(tmp_path: Path) -> tuple[list[str], Path]:
    """A finished 2-iteration run in ``tmp/out``; the arguments that resume it."""
    args, _ = make_targets_case(tmp_path, "too few")
    args = args[:2] + [str(tmp_path / "t" / "0.png"), str(tmp_path / "t" / "1.png")]
    out = tmp_path / "out"
    assert invoke(*args, "-o", out).exit_code == 0
    return [*args, "--resume", str(out)], out / CHECKPOINT


def resealed(payload: bytes) -> bytes:
    """A checkpoint file of ``payload`` under a checksum that matches it."""
    digest = hashlib.sha256(payload).hexdigest().encode()
    return b"microdr-checkpoint 1\n" + digest + b"\n" + payload


CHECKSUM = "corrupt checkpoint (truncated or changed: its checksum does not match)"
CORRUPTIONS = {
    "truncated": (lambda data: data[:-100], CHECKSUM),
    "only the header": (lambda data: data[: data.index(b"\n") + 1], CHECKSUM),
    "flipped byte": (lambda data: data[:-50] + bytes([data[-50] ^ 1]) + data[-49:], CHECKSUM),
    "not a checkpoint": (lambda data: b"PK\x03\x04" + data, "not a microDR checkpoint"),
    "newer format": (
        lambda data: data.replace(b"checkpoint 1\n", b"checkpoint 7\n", 1),
        "checkpoint format 7, this microDR reads format 1",
    ),
    "empty": (lambda data: b"", "not a microDR checkpoint"),
    "unreadable payload": (
        lambda data: resealed(b"not a pickle"),
        "not a readable checkpoint (UnpicklingError in its payload)",
    ),
    "other contents": (
        lambda data: encode_checkpoint({"weights": torch.zeros(3)}),
        "holds no state of a microdr optimize run",
    ),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_checkpoint_is_one_line_on_resume(tmp_path, name):
    args, checkpoint = checkpointed_run(tmp_path)
    corrupt, message = CORRUPTIONS[name]
    checkpoint.write_bytes(corrupt(checkpoint.read_bytes()))
    before = files_under(tmp_path)
    result = invoke(*args)
    assert (result.exit_code, result.stderr) == (2, f"{checkpoint}: {message}\n")
    assert files_under(tmp_path) == before


def test_resume_with_other_options_is_refused(tmp_path):
    args, checkpoint = checkpointed_run(tmp_path)
    result = invoke(*args, "--seed", 3)
    assert result.exit_code == 2
    assert result.stderr == (
        f"{checkpoint}: made by another run (seed 0, not 3); resume with the same scene, "
        "targets, options\n"
    )


# --- pieces ---------------------------------------------------------------------------------------


def test_topology_of_a_closed_mesh_has_a_hinge_per_edge():
    mesh = icosphere(1)
    topology = MeshTopology.of(mesh.faces, mesh.num_vertices)
    assert topology.edges.shape == (120, 2) and topology.hinges.shape == (120, 4)
    assert set(topology.degree.tolist()) == {5, 6}
    # Each hinge: the two faces on the edge, with their third vertices.
    faces = {frozenset(face) for face in mesh.faces.tolist()}
    for a, b, c, d in topology.hinges.tolist():
        assert {frozenset((a, b, c)), frozenset((a, b, d))} <= faces and c != d


def test_regularizers():
    square = plane()  # two coplanar triangles: one hinge, flat
    topology = MeshTopology.of(square.faces, square.num_vertices)
    assert topology.hinges.shape == (1, 4)
    assert flatten_loss(square.vertices, topology).item() == pytest.approx(0, abs=1e-9)
    folded = square.vertices.clone()
    folded[topology.hinges[0, 2], 1] = 1.0  # lift one outer corner: the faces bend
    assert flatten_loss(folded, topology).item() > 0.01
    # A right angle between the faces: cos = 0, loss 1.
    right = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, 0, 1]])
    hinge = MeshTopology.of(torch.tensor([[0, 1, 2], [1, 0, 3]]), 4)
    assert flatten_loss(right, hinge).item() == pytest.approx(1.0, abs=1e-5)
    # Laplacian: the four corners of a square each miss their neighbours' mean by half a diagonal.
    assert laplacian_loss(square.vertices, topology).item() > 0
    sphere = icosphere(2)
    sphere_topology = MeshTopology.of(sphere.faces, sphere.num_vertices)
    assert laplacian_loss(sphere.vertices, sphere_topology) < laplacian_loss(
        sphere.vertices * torch.tensor([1.0, 3.0, 1.0]), sphere_topology
    )
    # Edge length: the unit square's 4 sides (1) and diagonal (2).
    assert edge_length_loss(square.vertices / 2, topology).item() == pytest.approx(6 / 5)


def test_metrics():
    alpha = torch.zeros(2, 4, 4)
    alpha[0, :2] = 1  # 8 pixels
    target = torch.zeros(2, 4, 4)
    target[0, 1:3] = 0.9  # 8 pixels, 4 shared
    assert silhouette_iou(alpha, target).tolist() == pytest.approx([4 / 12, 1.0])
    loss = silhouette_iou_loss(alpha, target)
    assert loss[0].item() == pytest.approx(1 - 3.6 / (8 + 7.2 - 3.6), rel=1e-6)
    assert loss[1].item() == 0
    rgb = torch.full((1, 3, 2, 2), 0.5)
    assert psnr(rgb, rgb + 0.1).item() == pytest.approx(20, abs=1e-4)
    assert psnr(rgb, rgb).item() == 100


def test_sigma_schedule_is_geometric_from_start_to_end():
    scene = parse(scene_data())
    settings = OptimizeSettings(iterations=3, sigma_schedule=(1e-3, 1e-5))
    assert [sigma_at(settings, scene, i) for i in range(4)] == pytest.approx(
        [1e-3, 1e-4, 1e-5, 1e-5]
    )
    assert sigma_at(OptimizeSettings(), scene, 7) == 1e-4


def test_output_json_keeps_number_arrays_on_one_line():
    data = {"a": [1, 2], "b": [[0.5, 1], [2, 3]], "c": {"d": "x"}, "e": {}}
    text = _dumps(data)
    assert text.splitlines() == [
        "{", '  "a": [1, 2],', '  "b": [', "    [0.5, 1],", "    [2, 3]", "  ],", '  "c": {',
        '    "d": "x"', "  },", '  "e": {}', "}",
    ]  # fmt: skip
    assert json.loads(text) == data


@pytest.mark.parametrize("task", ["colors", "ellipsoid"])
def test_bundled_tasks_run(task):
    """The bundled tasks, shrunk to 24 pixels and 2 cameras: the loss falls in a few steps."""
    scene, truth = (
        shrink(load_scene(REPO / "scenes" / "tasks" / f"{name}.json"), 24)
        for name in (task, f"{task}_truth")
    )
    assert scene.cameras == truth.cameras and scene.render == truth.render
    scene, truth = (replace(s, cameras=s.cameras[:2]) for s in (scene, truth))
    targets = Targets.from_images(render_scene(truth))
    # The ellipsoid's truth is black on black: its RGBA renders are silhouettes only.
    assert targets.has_rgb.tolist() == [task == "colors"] * 2
    result = optimize(scene, targets, replace(scene.optimize, iterations=5))
    losses = [row["loss"] for row in result.history.rows]
    assert losses[-1] < losses[0]
