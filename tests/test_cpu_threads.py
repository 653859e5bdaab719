"""The CPU kernels' threads against torch's spinning OpenMP workers, whatever the import order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microdr.raster import cpu

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_spinning_workers_leave_the_cores_to_the_kernels(monkeypatch, two_threads):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cpu.torch_workers_spin()
    with cpu.kernels_own_the_cores():
        assert torch.get_num_threads() == 1
        assert cpu._launch_threads() == 2
        with cpu.kernels_own_the_cores():  # nested: the outer count holds
            assert cpu._launch_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    assert cpu._launch_threads() == 2


def test_passive_workers_keep_torch_threads(monkeypatch, two_threads):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert not cpu.torch_workers_spin()
    with cpu.kernels_own_the_cores():
        assert torch.get_num_threads() == 2
        assert cpu._launch_threads() == 2
    assert torch.get_num_threads() == 2


def _child(code: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, check=True
    )


RENDER_TWICE = """
import torch
torch.set_num_threads(2)
from microdr.raster import SoftRasSettings, rasterize
verts = torch.tensor([[[[-0.8, -0.6, 2.0], [0.8, -0.6, 2.0], [0.0, 0.7, 2.5]]]])
for _ in range(2):
    rasterize(verts, torch.ones(1, 1, 3, 3), 16, 16, SoftRasSettings(sigma=1e-4), backend="cpu")
"""


def test_a_launch_with_spinning_workers_warns_once_what_to_do():
    result = _child(RENDER_TWICE)
    assert result.stderr.count("import microdr before torch, or set OMP_WAIT_POLICY=PASSIVE") == 1


def test_no_warning_when_microdr_comes_first():
    result = _child("import microdr\n" + RENDER_TWICE)
    assert "OMP_WAIT_POLICY" not in result.stderr
