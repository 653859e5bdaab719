"""The files of an optimization run, written into its output folder.

- ``mesh.obj`` (``mesh_0.obj``, ``mesh_1.obj``, ... with several meshes): the optimized meshes in
  world space with vertex colors (per-face colors averaged onto the vertices, for viewers).
- ``scene.json``: the optimized scene; ``microdr render`` renders it (per-face colors are in it).
- ``render_<i>.png``: the final render of camera ``i``.
- ``sheet_<i>.png``: target | start | result | ``|result - target|`` of camera ``i``: color, or
  the silhouette in gray where the target has no color.
- ``progress.gif``: target | render of camera 0, every few iterations, then the result.
- ``loss.png``: the loss, its (unweighted) terms, IoU and PSNR over the iterations.
- ``metrics.csv``: one row per iteration (:meth:`microdr.optimize.Step.row`).
- ``metrics.json``: ``start`` and ``final`` quality, each the mean and per-view ``iou`` and
  ``psnr``; ``final`` also has ``iterations``, ``seconds``, ``backend``, ``interrupted`` and
  ``stopped`` (why a NaN or an infinity ended the run early, else ``null``).

While a run writes into the folder it holds the lock file ``.microdr.lock`` there
(:func:`outdir_lock`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputError
from .files import check_writable_folder, write_files
from .images import encode_gif, encode_png, grid, to_uint8
from .losses import Metrics
from .mesh import save_obj
from .scene import Scene, SceneMesh, input_files, scene_to_json
from .targets import Targets

if TYPE_CHECKING:  # optimize.py imports this module
    from .optimize import History, Result

#: How long each frame of the progress animation shows.
FRAME_SECONDS = 0.1
#: The lock file of an output folder that a run is using.
LOCK = ".microdr.lock"

# Notes for the user (a lock taken over); with no logging set up, Python prints them on stderr.
logger = logging.getLogger(__name__)


def default_outdir(scene_path: str | Path) -> Path:
    """``<scene stem>_optimized`` in the current folder."""
    return Path(f"{Path(scene_path).stem}_optimized")


def check_outdir(outdir: Path, scene: Scene, targets: Targets) -> None:
    """Raise if ``outdir`` is, or holds, a file the run reads (scene, meshes, target files), or
    if it cannot be written into (found now, not after the run)."""
    inputs = input_files(scene)
    for name in targets.names:
        if Path(name).is_file():
            inputs.setdefault(Path(name).resolve(), "a target")
    folder = outdir.resolve()
    for path, role in inputs.items():
        if path == folder or folder in path.parents:
            raise InputError(str(outdir), "", f"refusing to write into it: it holds {path}, {role}")
    check_writable_folder(outdir)


@contextlib.contextmanager
def outdir_lock(outdir: Path, *, force: bool = False) -> Iterator[None]:
    """Hold ``outdir``'s lock while the block runs, so that two runs never write into one folder.

    The lock is the file ``outdir/.microdr.lock``, created (with the folder if missing) only if
    it does not exist (``O_EXCL``), holding the JSON ``{"pid", "host", "since"}`` of its run.
    A lock whose process no longer exists on this host is stale: it is taken over, with a note
    logged. Another lock raises :class:`InputError`, unless ``force``, which takes it over with a
    note. However the block ends, the lock is removed, unless another run has taken it over
    meanwhile; a folder that this created and nothing was written into is removed too.
    """
    path = outdir / LOCK
    created = not outdir.exists()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
    _acquire(path, mine.encode("utf-8"), force)
    try:
        yield
    finally:
        # Compared first: a run that took the lock over with force holds it now.
        with contextlib.suppress(OSError):
            if path.read_bytes() == mine.encode("utf-8"):
                path.unlink()
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                outdir.rmdir()


def _acquire(path: Path, mine: bytes, force: bool) -> None:
    """Create lock file ``path`` holding ``mine``, or replace a stale one, or with ``force`` any
    other one; else raise :class:`InputError` naming the folder and the run that holds it."""
    outdir = path.parent
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            held = path.read_bytes()
        except FileNotFoundError:  # its run ended just now
            return _acquire(path, mine, force)
        except OSError:
            held = b""
        holder = _lock_holder(held)
        if not force and not _is_gone(holder):
            raise InputError(
                str(outdir),
                "",
                f"in use by {_describe(holder)} ({LOCK}); wait for it to end, or give --force to "
                "write into the folder anyway",
            ) from None
        why = "--force" if force else "that run no longer exists"
        logger.warning("%s: taking over the lock of %s: %s", outdir, _describe(holder), why)
        # Replaced whole (write_files renames): a reader never sees a half-written lock. Two runs
        # taking over one stale lock at the same instant could both succeed; a lock cannot
        # prevent that without the kernel's help, and crashed runs are rare enough.
        write_files({path: mine})
        return
    except OSError as error:
        raise InputError(str(outdir), "", f"cannot create {LOCK}: {error.strerror}") from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(mine)


def _lock_holder(data: bytes) -> dict | None:
    """The ``pid``, ``host`` and ``since`` of a lock file's bytes; ``None`` if they are not a
    lock's (say, a run was killed between creating the file and writing it)."""
    with contextlib.suppress(ValueError):  # not JSON, or not UTF-8
        holder = json.loads(data)
        pid = holder.get("pid") if isinstance(holder, dict) else None
        # pid 0 and negative pids would name process groups in os.kill.
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            return holder
    return None


def _is_gone(holder: dict | None) -> bool:
    """Whether the run that holds a lock has surely ended: it ran on this host, and no process
    has its pid. (A pid reused since by another process keeps the lock: --force takes it.)"""
    if holder is None or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # none has it, or none could
        return True
    except OSError:  # it exists, but is another user's
        return False
    return False


def _describe(holder: dict | None) -> str:
    """``process 123 on host h since 2024-05-01 12:00:00``, or what is known of it."""
    if holder is None:
        return "another run (its lock file is unreadable)"
    return f"process {holder['pid']} on host {holder.get('host')} since {holder.get('since')}"


def mesh_files(count: int) -> list[str]:
    """The OBJ names of ``count`` meshes."""
    return ["mesh.obj"] if count == 1 else [f"mesh_{i}.obj" for i in range(count)]


def write_outputs(outdir: Path, result: Result, targets: Targets, extra: dict[str, bytes]) -> None:
    """Write the run's files, and ``extra`` (name -> bytes), into ``outdir``; each atomically."""
    names = mesh_files(len(result.scene.meshes))
    for scene_mesh, name in zip(result.scene.meshes, names):
        save_obj(scene_mesh.mesh, outdir / name, vertex_colors=_vertex_colors(scene_mesh))
    files = {**output_files(result, targets, names), **extra}
    write_files({outdir / name: data for name, data in files.items()})


def output_files(result: Result, targets: Targets, meshes: list[str]) -> dict[str, bytes]:
    """Every file but the meshes, by name; ``meshes`` are the OBJ names the scene refers to."""
    files = {"scene.json": _json(scene_to_json(result.scene, meshes))}
    for view in range(len(result.images)):
        files[f"render_{view}.png"] = encode_png(to_uint8(result.images[view, :3]))
        files[f"sheet_{view}.png"] = encode_png(_sheet(result, targets, view))
    files["progress.gif"] = _animation(result, targets)
    files["loss.png"] = _loss_plot(result.history)
    files["metrics.csv"] = _csv(result.history)
    files["metrics.json"] = _json(
        {
            "start": _metrics_json(result.start_metrics),
            "final": {
                **_metrics_json(result.metrics),
                "iterations": result.iterations,
                "seconds": result.seconds,
                "backend": result.backend,
                "interrupted": result.interrupted,
                "stopped": result.stopped,
            },
        }
    )
    return files


def _vertex_colors(scene_mesh: SceneMesh) -> torch.Tensor:
    """Per-vertex colors ``(V, 3)``: the mesh's own, or the mean of each vertex's faces' colors
    (vertices on no face get 0)."""
    if scene_mesh.color_mode == "vertex":
        return scene_mesh.colors
    faces = scene_mesh.mesh.faces.reshape(-1)
    count = scene_mesh.mesh.num_vertices
    total = torch.zeros(count, 3).index_add(0, faces, scene_mesh.colors.repeat_interleave(3, dim=0))
    faces_per_vertex = torch.bincount(faces, minlength=count).clamp(min=1)
    return total / faces_per_vertex[:, None]


def _shown(rgba: np.ndarray, has_rgb: bool) -> np.ndarray:
    """What pictures show of 8-bit RGBA ``(H, W, 4)``: the color, or the silhouette in gray
    where the target has no color; ``(H, W, 3)``."""
    return rgba[..., :3] if has_rgb else np.repeat(rgba[..., 3:], 3, axis=-1)


def _sheet(result: Result, targets: Targets, view: int) -> np.ndarray:
    target, start, final = (
        images[view] for images in (targets.images, result.start_images, result.images)
    )
    difference = (final.clamp(0, 1) - target).abs()
    panels = to_uint8(torch.stack([target, start, final, difference]))
    has_rgb = bool(targets.has_rgb[view])
    return grid(np.stack([_shown(panel, has_rgb) for panel in panels]), columns=4)


def _animation(result: Result, targets: Targets) -> bytes:
    """target | camera 0, at each saved frame and at the end."""
    has_rgb = bool(targets.has_rgb[0])
    target = _shown(to_uint8(targets.images[0]), has_rgb)
    renders = [frame.numpy() for frame in result.history.frames] + [to_uint8(result.images[0])]
    frames = [grid(np.stack([target, _shown(render, has_rgb)]), columns=2) for render in renders]
    return encode_gif(np.stack(frames), FRAME_SECONDS * len(frames))


def _loss_plot(history: History) -> bytes:
    """PNG of the loss and its terms (log scale), and of IoU and PSNR, over the iterations."""
    # Imported here: matplotlib takes a moment to load, and only this picture needs it. The
    # Figure API draws with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    losses, quality = figure.subplots(1, 2)
    iterations = [row["iteration"] for row in history.rows]
    fixed = {"iteration", "iou", "psnr", "lr", "sigma", "seconds"}
    for name in history.rows[0] if history.rows else {}:
        if name not in fixed:
            label = "loss (weighted sum)" if name == "loss" else name
            losses.plot(iterations, [row[name] for row in history.rows], label=label)
    losses.set(xlabel="iteration", yscale="log", title="loss")
    panels = ((quality, "iou", "IoU", "C0"), (quality.twinx(), "psnr", "PSNR (dB)", "C1"))
    for axis, name, label, color in panels:
        values = [np.nan if row[name] is None else row[name] for row in history.rows]
        axis.plot(iterations, values, color=color)
        axis.set_ylabel(label, color=color)
    quality.set(xlabel="iteration", title="views of each iteration")
    if history.rows:
        losses.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _csv(history: History) -> bytes:
    """The rows as CSV; a missing value (``None``) is an empty field."""
    if not history.rows:
        return b""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(history.rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history.rows)
    return text.getvalue().encode("utf-8")


def _metrics_json(metrics: Metrics) -> dict:
    views = [{"iou": iou, "psnr": psnr} for iou, psnr in zip(metrics.iou, metrics.psnr)]
    return {"iou": metrics.mean_iou, "psnr": metrics.mean_psnr, "views": views}


def _json(data: dict) -> bytes:
    """Strict JSON (RFC 8259 has no NaN or Infinity, and strict parsers refuse them): a
    non-finite number, e.g. the PSNR of a run that diverged, is written as ``null``."""
    return (_dumps(_finite_or_null(data)) + "\n").encode("utf-8")


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _dumps(value, level: int = 0) -> str:
    """JSON indented like ``json.dumps(indent=2)``, except that arrays of numbers or strings
    stay on one line (a vertex color is one line, not five)."""
    pad = "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [
            f"{pad}{json.dumps(key)}: {_dumps(item, level + 1)}" for key, item in value.items()
        ]
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        items = [pad + _dumps(item, level + 1) for item in value]
    else:
        return json.dumps(value, allow_nan=False)
    opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
    return opening + "\n" + ",\n".join(items) + "\n" + "  " * level + closing
