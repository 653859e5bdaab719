"""The ``microdr`` command: render scenes, report the installation, check gradients.

Problems the user can act on (:class:`~microdr.errors.MicroDRError`) print ``str(error)`` as one
line on stderr and exit with code 2; ``--debug`` shows their traceback instead. Any other
exception is a bug in microDR and keeps its traceback.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import imageio.v3 as iio
import numpy as np
import torch
import typer
from typer.core import TyperGroup

from . import __version__
from .defaults import BACKENDS
from .errors import InputError, MicroDRError, show_value
from .files import write_files
from .raster import backend_status, resolve_backend
from .raster.cpu_build import build_info
from .render import render_scene
from .scene import Camera, Scene, load_scene
from .verify import compare_backends, shrink

DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: How long one turntable orbit lasts, whatever its number of frames.
TURNTABLE_SECONDS = 3.0

SceneArgument = Annotated[
    str, typer.Argument(help="The scene file (JSON).", metavar="SCENE", show_default=False)
]


class _Commands(TyperGroup):
    """The command group: turns a :class:`MicroDRError` into one line on stderr and exit
    code 2, unless ``--debug`` was given."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MicroDRError as error:
            if ctx.params.get("debug"):
                raise
            typer.echo(str(error), err=True)
            raise typer.Exit(2) from None


# Plain tracebacks (no rich boxes) for bugs: they are meant to be pasted into bug reports.
app = typer.Typer(
    cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)


def main() -> None:
    """The console entry point: ``microdr`` and ``python -m microdr``."""
    app()


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of errors, not one line.")
    ] = False,
) -> None:
    """microDR: a differentiable soft rasterizer.

    Errors in what you give (scene files, meshes, flags) print one line and exit with code 2.
    """
    # ``debug`` is read by _Commands.invoke, which handles the errors of every command.


# ---------------------------------------------------------------------------------------------
# render


@app.command()
def render(
    scene: SceneArgument,
    output: Annotated[
        str,
        typer.Option(
            "-o",
            "--output",
            metavar="OUT",
            help="The image to write (.png; .gif with --turntable). With several cameras and no "
            "--grid, one file per camera: out.png gives out_0.png, out_1.png, ...",
            show_default=False,
        ),
    ],
    grid: Annotated[
        bool, typer.Option("--grid", help="Put all views in one image, in a near-square grid.")
    ] = False,
    turntable: Annotated[
        Optional[int],
        typer.Option(
            help="Write an animated GIF of N >= 2 frames orbiting the first camera 360 degrees "
            "around its target, about its up axis.",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        Optional[str],
        typer.Option(
            help=f"One of {', '.join(BACKENDS)}. Default: the scene's render.backend.",
            show_default=False,
        ),
    ] = None,
    alpha: Annotated[
        bool, typer.Option("--alpha", help="Write RGBA PNGs (the silhouette as alpha).")
    ] = False,
) -> None:
    """Render every camera of SCENE to 8-bit PNG images, or a turntable GIF.

    Nothing is written unless every image renders; existing files are replaced atomically.
    """
    _check_render_flags(grid, turntable, alpha)
    if backend is not None:
        _check_choice("--backend", backend, BACKENDS)
    loaded = load_scene(scene)
    used = resolve_backend(backend or loaded.render.backend)
    jobs = _render_jobs(loaded, Path(output), grid, turntable)
    _refuse_to_overwrite_inputs(scene, loaded, [Path(output), *(path for path, _ in jobs)])
    _check_suffix(output, ".gif" if turntable else ".png")
    files: dict[Path, bytes] = {}
    lines = []
    for path, cameras in jobs:
        scene_part = replace(loaded, cameras=cameras)
        files[path], summary = _render_file(scene_part, used, alpha, animate=bool(turntable))
        lines.append(f"wrote {path} ({summary})")
    write_files(files)
    for line in lines:
        typer.echo(line)


def _check_render_flags(grid: bool, turntable: int | None, alpha: bool) -> None:
    """The checks that need nothing but the flags, done before any slow work."""
    if turntable is None:
        return
    if turntable < 2:
        raise InputError("--turntable", "", f"expected an integer >= 2, got {turntable}")
    if grid:
        raise InputError("--grid", "", "cannot be combined with --turntable (it shows one camera)")
    if alpha:
        raise InputError("--alpha", "", "cannot be combined with --turntable (GIF has no alpha)")


def _check_choice(flag: str, value: str, options: Collection[str]) -> None:
    """Raise unless ``value`` of option ``flag`` is one of ``options``."""
    if value not in options:
        listed = ", ".join(f'"{option}"' for option in options)
        raise InputError(flag, "", f"expected one of {listed}, got {show_value(value)}")


def _check_suffix(output: str, suffix: str) -> None:
    if Path(output).suffix.lower() != suffix:
        raise InputError("-o", "", f"expected a {suffix} path, got {output}")


def _render_jobs(
    scene: Scene, output: Path, grid: bool, turntable: int | None
) -> list[tuple[Path, tuple[Camera, ...]]]:
    """Each file to write and the cameras whose images it holds."""
    if turntable:
        return [(output, _orbit(scene.cameras[0], turntable))]
    if grid or len(scene.cameras) == 1:
        return [(output, scene.cameras)]
    return [
        (output.with_name(f"{output.stem}_{i}{output.suffix}"), (camera,))
        for i, camera in enumerate(scene.cameras)
    ]


def _render_file(scene: Scene, backend: str, alpha: bool, animate: bool) -> tuple[bytes, str]:
    """One file's bytes, a PNG grid of the scene's views or a GIF with one frame per view, and
    the summary of the file for its "wrote" line."""
    start = time.perf_counter()
    images = _to_uint8(render_scene(scene, backend=backend), alpha)
    picture = images if animate else _grid(images)
    data = _encode_gif(picture) if animate else _encode_png(picture)
    height, width = picture.shape[-3:-1]
    views = len(scene.cameras)
    count = f"{views} frames" if animate else _plural(views, "camera")
    seconds = time.perf_counter() - start
    return data, f"{width} x {height}, {count}, backend {backend}, {seconds:.2f} s"


def _orbit(camera: Camera, frames: int) -> tuple[Camera, ...]:
    """``frames`` copies of ``camera`` with the eye turned about the up axis through the target,
    ``360 / frames`` degrees apart; distance and elevation stay as they are."""
    axis = np.array(camera.up) / np.linalg.norm(camera.up)
    offset = np.subtract(camera.eye, camera.target)
    cameras = []
    for frame in range(frames):
        angle = 2 * math.pi * frame / frames
        # Rodrigues' rotation formula.
        turned = (
            offset * math.cos(angle)
            + np.cross(axis, offset) * math.sin(angle)
            + axis * np.dot(axis, offset) * (1 - math.cos(angle))
        )
        eye = tuple(float(x) for x in np.add(camera.target, turned))
        cameras.append(replace(camera, eye=eye))
    return tuple(cameras)


def _refuse_to_overwrite_inputs(scene_path: str, scene: Scene, outputs: list[Path]) -> None:
    """Raise if an output path is the scene file or one of its mesh files."""
    inputs = {Path(scene_path).resolve(): "the scene file"}
    for mesh in scene.meshes:
        # A primitive's name ("cube") gives a path that is no file; it never matches an output
        # that passes the suffix check, so it needs no special case.
        inputs.setdefault((Path(scene_path).parent / mesh.name).resolve(), "a mesh of the scene")
    for output in outputs:
        role = inputs.get(output.resolve())
        if role:
            raise InputError("-o", "", f"refusing to overwrite {output}: it is {role}")


def _to_uint8(images: torch.Tensor, alpha: bool) -> np.ndarray:
    """``(N, H, W, 3 or 4)`` 8-bit images from float RGBA ``(N, 4, H, W)``."""
    channels = images[:, : 4 if alpha else 3]
    # Lit colors can exceed 1 (ambient plus lights); 8 bits saturate them.
    scaled = (channels.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).numpy()


def _grid(images: np.ndarray) -> np.ndarray:
    """The images ``(N, H, W, C)`` row by row in a near-square grid with 1-pixel gaps (zeros:
    black, or transparent with alpha); one image comes back as it is."""
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.zeros(
        (rows * (height + 1) - 1, columns * (width + 1) - 1, channels), dtype=np.uint8
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (height + 1), column * (width + 1)
        canvas[top : top + height, left : left + width] = image
    return canvas


def _encode_png(image: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", image, extension=".png")


def _encode_gif(frames: np.ndarray) -> bytes:
    """A looping animated GIF; GIF counts time in hundredths of a second."""
    duration = round(TURNTABLE_SECONDS * 100 / len(frames)) * 10
    return iio.imwrite("<bytes>", frames, extension=".gif", loop=0, duration=duration)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ---------------------------------------------------------------------------------------------
# info


@app.command()
def info() -> None:
    """Show versions, the available backends and the CPU kernels' build."""
    _print_rows(
        [
            ("microdr", __version__),
            ("python", platform.python_version()),
            ("torch", torch.__version__),
            ("numpy", np.__version__),
            ("pycuda", _package_version("pycuda")),
            ("cpu threads", str(torch.get_num_threads())),
        ]
    )
    build = build_info()
    rows = [
        ("compiler", build["compiler"] or "none"),
        ("version", build.get("compiler_version", "unknown")),
        ("cache", build["path"] or "none"),
        ("cached", "yes" if build["cached"] else "no"),
    ]
    if "error" in build:
        rows.append(("error", build["error"]))
    typer.echo("CPU kernels:")
    _print_rows(rows, indent=2)
    # After the build info: a CPU status check compiles the kernels if they are not cached.
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        typer.echo(f"backends for {device.upper()} tensors:")
        statuses = backend_status(device).items()
        _print_rows([(name, reason or "ok") for name, reason in statuses], indent=2)


def _package_version(name: str) -> str:
    # Read from the installed metadata: importing pycuda would initialize CUDA.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _print_rows(rows: list[tuple[str, str]], indent: int = 0) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{' ' * indent}{key + ':':<{width + 1}} {value}")


# ---------------------------------------------------------------------------------------------
# gradcheck


@app.command()
def gradcheck(
    scene: SceneArgument,
    backend: Annotated[
        str, typer.Option(help=f"The backend to check: one of {', '.join(BACKENDS)}.")
    ] = "cpu",
    max_side: Annotated[
        int,
        typer.Option(
            help="Render at most this many pixels on the longer side (the reference is slow)."
        ),
    ] = 64,
    dtype: Annotated[str, typer.Option(help=f"One of {', '.join(DTYPES)}.")] = "float64",
    seed: Annotated[int, typer.Option(help="Seed of the random projection of the image.")] = 0,
) -> None:
    """Compare a backend's image and gradients with the reference renderer's on SCENE.

    Exits with code 0 if every quantity is within its tolerance, else 1.
    """
    _check_choice("--backend", backend, BACKENDS)
    _check_choice("--dtype", dtype, DTYPES)
    if max_side < 1:
        raise InputError("--max-side", "", f"expected an integer >= 1, got {max_side}")
    small = shrink(load_scene(scene), max_side)
    size = f"{small.render.width} x {small.render.height}"
    # The header comes first: the reference takes a while.
    used = resolve_backend(backend)
    typer.echo(f"backend {used} against reference, {size}, {dtype}, seed {seed}")
    rows = compare_backends(small, backend, dtype=DTYPES[dtype], seed=seed)
    table = [("quantity", "max abs error", "max rel error", "tolerance", "ok")]
    for row in rows:
        table.append(
            (
                row.quantity,
                f"{row.max_abs:.2e}",
                f"{row.max_rel:.2e}",
                f"{row.tolerance:.0e} ({row.measure})",
                "ok" if row.ok else "FAIL",
            )
        )
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    for cells in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    if not all(row.ok for row in rows):
        raise typer.Exit(1)
