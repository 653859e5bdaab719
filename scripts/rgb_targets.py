"""Shape and color from RGB images that microDR did not render: the floors of issue 11.

    python scripts/rgb_targets.py [-o OUT]

Draws targets with Pillow (128 x 128, 8-bit RGB, no alpha): a red disc on black (PNG, and JPEG
quality 75), a yellow star on black (PNG) and a blue disc on a light gray background (PNG), and
writes each next to a scene as one writes it from the README (an icosphere, one camera at
distance 3, fov 45, the image's background color as ``render.background``, no ``optimize``
section: every setting is the default). Then it runs

    microdr optimize OUT/<case>/scene.json OUT/<case>/target.<png|jpg> -o OUT/<case>/result

for each, prints the IoU and PSNR that the command wrote into ``metrics.json`` (the hard
silhouette, pixel centers inside the mesh, against the silhouette derived from the target > 0.5;
PSNR over all pixels and channels of the image), the IoU of the optimized scene's render (alpha >
0.5) against the shape Pillow drew, and exits 1 if a
floor is missed: IoU >= 0.97 for every case, and PSNR >= 30 dB for the red disc PNG.

The drawing functions are shared with ``tests/test_rgb_silhouette.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# microdr before torch, so that the CPU kernels own the cores (microdr.raster.cpu).
from microdr.optimize.losses import silhouette_iou  # noqa: E402
from microdr.render import render_scene  # noqa: E402
from microdr.io.scene import load_scene  # noqa: E402

import torch  # noqa: E402

SIZE = 128
BLACK = (0, 0, 0)
RED = (255, 0, 0)
YELLOW = (255, 220, 0)
BLUE, GRAY = (40, 60, 200), (204, 204, 191)
#: The start mesh's albedo, the README's.
START_COLOR = [0.9, 0.6, 0.35]


def disc(color=RED, background=BLACK, radius=36, size=SIZE, supersample=1) -> Image.Image:
    """A disc of ``radius`` pixels centered in a ``size`` square RGB image; drawn
    ``supersample`` times larger and box-filtered down when > 1 (anti-aliased edges)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), background)
    c, r = big / 2, radius * supersample
    ImageDraw.Draw(image).ellipse((c - r, c - r, c + r, c + r), fill=color)
    return image if supersample == 1 else image.resize((size, size), Image.Resampling.BOX)


def star(color=YELLOW, background=BLACK, size=SIZE) -> Image.Image:
    """A five-pointed star (radii 50 and 22 pixels at 128) centered in a ``size`` square."""
    image = Image.new("RGB", (size, size), background)
    corners = []
    for k in range(10):
        radius = (50 if k % 2 == 0 else 22) * size / SIZE
        angle = math.pi / 2 + k * math.pi / 5
        corners.append((size / 2 + radius * math.cos(angle), size / 2 - radius * math.sin(angle)))
    ImageDraw.Draw(image).polygon(corners, fill=color)
    return image


def jpeg(image: Image.Image, quality: int) -> bytes:
    """``image`` as JPEG file bytes (Pillow's default 4:2:0 chroma subsampling)."""
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=quality)
    return data.getvalue()


def drawn_mask(image: Image.Image, background=BLACK) -> torch.Tensor:
    """``(H, W)`` bool: the pixels Pillow drew (not the background color)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return (pixels != torch.tensor(background, dtype=torch.uint8)).any(dim=-1)


def scene_data(size: int = SIZE, background=BLACK, **optimize) -> dict:
    """An icosphere scene as one writes it from the README: one camera looking at the origin
    from distance 3, fov 45, ``background`` (8-bit) as ``render.background``."""
    data = {
        "image": {"width": size, "height": size},
        "render": {"background": [c / 255 for c in background]},
        "meshes": [{"primitive": "icosphere", "subdivisions": 3, "color": START_COLOR}],
        "cameras": [{"eye": [0, 0, 3], "target": [0, 0, 0], "fov": 45}],
    }
    if optimize:
        data["optimize"] = optimize
    return data


@dataclass(frozen=True)
class Case:
    name: str
    image: Image.Image
    background: tuple[int, int, int]
    suffix: str
    min_iou: float
    min_psnr: float | None


CASES = (
    Case("red_disc", disc(), BLACK, "png", 0.97, 30.0),
    Case("red_disc_jpeg75", disc(), BLACK, "jpg", 0.97, None),
    Case("star", star(), BLACK, "png", 0.97, None),
    Case("blue_disc_on_gray", disc(BLUE, GRAY), GRAY, "png", 0.97, None),
)


def run_case(case: Case, out: Path) -> tuple[dict, float, list[str]]:
    """Write the case, run the command; its metrics, the IoU against Pillow's shape, and the
    command (as run)."""
    folder = out / case.name
    folder.mkdir(parents=True, exist_ok=True)
    scene = folder / "scene.json"
    scene.write_text(json.dumps(scene_data(background=case.background)))
    target = folder / f"target.{case.suffix}"
    if case.suffix == "jpg":
        target.write_bytes(jpeg(case.image, 75))
    else:
        case.image.save(target)
    command = ["microdr", "optimize", str(scene), str(target), "-o", str(folder / "result")]
    done = subprocess.run(
        [sys.executable, "-m", "microdr", *command[1:]], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    metrics = json.loads((folder / "result" / "metrics.json").read_text())
    # The optimized scene re-rendered: its alpha against the shape Pillow drew.
    alpha = render_scene(load_scene(folder / "result" / "scene.json"), backend="cpu")[:, 3]
    mask = drawn_mask(case.image, case.background)
    iou_drawn = silhouette_iou(alpha, mask[None].float()).item()
    return metrics, iou_drawn, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", default="out/rgb_targets", type=Path)
    args = parser.parse_args()
    missed = []
    print("| case | IoU start | IoU | IoU vs drawn | PSNR start (dB) | PSNR (dB) | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case in CASES:
        metrics, iou_drawn, command = run_case(case, args.out)
        start, final = metrics["start"]["fit"], metrics["final"]["fit"]
        seconds = metrics["final"]["seconds"]
        print(
            f"| {case.name} | {start['iou']:.3f} | {final['iou']:.4f} | {iou_drawn:.4f} | "
            f"{start['psnr']:.1f} | {final['psnr']:.2f} | {seconds:.1f} |",
            flush=True,
        )
        if final["iou"] < case.min_iou:
            missed.append(f"{case.name}: IoU {final['iou']:.4f} < {case.min_iou}")
        if case.min_psnr is not None and final["psnr"] < case.min_psnr:
            missed.append(f"{case.name}: PSNR {final['psnr']:.2f} < {case.min_psnr}")
    for line in missed:
        print(line, file=sys.stderr)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
