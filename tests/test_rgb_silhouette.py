"""Silhouettes derived from RGB targets (``microdr.targets.derive_silhouette``) and shape from
RGB images that no microDR code rendered: discs and stars drawn with Pillow, saved as RGB PNG or
JPEG, on black and on other background colors."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from microdr.losses import silhouette_iou
from microdr.optimize import optimize, resolve_settings
from microdr.scene import OptimizeSettings, load_scene
from microdr.targets import (
    BACKGROUND_TOLERANCE,
    Targets,
    derive_silhouette,
    read_image,
    read_targets,
)

SIZE = 128
BLACK = (0, 0, 0)
RED = (255, 0, 0)


def disc(color=RED, background=BLACK, radius=36, size=SIZE, supersample=1) -> Image.Image:
    """A disc centered in a ``size`` square RGB image; drawn ``supersample`` times larger and
    box-filtered down when > 1 (anti-aliased edges)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), background)
    c, r = big / 2, radius * supersample
    ImageDraw.Draw(image).ellipse((c - r, c - r, c + r, c + r), fill=color)
    return image if supersample == 1 else image.resize((size, size), Image.Resampling.BOX)


def star(color=(255, 220, 0), background=BLACK, size=SIZE) -> Image.Image:
    """A five-pointed star (radii 50 and 22 pixels) centered in a ``size`` square RGB image."""
    image = Image.new("RGB", (size, size), background)
    corners = [
        (
            size / 2 + (50 if k % 2 == 0 else 22) * math.cos(math.pi / 2 + k * math.pi / 5),
            size / 2 - (50 if k % 2 == 0 else 22) * math.sin(math.pi / 2 + k * math.pi / 5),
        )
        for k in range(10)
    ]
    ImageDraw.Draw(image).polygon(corners, fill=color)
    return image


def as_tensor(image: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float32 in ``[0, 1]``."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(data.getvalue())).convert("RGB")


def drawn_mask(image: Image.Image, background=BLACK) -> torch.Tensor:
    """``(H, W)`` bool: the pixels Pillow drew (not the background color)."""
    return (as_tensor(image) != torch.tensor(background)[:, None, None] / 255).any(dim=0)


def hard_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return silhouette_iou(a[None].float(), b[None].float()).item()


def scene_file(folder: Path, background=(0, 0, 0), **optimize) -> Path:
    """An icosphere scene as one writes it from the README: one camera, ``SIZE`` square."""
    data = {
        "image": {"width": SIZE, "height": SIZE},
        "render": {"background": list(background)},
        "meshes": [{"primitive": "icosphere", "subdivisions": 3, "color": [0.9, 0.6, 0.35]}],
        "cameras": [{"eye": [0, 0, 3], "target": [0, 0, 0], "fov": 45}],
    }
    if optimize:
        data["optimize"] = optimize
    path = folder / "scene.json"
    path.write_text(json.dumps(data))
    return path


# --- the rule ------------------------------------------------------------------------------------


def test_a_hard_edged_disc_on_black_gives_its_exact_mask():
    image = disc()
    silhouette, why = derive_silhouette(as_tensor(image), torch.zeros(3))
    assert why is None
    assert torch.equal(silhouette, drawn_mask(image).float())


def test_anti_aliased_edges_give_the_coverage_less_the_tolerance():
    """A blend ``a * red + (1 - a) * black`` is at distance ``a`` from black, and its neighbours
    inside are at 1: the silhouette is ``(a - t) / (1 - t)`` (to 8-bit rounding)."""
    image = disc(supersample=8)
    coverage = as_tensor(image)[0]
    assert ((coverage > 0) & (coverage < 1)).sum() > 200  # the edge is anti-aliased
    silhouette, why = derive_silhouette(as_tensor(image), torch.zeros(3))
    assert why is None
    expected = ((coverage - BACKGROUND_TOLERANCE) / (1 - BACKGROUND_TOLERANCE)).clamp(0, 1)
    torch.testing.assert_close(silhouette, expected, atol=1e-6, rtol=0)
    assert hard_iou(silhouette, coverage > 0.5) >= 0.99


@pytest.mark.parametrize("quality", [75, 30])
def test_jpeg_noise_leaves_the_background_out_and_the_inside_in(quality):
    truth = disc()
    noisy = jpeg(truth, quality)
    assert (as_tensor(noisy) - as_tensor(truth)).abs().max() > 0.3  # real JPEG artifacts
    silhouette, why = derive_silhouette(as_tensor(noisy), torch.zeros(3))
    assert why is None
    mask = drawn_mask(truth)
    assert hard_iou(silhouette, mask) >= 0.98
    # Away from the edge (beyond 4 pixels): 0 outside; nearly 1 inside.
    y, x = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    radius = ((x - SIZE / 2) ** 2 + (y - SIZE / 2) ** 2).sqrt()
    assert silhouette[radius > 36 + 4].max() == 0
    assert silhouette[radius < 36 - 4].min() >= 0.8


def test_the_background_color_is_the_scenes():
    gray, blue = (204, 204, 191), (40, 60, 200)
    image = disc(color=blue, background=gray)
    background = torch.tensor(gray) / 255
    silhouette, why = derive_silhouette(as_tensor(image), background)
    assert why is None and torch.equal(silhouette, drawn_mask(image, gray).float())
    # Against black, the image's border is not the background: no silhouette, and why.
    silhouette, why = derive_silhouette(as_tensor(image), torch.zeros(3))
    assert silhouette is None
    assert why == "an RGB image whose border is only 0% the background color [0, 0, 0] (within 0.15)"


def test_no_silhouette_from_an_image_of_the_background_alone_or_of_ambiguous_colors():
    near_black = as_tensor(disc(color=(20, 20, 20)))  # 0.136 from black: within the tolerance
    silhouette, why = derive_silhouette(near_black, torch.zeros(3))
    assert silhouette is None and why.startswith("an RGB image with no pixel 0.3 away from")
    # A dim square (0.21 from black) with a bright dot: most of the object is ambiguous.
    dim = Image.new("RGB", (SIZE, SIZE), BLACK)
    ImageDraw.Draw(dim).rectangle((30, 30, 90, 90), fill=(30, 30, 30))
    ImageDraw.Draw(dim).rectangle((60, 60, 62, 62), fill=RED)
    silhouette, why = derive_silhouette(as_tensor(dim), torch.zeros(3))
    assert silhouette is None
    assert why == (
        "an RGB image whose colors are too close to the background color [0, 0, 0]: 3672 of the "
        "3721 pixels unlike it are within 0.3 of it"
    )


def test_rgb_targets_get_a_silhouette_when_the_background_is_given():
    image = as_tensor(disc())
    without = Targets.from_images([image])
    assert without.has_silhouette.tolist() == [False] and without.has_rgb.tolist() == [True]
    assert without.no_silhouette == ("an RGB image, and no background color to derive one from",)
    assert without.images[0, 3].eq(0).all()
    given = Targets.from_images([image], background=(0, 0, 0))
    assert given.has_silhouette.tolist() == [True] and given.no_silhouette == (None,)
    assert torch.equal(given.images[0, 3], drawn_mask(disc()).float())
    assert torch.equal(given.images[0, :3], image)


# --- warning ---------------------------------------------------------------------------------------


def test_free_vertices_without_a_silhouette_are_warned_of_on_stderr(tmp_path):
    """The command, on a gray-background image with the scene's black background: one line
    names the target and why it has no silhouette; the run goes on."""
    disc(background=(128, 128, 128)).save(tmp_path / "disc.png")
    scene = scene_file(tmp_path)
    command = [
        sys.executable, "-m", "microdr", "optimize", scene, tmp_path / "disc.png",
        "-o", tmp_path / "out", "--iterations", "1", "--backend", "cpu",
    ]  # fmt: skip
    done = subprocess.run([str(a) for a in command], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    [warning] = [line for line in done.stderr.splitlines() if "silhouette" in line]
    assert warning == (
        f"{tmp_path / 'disc.png'}: no silhouette: an RGB image whose border is only 0% the "
        "background color [0, 0, 0] (within 0.15); with free vertices, color alone shapes the "
        "mesh poorly: set render.background to the image's background color, or give RGBA or "
        "grayscale"
    )


def test_the_warning_names_the_first_target_and_counts_the_others(tmp_path, caplog):
    scene = load_scene(scene_file(tmp_path))
    images = [as_tensor(disc())] * 3
    resolve_settings(scene, Targets.from_images(images))
    resolve_settings(scene, Targets.from_images(images), OptimizeSettings(parameters=("colors",)))
    resolve_settings(scene, Targets.from_images(images, background=(0, 0, 0)))
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("microdr")]
    assert [note.split(";")[0] for note in notes] == [
        "target 0: no silhouette: an RGB image, and no background color to derive one from "
        "(and 2 more targets)"
    ]
