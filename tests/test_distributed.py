"""``microdr optimize`` on several processes (torch.distributed, ``gloo`` on loopback): the same
bits as one process, checkpoints that resume under any number of ranks, a lost rank ending the
run cleanly, and one line for bad launch settings. Each run is a real process (``--workers``
starts the others)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
import torch.distributed as dist

from microdr.optimize.distributed import Ranks
from microdr.render import render_scene
from microdr.io.scene import parse_scene

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def cameras(count: int) -> list[dict]:
    return [
        {"orbit": {"distance": 3, "elevation": 30 * (-1) ** i, "azimuth": 360 * i / count}}
        for i in range(count)
    ]


def task(folder: Path, **optimize) -> tuple[Path, Path]:
    """A 32 x 32 lit icosphere to fit to a stretched orange one seen by 6 cameras; every kind of
    free parameter (each has its own path through the per-view gradients), 5 views per
    iteration (ranks get 2 and 3), remeshing: ``scene.json`` and ``targets/``."""
    lights = {"ambient": 0.4, "directional": [{"direction": [1, 1, 1], "intensity": 0.6}]}
    base = {
        "image": {"width": 32, "height": 32},
        "render": {"sigma": 1e-4},
        "cameras": cameras(6),
        "lights": lights,
    }
    truth = {
        **base,
        "meshes": [{"primitive": "icosphere", "subdivisions": 1, "color": [0.9, 0.4, 0.2],
                    "transform": {"scale": [0.9, 0.6, 0.8]}}],
    }  # fmt: skip
    start = {
        **base,
        "meshes": [{"primitive": "icosphere", "subdivisions": 1, "transform": {"scale": 0.7}}],
        "optimize": {
            "parameters": ["vertices", "colors", "scale", "translation", "light", "camera"],
            "iterations": 10,
            "lr": 0.01,
            "sigma_schedule": {"start": 1e-4, "end": 1e-4},
            "views_per_step": 5,
            "remesh": {"edge_length": [0.3, 0.25], "every": 4, "until": 1.0},
        },
    }
    start["optimize"] = {**start["optimize"], **optimize}
    start["optimize"] = {k: v for k, v in start["optimize"].items() if v is not None}
    (folder / "targets").mkdir(parents=True)
    for i, image in enumerate(render_scene(parse_scene(truth, "truth.json", folder)).cpu()):
        rgba = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        iio.imwrite(folder / "targets" / f"view_{i}.png", rgba)
    (folder / "scene.json").write_text(json.dumps(start))
    return folder / "scene.json", folder / "targets"


def microdr(*args, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "microdr", *map(str, args)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO, timeout=timeout,
    )  # fmt: skip


def final(outdir: Path) -> dict:
    """metrics.json's ``final`` without what differs between runs of any rank count: times."""
    data = json.loads((outdir / "metrics.json").read_text())["final"]
    for key in ("seconds", "world_size", "rank_seconds"):
        data.pop(key)
    return data


def rows(outdir: Path) -> list[str]:
    """metrics.csv without its last column, the seconds."""
    return [line.rsplit(",", 1)[0] for line in (outdir / "metrics.csv").read_text().splitlines()]


def assert_same_run(ours: Path, theirs: Path) -> None:
    for name in ("mesh.obj", "scene.json"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    assert final(ours) == final(theirs)
    assert rows(ours) == rows(theirs)


def test_share_splits_views_in_order_contiguously():
    shares = [Ranks(rank, 3).share(8) for rank in range(3)]
    assert [list(range(8))[s] for s in shares] == [[0, 1], [2, 3, 4], [5, 6, 7]]


def test_two_processes_give_the_bits_of_one(tmp_path):
    scene, targets = task(tmp_path)
    one = microdr("optimize", scene, targets, "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = microdr("optimize", scene, targets, "-o", tmp_path / "two", "--workers", 2)
    assert two.returncode == 0, two.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())["final"]
    assert metrics["world_size"] == 2 and len(metrics["rank_seconds"]) == 2
    assert all(seconds > 0 for seconds in metrics["rank_seconds"])
    # Rank 0 alone shows the progress and writes.
    assert two.stdout.count("wrote") == 1
    assert two.stderr.count("iteration 10/10") == 1


def test_a_checkpoint_resumes_under_another_number_of_ranks(tmp_path):
    scene, targets = task(tmp_path)
    whole = microdr("optimize", scene, targets, "-o", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    outdir = tmp_path / "parts"
    # 2 ranks, then 1, then 2 again (remeshing after 4 and 8 iterations, as the whole run).
    first = microdr("optimize", scene, targets, "-o", outdir, "--iterations", 5, "--workers", 2)
    assert first.returncode == 0, first.stderr
    for iterations, workers in ((7, 1), (10, 2)):
        part = microdr("optimize", scene, targets, "--resume", outdir, "--iterations", iterations,
                       "--workers", workers)  # fmt: skip
        assert part.returncode == 0, part.stderr
    assert_same_run(outdir, tmp_path / "whole")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def start_long_run(tmp_path: Path, *flags) -> tuple[subprocess.Popen, Path, int]:
    """A 2-rank run of many iterations, once it has written its first checkpoint: the process
    (rank 0), its outdir and rank 1's pid."""
    scene, targets = task(tmp_path, iterations=2000, remesh=None)
    outdir = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "microdr", "optimize", str(scene), str(targets), "-o", str(outdir),
         "--workers", "2", "--checkpoint-every", "5", *map(str, flags)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (outdir / "checkpoint.pt").exists():
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    (rank_1,) = children(run.pid)
    return run, outdir, rank_1


@pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks' processes in /proc")
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_rank_ends_the_run_at_its_last_good_iteration(tmp_path, how):
    """SIGKILL ends rank 1 (its connections close); SIGSTOP leaves it silent (--timeout)."""
    run, outdir, rank_1 = start_long_run(tmp_path, "--timeout", 5)
    os.kill(rank_1, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    lost = time.monotonic()
    try:
        stdout, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
        if how == "stopped":
            with_rank_1 = Path(f"/proc/{rank_1}").exists()
    assert time.monotonic() - lost < 60
    assert run.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith(("microdr:", "iter"))]
    assert len(lines) == 1 and "another rank ended or stopped answering" in lines[0], stderr
    assert f"{outdir} holds the last good state" in lines[0]
    metrics = json.loads((outdir / "metrics.json").read_text())["final"]
    assert 5 <= metrics["iterations"] < 2000
    assert "another rank" in metrics["stopped"]
    assert (outdir / "mesh.obj").exists()
    if how == "stopped":
        assert not with_rank_1  # killed, not left behind


def test_more_ranks_than_views_is_one_line_and_exit_code_2(tmp_path):
    scene, targets = task(tmp_path)
    result = microdr("optimize", scene, targets, "-o", tmp_path / "out", "--workers", 6)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "--workers: 6 ranks for 5 views per iteration: each rank renders whole views, so at "
        "most 5 processes can share them"
    ]
    assert not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "1"}, "environment: WORLD_SIZE is set but MASTER_ADDR, "
         "MASTER_PORT not: launch with torchrun (or with --workers N), which sets them all"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "port"},
         "environment: MASTER_PORT: expected a whole number, got 'port'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}"},
         "environment: no rendezvous of 2 ranks at 127.0.0.1:{port} within 2 s"),
    ],
)  # fmt: skip
def test_bad_launch_settings_are_one_line_and_exit_code_2(tmp_path, env, message):
    scene, targets = task(tmp_path)
    port = str(free_port())
    env = {key: value.replace("{port}", port) for key, value in env.items()}
    started = time.monotonic()
    result = microdr("optimize", scene, targets, "-o", tmp_path / "out", "--timeout", 2, **env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[W")]
    assert len(lines) == 1 and lines[0].startswith(message.replace("{port}", port)), result.stderr
    assert time.monotonic() - started < 60


def test_workers_under_torchrun_is_refused(tmp_path):
    scene, targets = task(tmp_path)
    result = microdr("optimize", scene, targets, "--workers", 2, WORLD_SIZE="2")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "--workers: this process is already one of several (WORLD_SIZE is set, as torchrun "
        "sets it): leave --workers out"
    ]


def test_chain_length_counts_the_numbers_a_rank_passes_on():
    """The README's bytes per hop come from chain_length: it must be the real buffer's length."""
    from microdr.io.scene import load_scene
    from microdr.io.targets import read_targets
    from microdr.optimize import Optimization
    from microdr.optimize.distributed import chain_length
    from microdr.optimize.loop import _Pieces

    scene = load_scene(REPO / "scenes" / "tasks" / "shape_color.json")
    targets = read_targets([str(REPO / "scenes" / "tasks" / "shape_color_targets")], len(scene.cameras),
                           (scene.render.width, scene.render.height))
    run = Optimization(scene, targets)
    views = torch.arange(len(scene.cameras))
    pieces = _Pieces(run, run.parameters.vertices(), views, views, scene.render.sigma)
    faces = run.parameters.start.faces.shape[0]
    assert pieces.buffer.numel() == chain_length(faces, 3, 0, len(views), len(pieces.image_terms))
