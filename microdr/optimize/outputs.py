"""The files of an optimization run, written into its output folder.

- ``mesh.obj`` (``mesh_0.obj``, ``mesh_1.obj``, ... with several meshes): the optimized meshes in
  world space with vertex colors (per-face colors averaged onto the vertices, for viewers); a
  textured mesh with its texture coordinates instead, and ``mesh.mtl`` naming ``texture.png``
  (8-bit RGB).
- ``scene.json``: the optimized scene; ``microdr render`` renders it (per-face colors are in it).
- ``render_<i>.png``: the final render of camera ``i``.
- ``sheet_<i>.png``: target | start | result | ``|result - target|`` of camera ``i``, labeled,
  enlarged to at least 256 pixels a side, the difference multiplied by the power of two (printed
  in its label) that brings it nearest to white, 1 % of it saturating at most; color, or the
  silhouette in gray where the target has no color. A held-out camera's target is labeled
  ``held out``.
- ``progress.gif``: the targets of the first cameras (up to four) over their renders, every few
  iterations, then the result; each frame titled with its iteration; held-out targets labeled.
- ``loss.png``: the loss, its (unweighted) terms, IoU and PSNR (those the run has, of the fit and
  the held-out views) over the iterations.
- ``metrics.csv``: one row per iteration (:meth:`microdr.optimize.result.Step.row`).
- ``metrics.json``: ``start`` and ``final`` quality (:class:`microdr.optimize.losses.Metrics`), each
  ``{"fit": ..., "held_out": ...}``: for the fit views and the held-out ones (``null`` when none
  is held out), the means ``iou``, ``soft_iou``, ``psnr``, ``psnr_inside`` (inside the target's
  silhouette) and ``views``, one ``{"camera", "iou", "soft_iou", "psnr", "psnr_inside"}`` per
  view; ``final`` also has ``iterations``, ``seconds``, ``world_size`` (the processes that ran
  it, :mod:`microdr.optimize.distributed`) and ``rank_seconds`` (each one's seconds of its own work in
  this part of the run), ``backend``, ``interrupted`` and ``stopped`` (why a NaN, an infinity or
  a lost rank ended the run early, else ``null``).

While a run writes into the folder it holds the lock file ``.microdr.lock`` there
(:func:`outdir_lock`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..io.files import check_writable_folder, process_exists, temporary_beside, write_files
from ..io.images import encode_gif, encode_png, to_uint8
from ..io.materials import textured_obj_files
from ..io.mesh import save_obj
from ..io.scene import Scene, SceneMesh, input_files, scene_to_json
from ..io.targets import Targets
from .drawing import Panel, Series, labeled_grid, line_charts
from .losses import Metrics
from .result import GIF_VIEWS, History, Result

#: How long each frame of the progress animation shows.
FRAME_SECONDS = 0.1
#: The progress animation's images are enlarged to at least this many pixels on their longer
#: side (less than the sheets': a GIF of 50 frames of 4 larger views takes long to encode).
GIF_SIDE = 128
#: The largest factor by which a sheet amplifies the difference to the target.
MAX_GAIN = 256
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

    The lock is the file ``outdir/.microdr.lock`` (the folder is created if missing), holding the
    JSON ``{"pid", "host", "since"}`` of its run, and locked with ``flock`` by that run for as
    long as it runs: the kernel releases that when the process ends, however it ends. So a lock
    file that no process has locked, and whose run no longer exists on this host, is stale: it is
    taken over, with a note logged; of several runs that try at once, exactly one does (the
    ``flock``), and the others are refused. Another lock raises :class:`InputError`, unless
    ``force``, which takes it over with a note. However the block ends, the lock is removed,
    unless another run has taken it over meanwhile; a folder that this created and nothing was
    written into is removed too.
    """
    path = outdir / LOCK
    created = not outdir.exists()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
    descriptor = _acquire(path, mine.encode("utf-8"), force)
    try:
        yield
    finally:
        # Compared first: a run that took the lock over with force holds it now. Removed before
        # it is unlocked: a run waiting on this file then finds it gone, and tries again.
        with contextlib.suppress(OSError):
            if path.read_bytes() == mine.encode("utf-8"):
                path.unlink()
        os.close(descriptor)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                outdir.rmdir()


def _acquire(path: Path, mine: bytes, force: bool) -> int:
    """Put a lock file holding ``mine`` at ``path``, locked, in place of none, of a stale one, or
    with ``force`` of any other one; return its open descriptor, which holds the ``flock``. Else
    raise :class:`InputError` naming the folder and the run that holds it."""
    outdir = path.parent
    while True:
        try:
            outdir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            descriptor = _take_over(path, mine, force)
            if descriptor is None:  # its run ended just now: try again
                continue
            return descriptor
        except OSError as error:
            raise InputError(str(outdir), "", f"cannot create {LOCK}: {error.strerror}") from None
        try:
            # Waits, if at all, for a run that saw the file still empty: it refuses (an
            # unreadable lock), or with --force takes it over; either way at once.
            _flock(descriptor, wait=True)
            os.write(descriptor, mine)
        except OSError as error:  # a full disk
            os.close(descriptor)
            path.unlink(missing_ok=True)
            raise InputError(str(outdir), "", f"cannot write {LOCK}: {error.strerror}") from None
        return descriptor


def _take_over(path: Path, mine: bytes, force: bool) -> int | None:
    """Replace lock file ``path`` by a new one holding ``mine`` if it is stale, or with
    ``force``, and return the new one's descriptor; ``None`` if ``path`` went away meanwhile;
    else raise."""
    try:
        theirs = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        live = not _flock(theirs, wait=False)  # its run is running, or taking it over
        if not live and os.fstat(theirs).st_ino != _inode(path):
            return None  # its run removed it just before we locked it: a new one may be there
        try:
            holder = _lock_holder(path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError:
            holder = None
        # A lock file that nobody has locked may still be a live run's: one on another host (a
        # shared folder), or of a microDR from before the flock.
        if not force and (live or not _is_gone(holder)):
            raise InputError(
                str(path.parent),
                "",
                f"in use by {_describe(holder)} ({LOCK}); wait for it to end, or give --force to "
                "write into the folder anyway",
            ) from None
        why = "--force" if force else "that run no longer exists"
        logger.warning("%s: taking over the lock of %s: %s", path.parent, _describe(holder), why)
        # Written and locked under another name, then renamed over it: no run sees it half
        # written, and one that opened the old file finds, once it locks that, that it is no
        # longer the lock file, and tries again.
        temporary = temporary_beside(path)
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(descriptor, mine)
            _flock(descriptor, wait=False)  # nobody else knows the file yet
            os.replace(temporary, path)
        except BaseException:
            os.close(descriptor)
            temporary.unlink(missing_ok=True)
            raise
        return descriptor
    except OSError as error:
        raise InputError(str(path.parent), "", f"cannot replace {LOCK}: {error.strerror}") from None
    finally:
        os.close(theirs)


def _flock(descriptor: int, *, wait: bool) -> bool:
    """Lock the file of ``descriptor`` (``flock``, exclusive) for as long as it is open; return
    ``False`` if another open file holds it and not ``wait``. Where the filesystem has no
    ``flock`` (some network and FUSE ones), nothing is locked: the pid in the file is all there
    is, as with a microDR from before the flock."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
    return True


def _inode(path: Path) -> int | None:
    """The inode number of ``path``, ``None`` if there is no such file."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


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
    return not process_exists(holder["pid"])


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
    files = {}
    for scene_mesh, name in zip(result.scene.meshes, names):
        if scene_mesh.texture is not None:  # the scene's only mesh (scene.py)
            files.update(textured_obj_files(scene_mesh.mesh, name, "texture.png"))
        else:
            save_obj(scene_mesh.mesh, outdir / name, vertex_colors=_vertex_colors(scene_mesh))
    files.update({**output_files(result, targets, names), **extra})
    write_files({outdir / name: data for name, data in files.items()})


def output_files(result: Result, targets: Targets, meshes: list[str]) -> dict[str, bytes]:
    """Every file but the meshes, by name; ``meshes`` are the OBJ names the scene refers to."""
    files = {"scene.json": _json(scene_to_json(result.scene, meshes))}
    for view in range(len(result.images)):
        files[f"render_{view}.png"] = encode_png(to_uint8(result.images[view, :3]))
        files[f"sheet_{view}.png"] = encode_png(_sheet(result, targets, view))
    frames = _animation_frames(result, targets)
    files["progress.gif"] = encode_gif(frames, FRAME_SECONDS * len(frames))
    files["loss.png"] = _loss_plot(result.history)
    files["metrics.csv"] = _csv(result.history)
    files["metrics.json"] = _json(
        {
            "start": _quality_json(result.start_metrics, result.start_held_out_metrics),
            "final": {
                **_quality_json(result.metrics, result.held_out_metrics),
                "iterations": result.iterations,
                "seconds": result.seconds,
                "world_size": max(1, len(result.rank_seconds)),
                "rank_seconds": list(result.rank_seconds),
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
    """target | start | result | ``|result - target|`` of camera ``view``, labeled, the
    difference multiplied by :func:`_gain` (of the channels shown)."""
    has_rgb = bool(targets.has_rgb[view])
    shown = slice(0, 3) if has_rgb else slice(3, 4)
    target, start, final = (
        images[view] for images in (targets.images, result.start_images, result.images)
    )
    difference = (final.clamp(0, 1) - target).abs()
    gain = _gain(difference[shown])
    panels = to_uint8(torch.stack([target, start, final, difference * gain]))
    labels = [
        f"target (camera {view}{_held_out(result, view)})", "start", "result",
        f"|result - target| x {gain}",
    ]
    return labeled_grid(np.stack([_shown(panel, has_rgb) for panel in panels]), labels, 4)


def _held_out(result: Result, view: int) -> str:
    """``", held out"`` for a held-out camera's labels, else nothing."""
    return ", held out" if view in result.held_out else ""


def _gain(difference: torch.Tensor) -> int:
    """The power of two, 1 to :data:`MAX_GAIN`, that brings the difference nearest to white, with
    at most 1 % of its visible values (> 1/2 of an 8-bit step) saturating: small differences would
    look black, and a few large ones should not decide for all."""
    visible = difference[difference > 0.5 / 255]
    if len(visible) == 0:
        return 1
    typical = float(torch.quantile(visible.float(), 0.99))
    gain = 1
    while gain < MAX_GAIN and typical * gain * 2 <= 1:
        gain *= 2
    return gain


def _animation_frames(result: Result, targets: Targets) -> np.ndarray:
    """The frames ``(N, H, W, 3)`` of the progress animation: the targets of the first cameras
    over their renders, at each saved frame and at the end, each titled with its iteration."""
    views = min(GIF_VIEWS, len(result.images))
    has_rgb = [bool(flag) for flag in targets.has_rgb[:views]]
    shown_targets = [
        _shown(image, rgb) for image, rgb in zip(to_uint8(targets.images[:views]), has_rgb)
    ]
    labels = [f"target (camera {view}{_held_out(result, view)})" for view in range(views)]
    labels += [f"camera {view}" for view in range(views)]
    renders = [
        *zip(result.history.frame_iterations, (frame.numpy() for frame in result.history.frames)),
        (result.iterations, to_uint8(result.images[:views])),
    ]
    frames = []
    for index, (iteration, images) in enumerate(renders):
        last = index == len(renders) - 1
        title = f"{'result, ' if last else ''}after {iteration} iteration{'s' * (iteration != 1)}"
        shown = [_shown(image, rgb) for image, rgb in zip(images, has_rgb)]
        frames.append(labeled_grid(np.stack(shown_targets + shown), labels, views, title, GIF_SIDE))
    return np.stack(frames)


#: The curves of the metrics panels of ``loss.png``: the panel's title, then each curve's key in
#: the history's rows and its label. The first is drawn first, under the others: the soft IoU of
#: each iteration's few views is noisy, and would hide the hard ones.
METRIC_CURVES = (
    ("IoU", (
        ("soft_iou", "soft, the iteration's views"),
        ("iou", "hard, fit views"),
        ("held_out_iou", "hard, held-out views"),
    )),
    ("PSNR (dB)", (("psnr", "the iteration's views"), ("held_out_psnr", "held-out views"))),
)  # fmt: skip


def _loss_plot(history: History) -> bytes:
    """PNG of the loss and its (unweighted) terms, then IoU and PSNR where the run has them, over
    the iterations; a y axis is logarithmic when its values span more than a decade. Metrics
    measured at some iterations only (the hard IoU) are drawn through those."""
    iterations = [row["iteration"] for row in history.rows]
    fixed = {"iteration", "lr", "sigma", "seconds"}
    fixed |= {key for _, curves in METRIC_CURVES for key, _ in curves}
    first = history.rows[0] if history.rows else {"loss": None}
    names = [name for name in first if name not in fixed]
    losses = [
        Series("loss (weighted sum)" if name == "loss" else name, iterations,
               [row[name] for row in history.rows])
        for name in names
    ]  # fmt: skip
    panels = [Panel("loss and its unweighted terms", "iteration", losses)]
    for title, curves in METRIC_CURVES:
        series = []
        for key, label in curves:
            points = [(row["iteration"], row.get(key)) for row in history.rows]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                series.append(Series(label, *zip(*points)))
        if series:
            panels.append(Panel(title, "iteration", series))
    return encode_png(line_charts(panels))


def _csv(history: History) -> bytes:
    """The rows as CSV; a missing value (``None``) is an empty field."""
    if not history.rows:
        return b""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(history.rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history.rows)
    return text.getvalue().encode("utf-8")


def _quality_json(fit: Metrics, held_out: Metrics | None) -> dict:
    """``{"fit": ..., "held_out": ...}`` of metrics.json, ``held_out`` ``None`` without one."""
    return {
        "fit": _metrics_json(fit),
        "held_out": None if held_out is None else _metrics_json(held_out),
    }


def _metrics_json(metrics: Metrics) -> dict:
    views = [
        {"camera": camera, "iou": iou, "soft_iou": soft_iou, "psnr": psnr, "psnr_inside": inside}
        for camera, iou, soft_iou, psnr, inside in zip(
            metrics.cameras, metrics.iou, metrics.soft_iou, metrics.psnr, metrics.psnr_inside
        )
    ]
    return {
        "iou": metrics.mean_iou,
        "soft_iou": metrics.mean_soft_iou,
        "psnr": metrics.mean_psnr,
        "psnr_inside": metrics.mean_psnr_inside,
        "views": views,
    }


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
