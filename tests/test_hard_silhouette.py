"""The hard silhouette (exact coverage of pixel centers, the metric's ``iou``) against an
independent rasterizer: numpy, its own look-at camera and edge functions, nothing of microdr's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microdr.render import hard_silhouettes
from microdr.io.scene import Camera, RenderSettings

from helpers import numpy_hard_silhouettes


def random_case(seed: int):
    """Random triangles (some large, some thin) around the origin and cameras around them."""
    rng = np.random.default_rng(seed)
    faces = rng.integers(5, 60)
    centers = rng.uniform(-0.6, 0.6, (faces, 1, 3))
    corners = centers + rng.normal(0, rng.uniform(0.05, 0.4), (faces, 3, 3))
    cameras = []
    for _ in range(3):
        direction = rng.normal(size=3)
        eye = tuple((3 * direction / np.linalg.norm(direction)).tolist())
        cameras.append(Camera("perspective", eye, (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), 40.0, None, 0.1, 100.0))
    width, height = int(rng.integers(16, 48)), int(rng.integers(16, 48))
    return corners, cameras, width, height


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("seed", range(6))
def test_hard_silhouettes_match_an_independent_rasterizer(backend, seed):
    corners, cameras, width, height = random_case(seed)
    render = RenderSettings(width=width, height=height)
    got = hard_silhouettes(torch.tensor(corners, dtype=torch.float64), cameras, render, backend=backend)
    want = numpy_hard_silhouettes(corners, cameras, width, height)
    assert want.any() and not want.all()
    assert np.array_equal(got.numpy(), want)


def test_hard_silhouette_is_thinner_than_the_soft_one():
    """The soft render's alpha > 1/2 spreads past the outline; the hard one does not."""
    from microdr.render import render_faces

    corners, cameras, width, height = random_case(0)
    render = RenderSettings(width=width, height=height, sigma=1e-3)
    corners = torch.tensor(corners, dtype=torch.float32)
    soft = render_faces(corners, torch.zeros_like(corners), cameras, render, None, colors=False)[:, 3] > 0.5
    hard = hard_silhouettes(corners, cameras, render)
    assert (hard & ~soft).sum() == 0 and (soft & ~hard).sum() > 0
