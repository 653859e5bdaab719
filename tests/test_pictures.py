"""What a person looks at: the loss plot, the comparison sheets, the progress animation, the
progress bar and ``render --alpha``; and the layering of the modules that write them."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from microdr import cli

from microdr.optimize.drawing import (
    FRAME,
    FRAME_COLOR,
    MARGINS,
    PLOT_SIZE,
    SERIES_COLORS,
    labeled_grid,
    nice_ticks,
)
from microdr.io.images import to_uint8
from microdr.optimize.loop import Optimization
from microdr.optimize.outputs import GIF_SIDE, MAX_GAIN, _animation_frames, _gain, _loss_plot
from microdr.render import render_scene
from microdr.optimize.result import History, Step
from microdr.io.scene import load_scene, parse_scene
from microdr.io.targets import Targets

REPO = Path(__file__).resolve().parents[1]


# --- loss.png ----------------------------------------------------------------------------------


def _rows(count: int, *, iou: bool, terms: bool = True) -> list[dict]:
    """``count`` rows of metrics.csv: the loss falls from 1 to 1e-3 (three decades)."""
    rows = []
    for i in range(count):
        loss = 10 ** (-3 * i / max(count - 1, 1))
        row = {"iteration": i, "loss": loss, **({"rgb_l2": loss / 2} if terms else {})}
        row.update(iou=0.5 + i / (2 * count) if iou else None, psnr=10 + i / 10)
        row.update(lr=0.01, sigma=1e-4, seconds=0.01 * i)
        rows.append(row)
    return rows


def _plot(rows: list[dict]) -> np.ndarray:
    return iio.imread(_loss_plot(History(rows=rows)))[..., :3]


def _has_color(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return (image == np.array(color, dtype=np.uint8)).all(axis=-1)


def _panel_width() -> int:
    return MARGINS[0] + PLOT_SIZE[0] + MARGINS[2]


def test_loss_plot_has_a_panel_per_quantity_the_run_has():
    """An RGB-only run has no IoU: no empty IoU axis, only loss and PSNR."""
    rgb_only = _plot(_rows(50, iou=False))
    both = _plot(_rows(50, iou=True))
    assert rgb_only.shape[1] == 2 * _panel_width()
    assert both.shape[1] == 3 * _panel_width()
    assert rgb_only.shape[0] == both.shape[0] > MARGINS[1] + PLOT_SIZE[1] + MARGINS[3]


def test_loss_plot_draws_each_series_in_its_color_with_a_legend():
    with_term, without = _plot(_rows(50, iou=False)), _plot(_rows(50, iou=False, terms=False))
    loss_color, term_color = SERIES_COLORS[:2]
    top, left = MARGINS[1], MARGINS[0]
    plot_area = np.s_[top : top + PLOT_SIZE[1], left : left + PLOT_SIZE[0]]
    # Each curve crosses the plot area: its color in most columns.
    columns = _has_color(with_term[plot_area], term_color).any(axis=0)
    assert columns.mean() > 0.9
    assert _has_color(with_term[plot_area], loss_color).any(axis=0).mean() > 0.9
    assert not _has_color(without, term_color).any()
    # A legend below the plot (two series), with the term's color in it; none for one series.
    below = np.s_[MARGINS[1] + PLOT_SIZE[1] + MARGINS[3] :, : _panel_width()]
    assert _has_color(with_term[below], term_color).any()
    assert without.shape[0] < with_term.shape[0]


def test_loss_plot_has_tick_labels_on_a_log_axis_when_the_loss_spans_decades():
    image = _plot(_rows(50, iou=False))
    # Dark text left of the plot area (the tick labels) at five heights: 1 down to 1e-4 (the
    # term, half the loss, ends at 5e-4).
    labels = (image[MARGINS[1] - 8 : MARGINS[1] + PLOT_SIZE[1] + 8, : MARGINS[0] - 4] < 100).all(-1)
    rows = np.flatnonzero(labels.any(axis=1))
    groups = np.split(rows, np.flatnonzero(np.diff(rows) > 2) + 1)
    assert len(groups) == 5
    # Evenly spaced: a log scale (the loss falls geometrically).
    centers = [group.mean() for group in groups]
    assert np.ptp(np.diff(centers)) <= 2
    assert nice_ticks(1e-3, 1.0, log=True) == [1e-3, 1e-2, 1e-1, 1.0]


def test_nice_ticks():
    assert nice_ticks(0.0, 0.93, log=False) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3.0, 197.0, log=False) == [0.0, 50.0, 100.0, 150.0, 200.0]
    assert nice_ticks(0.03, 0.4, log=True) == [0.02, 0.05, 0.1, 0.2, 0.5]


def test_loss_plot_of_one_iteration_and_of_none():
    one = _plot(_rows(1, iou=True))
    assert _has_color(one, SERIES_COLORS[0]).sum() >= 9  # a dot, not an invisible line
    assert _plot([]).shape[1] == _panel_width()


# --- the progress of microdr optimize ----------------------------------------------------------


def test_speed_and_time_left_leave_out_the_first_iteration():
    pace = cli._Pace(total=100)
    pace.add(1, 30.0)  # the first iteration compiled kernels for 30 s
    for done, now in ((2, 30.1), (3, 30.2)):
        pace.add(done, now)
        assert pace.speed() is None and pace.seconds_left() is None
    pace.add(4, 30.3)
    assert pace.speed() == pytest.approx(10.0)
    assert pace.seconds_left() == pytest.approx(9.6)
    step = Step(
        iteration=3, views=(0,), loss=0.5, terms={}, iou=None, psnr=20.0, lr=0.01, sigma=1e-4,
        seconds=30.3, images=torch.zeros(0),
    )  # fmt: skip
    assert cli._status(step, pace) == "loss 0.5  PSNR 20.0 dB  10.0 it/s  ETA 0:10"
    # Later, only the last WINDOW iterations count: the speed follows a change.
    for done in range(5, 5 + cli._Pace.WINDOW):
        pace.add(done, 30.3 + (done - 4) * 1.0)
    assert pace.speed() == pytest.approx(1.0)
    assert cli._status(step, pace).endswith("1.0 it/s  ETA 1:16")  # 76 left


# --- render --alpha ----------------------------------------------------------------------------


def _inside(mask: np.ndarray, margin: int) -> np.ndarray:
    """The pixels of ``mask`` (H, W) that are ``margin`` pixels or more from its outside."""
    inside = mask.copy()
    for _ in range(margin):
        inside[1:] &= inside[:-1].copy()
        inside[:-1] &= inside[1:].copy()
        inside[:, 1:] &= inside[:, :-1].copy()
        inside[:, :-1] &= inside[:, 1:].copy()
    return inside


def test_render_alpha_is_opaque_inside_the_icosphere(tmp_path):
    """The soft silhouette is 0.94-1 inside (the faces' edges show); the picture's alpha is 1,
    and outside the outline it is the soft silhouette."""
    scene = REPO / "scenes" / "icosphere.json"
    arguments = ["render", str(scene), "-o", str(tmp_path / "a.png"), "--alpha", "--backend", "cpu"]
    result = CliRunner().invoke(cli.app, arguments)
    assert result.exit_code == 0, result.output
    soft = render_scene(load_scene(scene), backend="cpu")[:, 3].numpy()
    for view in range(2):
        alpha = iio.imread(tmp_path / f"a_{view}.png")[..., 3]
        inside = _inside(soft[view] >= 0.5, margin=3)
        assert inside.sum() > 20_000
        assert (soft[view][inside] < 0.99).sum() > 1000  # what the picture showed before
        assert (alpha[inside] == 255).all()
        outside = soft[view] < 0.5
        expected = np.round(soft[view][outside] * 255)
        assert np.abs(alpha[outside] - expected).max() <= 1
        assert ((alpha > 0) & (alpha < 128)).sum() > 200  # a soft edge


# --- the comparison sheets ---------------------------------------------------------------------


def test_labeled_grid_enlarges_small_images_frames_and_labels_them():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 16, 3), dtype=np.uint8)
    labels = ["target", "start", "result"]
    sheet = labeled_grid(images, labels, columns=3)
    factor = 8  # the longer side, 32, to 256
    line = sheet.shape[0] - factor * 32 - 2 * FRAME
    assert line > 10
    cell = (sheet.shape[1] - FRAME) // 3 - FRAME
    assert sheet.shape[1] == 3 * (cell + FRAME) + FRAME and cell >= factor * 16
    for index, image in enumerate(images):
        left = FRAME + index * (cell + FRAME) + (cell - factor * 16) // 2
        panel = sheet[FRAME + line : FRAME + line + factor * 32, left : left + factor * 16]
        np.testing.assert_array_equal(panel, image.repeat(factor, 0).repeat(factor, 1))
    # A frame of a color far from black and from white around and between the panels.
    assert min(FRAME_COLOR) >= 100 and max(FRAME_COLOR) <= 155
    between = sheet[:, FRAME + cell : 2 * FRAME + cell]
    assert (between == np.array(FRAME_COLOR, dtype=np.uint8)).all()
    # Dark text in each label band; none without labels.
    bands = sheet[FRAME : FRAME + line]
    assert (bands < 60).all(-1).sum() > 3 * 40
    unlabeled = labeled_grid(images, ["", "", ""], columns=3)
    assert not (unlabeled[FRAME : FRAME + line] < 60).all(-1).any()


def test_difference_gain_is_a_power_of_two_that_a_few_outliers_do_not_decide():
    assert _gain(torch.full((3, 8, 8), 16 / 255)) == 8  # 128/255, as near white as 2^k gets
    difference = torch.full((1000,), 0.01)
    difference[0] = 1.0
    assert _gain(difference) == 64
    assert _gain(torch.zeros(10)) == 1 and _gain(torch.full((4,), 1e-6)) == 1
    assert _gain(torch.full((4,), 0.9 / 255)) == MAX_GAIN


# --- the progress animation --------------------------------------------------------------------


def test_animation_shows_four_views_with_the_iteration_of_each_frame():
    """Six cameras, two drawn per iteration: every frame still shows cameras 0-3 as the
    parameters of its iteration render them, under their targets, titled with the iteration."""
    data = {
        "image": {"width": 16, "height": 16},
        "render": {"sigma": 1e-4},
        "meshes": [{"primitive": "icosphere", "subdivisions": 1, "color": [0.2, 0.5, 0.8]}],
        "cameras": [{"orbit": {"distance": 3, "azimuth": 60 * i}} for i in range(6)],
        "optimize": {"parameters": ["colors"], "iterations": 3, "lr": 0.3, "views_per_step": 2},
    }
    scene = parse_scene(data, "scene.json", Path("."))
    truth = parse_scene({**data, "meshes": [{**data["meshes"][0], "color": [0.9, 0.3, 0.1]}]},
                        "truth.json", Path("."))  # fmt: skip
    targets = Targets.from_images(render_scene(truth, backend="cpu"))
    run = Optimization(scene, targets, backend="cpu")
    steps = list(run.steps())
    assert any(step.views[:2] != (0, 1) for step in steps)  # some frames had to be rendered
    result = run.result()
    assert result.history.frame_iterations == [0, 1, 2]
    frames = _animation_frames(result, targets)
    assert len(frames) == 4
    factor = GIF_SIDE // 16
    cell = (frames.shape[2] - FRAME) // 4 - FRAME
    line = (frames.shape[1] - 2 * factor * 16 - 3 * FRAME) // 3  # title, two rows of labels
    assert frames.shape[2] == 4 * (cell + FRAME) + FRAME and cell == factor * 16

    def panel(frame: np.ndarray, row: int, view: int) -> np.ndarray:
        upper = line + FRAME + row * (line + factor * 16 + FRAME) + line
        left = FRAME + view * (cell + FRAME)
        return frame[upper : upper + factor * 16 : factor, left : left + factor * 16 : factor]

    # Frame 0 is the start (the same sigma as the result's start images), the last the result.
    rgb = np.s_[..., :3]
    for view in range(4):
        start, final = to_uint8(result.start_images[view])[rgb], to_uint8(result.images[view])[rgb]
        np.testing.assert_array_equal(panel(frames[0], 1, view), start)
        np.testing.assert_array_equal(panel(frames[-1], 1, view), final)
        target = to_uint8(targets.images[view])[rgb]
        np.testing.assert_array_equal(panel(frames[1], 0, view), target)
    # Each frame's title says its iteration: the title lines differ, and hold text.
    titles = frames[:, :line]
    assert all((title < 60).all(-1).sum() > 50 for title in titles)
    assert len({title.tobytes() for title in titles}) == 4
