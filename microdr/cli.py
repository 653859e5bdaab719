"""The ``microdr`` command: render scenes, optimize them to match images, report the
installation, check gradients.

Problems the user can act on (:class:`~microdr.errors.MicroDRError`) print ``str(error)`` as one
line on stderr and exit with code 2; ``--debug`` shows their traceback instead. Any other
exception is a bug in microDR and keeps its traceback.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import math
import platform
import re
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import numpy as np
import torch
import typer
from typer.core import TyperGroup

try:  # typer 0.2x carries its own copy of click; earlier versions use click itself
    from typer._click.exceptions import MissingParameter, NoSuchOption, UsageError
except ImportError:
    from click.exceptions import MissingParameter, NoSuchOption, UsageError

from . import __version__
from .defaults import BACKENDS
from .errors import InputError, MicroDRError, show_value
from .io.camera_files import image_files, nerf_transforms, relative_path, transforms_text
from .io.files import check_writable_file, write_files
from .io.images import encode_gif, encode_png, grid, to_uint8
from .io.scene import (
    MAX_IMAGE_SIDE,
    OPTIMIZABLE,
    Camera,
    OptimizeSettings,
    Scene,
    holdout_from_text,
    input_files,
    load_scene,
    mesh_preview_scene,
    override_optimize,
    too_many_pixels,
)
from .io.targets import SOURCE as TARGET_SOURCE
from .io.targets import read_target_files, read_targets
from .optimize import distributed
from .optimize.distributed import FirstRankFailed, PeerLost
from .optimize.loop import NonFiniteError, ranks_problem, stop_signals
from .optimize.loop import optimize as optimize_scene
from .optimize.losses import Metrics
from .optimize.outputs import default_outdir
from .optimize.result import Step
from .raster import backend_status, describe_backend, preferred_device, resolve_backend
from .raster.cpu import cpu_target
from .raster.cpu_build import build_info
from .render import opaque_inside, render_scene
from .verify import compare_backends, shrink

DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: How long one turntable orbit lasts, whatever its number of frames.
TURNTABLE_SECONDS = 3.0

#: The exit code of a run stopped by a NaN or an infinity in its loss, a gradient or an update
#: (distinct from 2, bad input: the input was valid, the run went wrong).
NON_FINITE_EXIT_CODE = 1

SceneArgument = Annotated[
    str, typer.Argument(help="The scene file (JSON).", metavar="SCENE", show_default=False)
]
BackendOption = Annotated[
    Optional[str],
    typer.Option(
        help=f"One of {', '.join(BACKENDS)}. Default: the scene's render.backend.",
        show_default=False,
    ),
]


class _Commands(TyperGroup):
    """The command group: turns a :class:`MicroDRError`, or a usage error (a flag value of the
    wrong type, an unknown flag, a missing argument), into one line on stderr and exit code 2;
    ``--debug`` shows its traceback instead."""

    def make_context(self, info_name, args, parent=None, **extra):
        # The arguments as given, for the ranks that optimize --workers starts.
        self.arguments = list(args)
        # The group's own flags are parsed here, before --debug is known.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # a bare "microdr": the help
                raise
            _exit_with(_usage_problem(error))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as error:  # before a run started (a run reports its own)
            if ctx.params.get("debug"):
                raise
            number = getattr(error, "signal", signal.SIGINT)
            typer.echo(_stopped_by(number), err=True)
            raise typer.Exit(_signal_exit_code(number)) from None
        except MicroDRError as error:
            if ctx.params.get("debug"):
                raise
            _exit_with(error)
        except UsageError as error:
            if ctx.params.get("debug"):
                raise _usage_problem(error) from error
            _exit_with(_usage_problem(error))


def _stopped_by(number: int) -> str:
    """How the one line about a stop signal starts: ``interrupted`` for Ctrl-C, else ``stopped
    by SIGTERM`` and the like."""
    return "interrupted" if number == signal.SIGINT else f"stopped by {signal.Signals(number).name}"


def _signal_exit_code(number: int) -> int:
    """The exit code of a command stopped by signal ``number``: 128 + the number, as shells
    report a process that the signal ended (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + number


def _exit_with(problem: MicroDRError) -> NoReturn:
    typer.echo(str(problem), err=True)
    raise typer.Exit(2) from None


def _usage_problem(error: UsageError) -> InputError:
    """A usage error as one line that starts with the flag, argument or command it is about
    (click would print the usage, a hint and a box)."""
    param = getattr(error, "param", None)
    if param is not None:
        name = param.opts[0] if param.param_type_name == "option" else param.metavar or param.name
        if isinstance(error, MissingParameter):
            return InputError(name, "", f"missing {param.param_type_name}")
        return InputError(name, "", _lowercase_first(error.message))
    if isinstance(error, NoSuchOption):
        close = sorted(error.possibilities or ())
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return InputError(error.option_name, "", "no such option" + hint)
    # A flag without its value names the flag; an unknown command or extra argument, the command.
    option = getattr(error, "option_name", None)
    message = error.format_message().removeprefix(f"Option '{option}' ")
    return InputError(option or _command_path(error.ctx), "", _lowercase_first(message))


def _command_path(ctx) -> str:
    """``microdr`` and the subcommand of ``ctx`` (the program's name as run varies)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["microdr", *reversed(names)])


def _lowercase_first(text: str) -> str:
    """Click's sentences as the clauses of microDR's messages (lowercase, no final period)."""
    return text[:1].lower() + text[1:].rstrip(".")


# Plain tracebacks (no rich boxes) for bugs: they are meant to be pasted into bug reports.
app = typer.Typer(
    cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def main() -> None:
    """The console entry point: ``microdr`` and ``python -m microdr``."""
    app()


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of errors, not one line.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print microDR's version and exit.", is_eager=True,
            callback=lambda given: _print_version() if given else None,
        ),
    ] = False,
) -> None:
    """microDR: a differentiable soft rasterizer.

    Errors in what you give (scene files, meshes, flags) print one line and exit with code 2.
    """
    # ``debug`` is read by _Commands.invoke, which handles the errors of every command.


def _print_version() -> NoReturn:
    typer.echo(f"microdr {__version__}")
    raise typer.Exit(0)


# ---------------------------------------------------------------------------------------------
# render


@app.command()
def render(
    scene: Annotated[
        str,
        typer.Argument(
            help="The scene file (JSON), or an OBJ mesh to preview.", metavar="SCENE", show_default=False
        ),
    ],
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
    backend: BackendOption = None,
    alpha: Annotated[
        bool,
        typer.Option(
            "--alpha",
            help="Write RGBA PNGs: alpha is the silhouette, opaque inside the outline (soft "
            "silhouette >= 1/2), the soft silhouette outside it.",
        ),
    ] = False,
    size: Annotated[
        Optional[str],
        typer.Option(
            metavar="WxH|N",
            help="Render at WIDTHxHEIGHT pixels, or with the longer side N pixels (aspect kept), "
            "instead of the scene's image size. sigma is in screen units, so the soft edges keep "
            "their width relative to the image.",
            show_default=False,
        ),
    ] = None,
    cameras_out: Annotated[
        Optional[str],
        typer.Option(
            "--cameras-out",
            metavar="JSON",
            help="Also write the cameras in NeRF's transforms.json format, each frame naming its "
            "rendered image: a scene with cameras {\"from\": JSON} and no TARGET optimizes "
            "against them.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Render every camera of SCENE to 8-bit PNG images, or a turntable GIF.

    SCENE may also be an OBJ mesh: it is shown whole by one camera, with default lights.
    Nothing is written unless every image renders; existing files are replaced atomically.
    """
    _check_render_flags(grid, turntable, alpha)
    if backend is not None:
        _check_choice("--backend", backend, BACKENDS)
    if Path(scene).suffix.lower() == ".obj":
        loaded = mesh_preview_scene(scene)
    else:
        loaded = load_scene(scene)
    if size is not None:
        loaded = replace(loaded, render=replace(loaded.render, **_image_size(size, loaded)))
    used = resolve_backend(backend or loaded.render.backend)
    jobs = _render_jobs(loaded, Path(output), grid, turntable)
    extra = [] if cameras_out is None else [Path(cameras_out)]
    _refuse_to_overwrite_inputs(loaded, [Path(output), *(path for path, _ in jobs)])
    _refuse_to_overwrite_inputs(loaded, extra, "--cameras-out")
    _check_suffix(output, ".gif" if turntable else ".png")
    files: dict[Path, bytes] = {}
    if cameras_out is not None:
        cameras = len(loaded.cameras)
        files[Path(cameras_out)] = _cameras_file(loaded, jobs, Path(cameras_out), cameras)
    # Before the slow part, and before the line about the backend: bad input gets one line.
    for path in [*(path for path, _ in jobs), *extra]:
        check_writable_file(path)
    _announce_backend(used)
    lines = []
    for path, cameras in jobs:
        scene_part = replace(loaded, cameras=cameras)
        files[path], summary = _render_file(scene_part, used, alpha, animate=bool(turntable))
        lines.append(f"wrote {path} ({summary})")
    write_files(files)
    for line in lines:
        typer.echo(line)


def _announce_backend(backend: str) -> None:
    """The line a run starts with on stderr: the backend that computes it, so that a slow one
    is no surprise."""
    typer.echo(f"microdr: backend {describe_backend(backend)}", err=True)


def _cameras_file(
    scene: Scene, jobs: list[tuple[Path, tuple[Camera, ...]]], path: Path, cameras: int
) -> bytes:
    """``--cameras-out``'s NeRF ``transforms.json``: the cameras of the render ``jobs`` (one
    image per camera of ``scene``'s ``cameras``), each frame naming its image relative to
    ``path``'s folder."""
    if len(jobs) != cameras or any(len(views) != 1 for _, views in jobs):
        raise InputError("--cameras-out", "", "needs one image per camera: leave out --grid and "
                         "--turntable")
    if path.suffix.lower() != ".json":
        raise InputError("--cameras-out", "", f"expected a .json path, got {path}")
    images = [relative_path(image, path.parent) for image, _ in jobs]
    views = [views[0] for _, views in jobs]
    data = nerf_transforms(views, scene.render.width, scene.render.height, images, "--cameras-out")
    return transforms_text(data).encode()


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


def _image_size(text: str, scene: Scene) -> dict[str, int]:
    """``width`` and ``height`` from ``--size``: ``WxH``, or ``N`` for the longer side of the
    scene's aspect."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*(?:[xX]\s*(\d{1,9})\s*)?", text)
    if match is None:
        raise InputError("--size", "", f"expected WIDTHxHEIGHT or one number, got {show_value(text)}")
    if match[2] is not None:
        width, height = int(match[1]), int(match[2])
    else:
        longest, render = int(match[1]), scene.render
        factor = longest / max(render.width, render.height)
        width, height = max(1, round(render.width * factor)), max(1, round(render.height * factor))
    for name, side in (("width", width), ("height", height)):
        if not 1 <= side <= MAX_IMAGE_SIDE:
            raise InputError("--size", "", f"{name} {side} is outside [1, {MAX_IMAGE_SIDE}]")
    problem = too_many_pixels(width, height)
    if problem:
        raise InputError("--size", "", problem)
    return {"width": width, "height": height}


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
    rendered = render_scene(scene, backend=backend)
    images = to_uint8(opaque_inside(rendered) if alpha else rendered[:, :3])
    picture = images if animate else grid(images)
    data = encode_gif(picture, TURNTABLE_SECONDS) if animate else encode_png(picture)
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


def _refuse_to_overwrite_inputs(scene: Scene, outputs: list[Path], flag: str = "-o") -> None:
    """Raise, naming ``flag``, if an output path is the scene file, its camera file or one of its
    mesh files."""
    inputs = input_files(scene)
    for output in outputs:
        role = inputs.get(output.resolve())
        if role:
            raise InputError(flag, "", f"refusing to overwrite {output}: it is {role}")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ---------------------------------------------------------------------------------------------
# optimize


@app.command()
def optimize(
    ctx: typer.Context,
    scene: SceneArgument,
    targets: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="One image per camera, in the scene's order: files, folders (their images "
            "sorted by name) or quoted glob patterns. RGB (the silhouette: the pixels unlike "
            "render.background), RGBA (alpha: the silhouette) or grayscale (a silhouette), 8 or "
            "16 bits. Default, for cameras from a camera file: the images it names, in its order.",
            metavar="TARGET...",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Optional[str],
        typer.Option(
            "-o",
            "--output",
            metavar="OUTDIR",
            help="The folder to write into. Default: the scene file's name without .json, then \"_optimized\".",
            show_default=False,
        ),
    ] = None,
    iterations: Annotated[
        Optional[int],
        typer.Option(
            metavar="N", help="Default: the scene's optimize.iterations.", show_default=False
        ),
    ] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(
            metavar="X", help="Adam's learning rate. Default: optimize.lr.", show_default=False
        ),
    ] = None,
    params: Annotated[
        Optional[str],
        typer.Option(
            metavar="LIST",
            help=f"Free parameters, comma-separated, of {', '.join(OPTIMIZABLE)}. Default: "
            "optimize.parameters, else vertices (and colors if a target has color).",
            show_default=False,
        ),
    ] = None,
    holdout: Annotated[
        Optional[str],
        typer.Option(
            metavar="SPEC",
            help="Cameras whose targets never enter the loss, scored apart (held-out views): "
            "odd, even, every:K (0, K, 2K, ...) or indices such as 3,7,11. Default: "
            "optimize.holdout, else none.",
            show_default=False,
        ),
    ] = None,
    backend: BackendOption = None,
    seed: Annotated[int, typer.Option(help="Seeds the random choice of views per iteration.")] = 0,
    resize: Annotated[
        bool,
        typer.Option("--resize", help="Resample targets whose size differs from the scene's."),
    ] = False,
    resume: Annotated[
        Optional[str],
        typer.Option(
            metavar="OUTDIR",
            help="Continue the run in OUTDIR from its checkpoint (same scene, targets, options). "
            "With --iterations N it runs on to N in all, finished or not; a cosine lr or a sigma "
            "schedule then follows N's from where the run is.",
            show_default=False,
        ),
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(metavar="N", help="Checkpoint every N iterations (0: only at the end).")
    ] = 100,
    log_every: Annotated[
        int, typer.Option(metavar="N", help="Without a terminal, log a line every N iterations.")
    ] = 50,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Write into OUTDIR even if another run holds its lock (OUTDIR/.microdr.lock).",
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Run on N processes of this machine, each with 1/N of the cores, sharing each "
            "iteration's views (as torchrun --nproc-per-node N would; same result).",
        ),
    ] = 1,
    timeout: Annotated[
        Optional[float],
        typer.Option(
            metavar="SECONDS",
            help="With several processes: how long one waits for the others before the run "
            f"ends. Default: ${distributed.TIMEOUT_VARIABLE}, else "
            f"{distributed.DEFAULT_TIMEOUT:g}.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Change SCENE's free parameters until its renders match the TARGET images.

    Writes into OUTDIR: the optimized mesh and scene, renders, sheets, a GIF, loss curves, metrics.

    Ctrl-C stops cleanly, writing all that and a checkpoint (exit code 130); so do SIGTERM (exit
    code 143) and SIGHUP (129). --resume continues. A stop during the final writes waits for them.
    A NaN or an infinity in the loss, a gradient or an update stops the run, writing all that as
    of the last good iteration (exit code 1). A second run into an OUTDIR in use is refused
    (exit code 2) unless --force.

    Several processes (--workers N, or torchrun: `torchrun --nproc-per-node N -m microdr
    optimize ...`) share each iteration's views and give the same result, bit for bit; rank 0
    shows the progress and writes OUTDIR. A process that dies or stops answering for --timeout
    seconds ends the run as a NaN does (exit code 1).
    """
    # From the start: a stop signal while the scene and targets load is one line too.
    with stop_signals() as received:
        if backend is not None:
            _check_choice("--backend", backend, BACKENDS)
        _check_at_least("--checkpoint-every", checkpoint_every, 0)
        _check_at_least("--log-every", log_every, 1)
        _check_seed(seed)
        _check_at_least("--workers", workers, 1)
        seconds = distributed.timeout(timeout, "--timeout")
        if workers > 1 and distributed.launched():
            raise InputError(
                "--workers", "", "this process is already one of several (WORLD_SIZE is set, "
                "as torchrun sets it): leave --workers out",
            )  # fmt: skip
        if (
            resume is not None
            and output is not None
            and Path(output).resolve() != Path(resume).resolve()
        ):
            raise InputError(
                "-o", "", "a resumed run writes into the folder it resumes: leave -o out"
            )
        loaded = load_scene(scene)
        settings = _optimize_settings(
            loaded, iterations=iterations, lr=lr, params=params, holdout=holdout
        )
        size = (loaded.render.width, loaded.render.height)
        background = loaded.render.background
        if targets:
            images = read_targets(
                targets, len(loaded.cameras), size, resize=resize, background=background
            )
        elif loaded.camera_file is not None:
            images = read_target_files(
                image_files(loaded.camera_file), size, resize=resize, background=background
            )
        else:
            raise InputError(f"{TARGET_SOURCE}...", "", "missing argument (one image per camera; "
                             'only cameras {"from": FILE} name their own)')
        outdir = Path(resume or output or default_outdir(scene))
        if workers > 1:
            problem = ranks_problem(settings, len(loaded.cameras), workers)
            if problem is not None:
                raise InputError("--workers", "", problem)
        device = preferred_device(backend or loaded.render.backend)
        arguments = _without_workers(ctx.find_root().command.arguments)
        with _ranks(workers, arguments, seconds, device) as (ranks, started):
            with _progress(settings.iterations, log_every) as progress:
                try:
                    result = optimize_scene(
                        loaded, images, settings, seed=seed, backend=backend,
                        callback=progress if ranks.first else None,
                        on_start=(lambda run: progress.start(run.backend)) if ranks.first else None,
                        outdir=outdir, resume=resume is not None,
                        checkpoint_every=checkpoint_every, force=force,
                    )  # fmt: skip
                    stopped = None
                except (NonFiniteError, PeerLost) as error:  # outcomes of a valid run
                    if not ranks.first:  # rank 0 reports a NaN, met by every rank alike
                        if isinstance(error, PeerLost):
                            typer.echo(f"rank {ranks.rank}: stopped at {error}", err=True)
                        raise typer.Exit(NON_FINITE_EXIT_CODE) from None
                    result, stopped = error.result, error
                except FirstRankFailed:  # rank 0 says why
                    raise typer.Exit(2) from None
    if not ranks.first:
        return
    failed = distributed.worker_failure(started)
    typer.echo(f"wrote {outdir}")
    quality = _quality(result.metrics, result.start_metrics)
    if result.held_out_metrics is not None:
        quality += [
            f"held-out {part}"
            for part in _quality(result.held_out_metrics, result.start_held_out_metrics)
        ]
    run = f"{result.iterations} iterations, {result.seconds:.1f} s, backend {result.backend}"
    typer.echo(", ".join([*quality, run]))
    if result.interrupted:
        # A KeyboardInterrupt that no signal raised (a callback's) is Ctrl-C's.
        number = received[0] if received else signal.SIGINT
        typer.echo(
            f"{_stopped_by(number)} after {result.iterations} of {settings.iterations} "
            f"iterations; continue with --resume {outdir}",
            err=True,
        )
        raise typer.Exit(_signal_exit_code(number))
    if stopped is not None:
        typer.echo(
            f"stopped at {stopped}; {outdir} holds the last good state, after "
            f"{_plural(result.iterations, 'iteration')}",
            err=True,
        )
        raise typer.Exit(NON_FINITE_EXIT_CODE)
    if failed is not None:
        code, line = failed
        typer.echo(line, err=True)
        raise typer.Exit(code)


@contextlib.contextmanager
def _ranks(
    workers: int, arguments: list[str], seconds: float, device: torch.device
) -> Iterator[tuple[distributed.Ranks, list]]:
    """This process's ranks for the run: started with ``workers`` local processes (this one
    rank 0) that run ``microdr ARGUMENTS``, joined from torchrun's environment, or alone; and
    the processes it started. The process group is left on leaving."""
    if workers > 1:
        with distributed.local_workers(workers, arguments, seconds, device) as started:
            yield distributed.current(), started
        return
    if not distributed.launched():
        yield distributed.Ranks(), []
        return
    threads = distributed.threads_per_rank()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield distributed.start(device, seconds), []
    finally:
        distributed.stop()


def _without_workers(arguments: list[str]) -> list[str]:
    """The command's arguments without ``--workers N`` (or ``--workers=N``)."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--workers":
            skip = True
        elif not argument.startswith("--workers="):
            kept.append(argument)
    return kept


def _check_at_least(flag: str, value: int, least: int) -> None:
    if value < least:
        raise InputError(flag, "", f"expected an integer >= {least}, got {value}")


def _check_seed(seed: int) -> None:
    # torch's random generators take 64-bit seeds and fail deep inside on others.
    if not 0 <= seed < 2**64:
        raise InputError("--seed", "", f"expected an integer in [0, 2**64), got {seed}")


def _quality(final: Metrics, start: Metrics) -> list[str]:
    """``IoU 0.950 (start 0.620)`` and the like, for the metrics that there are."""
    return [
        f"{name} {_number(ours, unit)} (start {_number(theirs, unit)})"
        for name, ours, theirs, unit in (
            ("IoU", final.mean_iou, start.mean_iou, ""),
            ("PSNR", final.mean_psnr, start.mean_psnr, " dB"),
        )
        if ours is not None
    ]


def _optimize_settings(
    scene: Scene,
    *,
    iterations: int | None,
    lr: float | None,
    params: str | None,
    holdout: str | None,
) -> OptimizeSettings:
    """The scene's ``optimize`` section with the flags that were given instead of its keys."""
    settings = scene.optimize or OptimizeSettings()
    overrides = [
        ("--iterations", "iterations", iterations),
        ("--lr", "lr", lr),
        (
            "--params",
            "parameters",
            None if params is None else [p.strip() for p in params.split(",")],
        ),
        ("--holdout", "holdout", None if holdout is None else holdout_from_text(holdout)),
    ]
    for flag, key, value in overrides:
        if value is not None:
            settings = override_optimize(settings, key, value, flag, len(scene.cameras))
    return settings


class _Progress:
    """Reports a run on stderr: at its start, the backend; then each finished iteration, as a
    live bar on a terminal, else as a line every ``every`` iterations and at the last. The bar
    starts with the run, after any line about the backend, which would break it up. The metrics
    measured at some iterations only show their last values."""

    def __init__(self, total: int, every: int, stack: contextlib.ExitStack):
        self.total, self.every, self._stack = total, every, stack
        self._bar = None
        self._pace = _Pace(total)
        self._measured: dict[str, float] = {}

    def start(self, backend: str) -> None:
        _announce_backend(backend)
        if sys.stderr.isatty():
            self._bar = self._stack.enter_context(
                # click's own ETA counts the first iteration, which compiles kernels: minutes
                # for seconds.
                typer.progressbar(
                    length=self.total, label="optimizing", file=sys.stderr, show_pos=True,
                    show_eta=False,
                    item_show_func=lambda status: status,  # None (before the first iteration): nothing
                )  # fmt: skip
            )

    def __call__(self, step: Step) -> None:
        done = step.iteration + 1
        self._pace.add(done, time.perf_counter())
        self._measured.update(_measured(step))
        status = _status(step, self._pace, self._measured)
        if self._bar is None:
            if done % self.every == 0 or done == self.total:
                typer.echo(f"iteration {done}/{self.total}  {status}", err=True)
            return
        self._bar.current_item = status  # what item_show_func shows
        # A resumed run starts part of the way.
        self._bar.update(done - self._bar.pos)


@contextlib.contextmanager
def _progress(total: int, every: int) -> Iterator[_Progress]:
    """A :class:`_Progress` whose bar, if any, is closed on leaving."""
    with contextlib.ExitStack() as stack:
        yield _Progress(total, every, stack)


class _Pace:
    """The speed of a run and the time it has left, from its last :attr:`WINDOW` iterations in
    this process, leaving out the first (it compiles kernels and warms caches, which can take
    longer than the whole rest of a short run)."""

    #: How many recent iterations the speed is measured over.
    WINDOW = 20
    #: Iterations after the first needed before the speed is shown.
    LEAST = 3

    def __init__(self, total: int):
        self.total = total
        self.marks: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.WINDOW + 1)

    def add(self, done: int, now: float) -> None:
        """Note that ``done`` iterations had finished at time ``now`` (seconds)."""
        self.marks.append((done, now))

    def speed(self) -> float | None:
        """Iterations per second, or ``None`` until :attr:`LEAST` have been timed."""
        (first, start), (last, end) = self.marks[0], self.marks[-1]
        if last - first < self.LEAST or end <= start:
            return None
        return (last - first) / (end - start)

    def seconds_left(self) -> float | None:
        speed = self.speed()
        return None if speed is None else (self.total - self.marks[-1][0]) / speed


#: The :class:`Step` metrics measured at some iterations only, by name in the progress line.
MEASURED = {"iou": "IoU", "held_out_iou": "held-out IoU", "held_out_psnr": "held-out PSNR"}


def _measured(step: Step) -> dict[str, float]:
    """The metrics of :data:`MEASURED` that ``step`` measured, by key."""
    return {key: getattr(step, key) for key in MEASURED if getattr(step, key) is not None}


def _status(step: Step, pace: _Pace, measured: dict[str, float] | None = None) -> str:
    """The loss after a step, the hard IoU of the fit views, the held-out views' IoU, the PSNR of
    the step's views, the held-out PSNR; the speed and the time left once they are known.
    ``measured``: the last values of the metrics that not every step measures (:data:`MEASURED`),
    by default the step's."""
    if measured is None:
        measured = _measured(step)
    parts = [f"loss {step.loss:.4g}"]
    for key in ("iou", "held_out_iou"):
        if key in measured:
            parts.append(f"{MEASURED[key]} {measured[key]:.3f}")
    if step.psnr is not None:
        parts.append(f"PSNR {step.psnr:.1f} dB")
    if "held_out_psnr" in measured:
        parts.append(f"held-out PSNR {measured['held_out_psnr']:.1f} dB")
    speed, left = pace.speed(), pace.seconds_left()
    if speed is not None:
        minutes, seconds = divmod(round(left), 60)
        hours, minutes = divmod(minutes, 60)
        clock = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
        # Below one iteration a second (the reference backend), "0.0 it/s" would say nothing.
        rate = f"{speed:.1f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it"
        parts += [rate, f"ETA {clock}"]
    return "  ".join(parts)


def _number(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.3f}{unit}" if not unit else f"{value:.1f}{unit}"


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
        ("compiler", build["compiler"] or f"none: {build['error']}"),
        ("version", build.get("compiler_version", "-")),
        ("flags", " ".join(build["flags"])),
        ("simd", build["simd"]),
    ]
    # Loading compiles the kernels if they are not cached (a note on stderr says so).
    try:
        target = cpu_target()
    except MicroDRError:
        rows.append(("library", "none (see the cpu backend below)"))
    else:
        loaded = target.loaded
        rows += [
            ("lanes", f"{target.lanes} pixels per work item"),
            ("library", str(loaded.build.path)),
            ("from cache", "yes" if loaded.from_cache else "no (built now)"),
            ("built by", f"{loaded.build.compiler}: {loaded.build.compiler_version}"),
            ("sha256", loaded.build.sha256),
        ]
    typer.echo("CPU kernels:")
    _print_rows(rows, indent=2)
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

    The reference runs in float64 whatever --dtype is. The image must agree within eps * kappa
    (absolute), the gradients within 8 eps * kappa of their largest magnitude: eps is the
    dtype's machine epsilon (float32 1.2e-7, float64 2.2e-16) and
    kappa = 1 / gamma + 2 max(sqrt(ln(1 / eps_d - 1)), 1) / sqrt(sigma) is how much a rounding
    error in a depth or a screen coordinate can grow in a blend weight; the factor 8 allows for
    the cancellation of per-pixel terms in the gradients. Progress goes to stderr.
    Exits with code 0 if every quantity is within its tolerance, else 1.
    """
    _check_choice("--backend", backend, BACKENDS)
    _check_choice("--dtype", dtype, DTYPES)
    if max_side < 1:
        raise InputError("--max-side", "", f"expected an integer >= 1, got {max_side}")
    _check_seed(seed)
    small = shrink(load_scene(scene), max_side)
    size = f"{small.render.width} x {small.render.height}"
    # The header comes first: the reference takes a while.
    used = resolve_backend(backend)
    typer.echo(f"backend {used} in {dtype} against reference in float64, {size}, seed {seed}")
    started = time.perf_counter()

    def report(name: str, done: int, cameras: int) -> None:
        typer.echo(f"{name}: camera {done}/{cameras}  {time.perf_counter() - started:.1f} s", err=True)

    rows = compare_backends(small, backend, dtype=DTYPES[dtype], seed=seed, progress=report)
    table = [("quantity", "max abs error", "max rel error", "tolerance", "ok")]
    for row in rows:
        table.append(
            (
                row.quantity,
                f"{row.max_abs:.2e}",
                f"{row.max_rel:.2e}",
                f"{row.tolerance:.1e} ({row.measure})",
                "ok" if row.ok else "FAIL",
            )
        )
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    for cells in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    if not all(row.ok for row in rows):
        raise typer.Exit(1)
