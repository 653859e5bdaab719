"""Recover geometry, colors, lights and camera poses from images: the optimization loop.

A scene is the starting guess; targets hold one image per camera. Adam changes the free
parameters (``optimize.parameters``) so that the scene's renders match the targets:

```python
from microdr.optimize.loop import Optimization, optimize
from microdr.io.targets import Targets

result = optimize(scene, Targets.from_images(images))      # the whole run
result.meshes[0].vertices, result.colors[0]                 # (V, 3) each: the optimized mesh
result.metrics.mean_iou, result.metrics.psnr                # how well it matches (fit views)
result.held_out_metrics                                     # views the loss never saw, if any

run = Optimization(scene, targets, loss_fn=my_loss)         # or one iteration at a time
for step in run.steps():
    print(step.iteration, step.loss, step.soft_iou)
result = run.result()
```

A custom ``loss_fn(evaluation) -> Tensor | dict[str, Tensor]`` replaces the weighted terms of
``optimize.loss``: it gets a :class:`~microdr.optimize.losses.Evaluation` (the iteration's renders,
targets and vertices) and may call the terms of :mod:`microdr.optimize.losses` itself; a dict's values are
summed and logged by name.

On several processes (torch.distributed, :mod:`microdr.optimize.distributed`): the program calls
``torch.distributed.init_process_group`` (``gloo`` for the CPU backend, ``nccl`` for CUDA), then
every rank builds the same :class:`Optimization` or calls :func:`optimize` with the same
arguments; rank ``r`` of ``N`` renders the ``r``-th of ``N`` contiguous shares of each
iteration's views, and the result is that of one process, bit for bit (CPU backend). Rank 0
alone measures the hard metrics and writes; :func:`optimize` returns the result there and
``None`` on the others. A custom ``loss_fn`` sees all views at once, so it needs one process.

A NaN or an infinity ends a run: at the first iteration whose loss or gradients hold one, or
whose update would put one into a parameter or the mesh, :class:`NonFiniteError` is raised and
the run stays at the end of the iteration before, its last good state.

Free parameters (each starts where the scene is):

- ``vertices``: world-space offsets ``(V, 3)`` added to the start mesh; or, with
  ``vertex_parametrization: "bounded"``, SoftRas's parametrization that keeps vertices in the box
  ``[-1, 1]^3``: ``v = sigmoid(logit|v0| + d) * sign(v0)``, then the box squeezed towards a center
  ``tanh(c)``. It needs ``|v0| < 1`` for every coordinate; a coordinate that is exactly 0 keeps
  its sign of 0 and stays at the center's coordinate (as in SoftRas).
- ``translation`` ``(3,)`` and ``scale`` ``(3,)`` (a log scale per axis, about the start mesh's
  centroid), applied to all meshes after the vertices.
- ``colors``: per-vertex or per-face albedo as each mesh has it, ``sigmoid`` of free logits so
  that it stays in ``(0, 1)`` (start colors are clamped to ``[1e-4, 1 - 1e-4]``).
- ``light``: the ambient term, each directional light's direction and intensity (intensities
  ``softplus`` of free values, so >= 0). Needs a ``lights`` section.
- ``camera``: an eye offset ``(3,)`` per camera (target and up stay).

With ``optimize.remesh`` (:class:`~microdr.io.scene.RemeshSettings`), every few iterations the
free vertices are baked into the start mesh, which :func:`microdr.optimize.remesh.remesh` remakes toward
a target edge length; the displacement starts over from 0 there, and Adam's moments and the
colors follow the new vertices and faces.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..errors import InputError, MicroDRError
from ..io.files import remove_stale_temporaries, write_files
from ..io.images import to_uint8
from ..io.mesh import Mesh, Texture
from ..io.scene import (
    LOSS_TERMS,
    Camera,
    DirectionalLight,
    Lights,
    OptimizeSettings,
    Scene,
    Transform,
    held_out_views,
    views_problem,
)
from ..io.targets import SOURCE as TARGETS_SOURCE
from ..io.targets import Targets
from ..raster import preferred_device, resolve_backend
from ..raster.cpu import kernels_own_the_cores
from ..render import (
    FaceSoup, hard_silhouettes, mesh_albedo, render_faces, render_views, scene_faces, shaded_corners,
)  # fmt: skip
from ..view.camera import CameraTensors
from ..view.shading import LightTensors
from . import distributed
from .adam import Adam
from .checkpoint import Journal, read_checkpoint
from .distributed import PeerLost
from .losses import TERMS, VIEW_TERMS, Evaluation, MeshTopology, Metrics, view_mean
from .outputs import check_outdir, outdir_lock, write_outputs
from .remesh import Remeshed, closed_manifold_problem, remesh
from .result import GIF_VIEWS, History, Result, Step

#: Parameters that move or reshape what the cameras see, so the silhouette constrains them.
GEOMETRY_PARAMETERS = ("vertices", "translation", "scale", "camera")
#: SoftRas's regularizer weights for deforming a sphere (``examples/demo_deform.py``).
DEFAULT_REGULARIZERS = {"laplacian": 0.03, "flatten": 0.0003}
#: With free vertices and silhouettes alone, SoftRas's Laplacian but no flatten term: flatten
#: charges every sharp fold, and a thin part such as a wing is two sheets folded at its rim;
#: seen edge-on it must end thinner than a pixel, which flatten resists. SoftRas's airplane, fit
#: on 60 views and judged on 60 others (hard IoU, 12 views per iteration, 1500 iterations):
#: flatten 0.0003 0.928 (min 0.819), 0.0001 0.931 (0.815), none 0.933 (0.846); seeds 1 and 2
#: without it 0.952 (0.844) and 0.938 (0.867).
DEFAULT_SILHOUETTE_REGULARIZERS = {**DEFAULT_REGULARIZERS, "flatten": 0.0}
#: With free vertices and color targets, sigma falls from ``render.sigma`` to this fraction of
#: it: a photo's edges are sharp, and a soft edge spreads the object's color over the background
#: (PSNR of a red disc from an icosphere: 27 dB ending at ``render.sigma`` 1e-4, 31 at 1e-5).
DEFAULT_FINAL_SIGMA_FRACTION = 0.1
#: With free vertices and silhouettes alone, sigma falls from this multiple of ``render.sigma``
#: to :data:`DEFAULT_SILHOUETTE_SIGMA_END` of it: wide edges first pull the whole outline in,
#: then the render nears the hard limit (sigma -> 0) by which it is judged, so thin parts end
#: sharp instead of blurred into their surroundings. SoftRas's airplane, fit on 60 views and
#: judged on 60 others (hard IoU, scripts/airplane_heldout.py): sigma 1e-4 throughout 0.772;
#: 3e-4 -> 3e-6 0.931; 1e-3 -> 3e-6 0.913.
DEFAULT_SILHOUETTE_SIGMA_START = 3.0
DEFAULT_SILHOUETTE_SIGMA_END = 0.03
#: With free vertices and a target with color, the edge-length term's default weight: it keeps
#: the faces even where the outline is only the edge of a color region, so that rim faces do not
#: fold and show their start colors there (a red disc on black from an icosphere, 128 x 128:
#: 29.4 dB without it, 31.8 dB with it, scripts/rgb_targets.py).
DEFAULT_RGB_EDGE_LENGTH = 0.1
#: The progress animation keeps at most about this many frames, evenly spaced.
GIF_FRAMES = 50
#: The run measures the hard IoU of every fit view, and the metrics of the held-out views (see
#: :class:`Step`), at its first iteration and about this many more, evenly spaced, the last
#: included: a hard render of every camera costs 1.6 iterations of SoftRas's airplane (120
#: cameras, 24 drawn per iteration), so 20 in 1000 iterations add about 3 %.
MEASURES = 20
#: Start colors are clamped this far inside (0, 1), where their logits are finite.
COLOR_MARGIN = 1e-4
#: The name of the checkpoint file in an output folder.
CHECKPOINT = "checkpoint.pt"
#: The signals that stop a run at the end of its last finished iteration: Ctrl-C (SIGINT), and,
#: under :func:`stop_signals`, SIGTERM (``kill``, ``timeout``, ``docker stop``, systemd, batch
#: schedulers) and SIGHUP (the terminal closed). Windows has no SIGHUP.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)

# Notes for the user (a signal deferred; free vertices without silhouettes); with no logging set
# up, Python prints them on stderr.
logger = logging.getLogger(__name__)

LossFunction = Callable[[Evaluation], "torch.Tensor | dict[str, torch.Tensor]"]


class NonFiniteError(MicroDRError):
    """An iteration met a NaN or an infinity, and the run stopped before it.

    iteration: its 0-based index (the message counts from 1, as the command's progress does); the
    run is left at its start. quantity: what held it, e.g. ``"the loss"``, ``"the gradient of
    vertices (displacement)"``, ``"the mesh after its update"``. result: set by :func:`optimize`
    to the result of the run's last good state.
    """

    def __init__(self, iteration: int, quantity: str, detail: str):
        super().__init__(f"iteration {iteration + 1}: {quantity} is not finite ({detail})")
        self.iteration = iteration
        self.quantity = quantity
        self.result: Result | None = None


# ---------------------------------------------------------------------------------------------
# Settings for a task


def resolve_settings(
    scene: Scene, targets: Targets, settings: OptimizeSettings | None = None
) -> OptimizeSettings:
    """``settings`` (default: the scene's ``optimize`` section) with what it leaves out chosen
    for the task, and checked against the scene and the targets.

    Parameters: ``vertices``, and ``colors`` when a target has color. Loss: ``rgb_l2`` when a
    target has color; ``silhouette_iou`` when one has a silhouette and the geometry is free (or
    nothing else constrains anything); when the vertices are free, SoftRas's Laplacian (0.03)
    and, with a target with color, its flatten term (0.0003) and edge length
    (:data:`DEFAULT_RGB_EDGE_LENGTH`); with silhouettes alone no flatten
    (:data:`DEFAULT_SILHOUETTE_REGULARIZERS`). Sigma schedule, with free vertices: with a target
    with color, from ``render.sigma`` down to :data:`DEFAULT_FINAL_SIGMA_FRACTION` of it; with
    silhouettes alone, from :data:`DEFAULT_SILHOUETTE_SIGMA_START` to
    :data:`DEFAULT_SILHOUETTE_SIGMA_END` times ``render.sigma``; else none.

    Free vertices with a target that has no silhouette (an RGB image whose silhouette could not
    be derived, :func:`~microdr.io.targets.derive_silhouette`) log a warning: colors alone pull
    the outline through the faint gradient of its edge pixels, which the regularizers outweigh.
    """
    settings = settings or scene.optimize or OptimizeSettings()
    has_rgb = bool(targets.has_rgb.any())
    has_silhouette = bool(targets.has_silhouette.any())
    parameters = settings.parameters or (("vertices", "colors") if has_rgb else ("vertices",))
    loss = settings.loss or _default_loss(parameters, has_rgb, has_silhouette)
    sigma_schedule = settings.sigma_schedule
    if sigma_schedule is None and "vertices" in parameters:
        sigma = scene.render.sigma
        if has_rgb:
            sigma_schedule = (sigma, sigma * DEFAULT_FINAL_SIGMA_FRACTION)
        elif has_silhouette:
            start, end = DEFAULT_SILHOUETTE_SIGMA_START, DEFAULT_SILHOUETTE_SIGMA_END
            sigma_schedule = (sigma * start, sigma * end)
    if "light" in parameters and scene.lights is None:
        raise InputError(
            scene.source, "", '"light" is a free parameter but there is no "lights" section'
        )
    if not scene.meshes:
        raise InputError(scene.source, "meshes", "nothing to optimize: the scene has no meshes")
    if "colors" in parameters and not has_rgb:
        raise InputError(TARGETS_SOURCE, "", '"colors" is a free parameter but no target has color')
    if not has_rgb and (loss["rgb_l1"] > 0 or loss["rgb_l2"] > 0):
        raise InputError(TARGETS_SOURCE, "", "the loss compares colors but no target has color")
    if not has_silhouette and loss["silhouette_iou"] > 0:
        raise InputError(
            TARGETS_SOURCE, "", 'the loss has "silhouette_iou" but no target has a silhouette'
        )
    problem = views_problem(settings, len(scene.cameras))
    if problem is not None:
        key, message = problem
        raise InputError(scene.source, f"optimize.{key}", message)
    if settings.remesh is not None:
        _check_remeshable(scene, parameters, settings.vertex_parametrization)
    if "texture" in parameters:
        _check_texturable(scene, parameters, settings, has_rgb)
    if "vertices" in parameters:
        _warn_of_missing_silhouettes(targets)
    return replace(settings, parameters=parameters, loss=loss, sigma_schedule=sigma_schedule)


def _check_remeshable(scene: Scene, parameters: tuple[str, ...], parametrization: str) -> None:
    """Raise unless ``optimize.remesh`` can run: free vertices, offsets, closed manifolds."""
    if "vertices" not in parameters:
        raise InputError(
            scene.source, "optimize.remesh", 'remeshing needs "vertices" among the parameters'
        )
    if parametrization != "offset":
        # Remeshing puts midpoints on the planes where a coordinate is 0, where a bounded
        # coordinate (sigmoid of logit |v|) cannot move at all, and barely near them.
        raise InputError(
            scene.source, "optimize.remesh",
            'remeshing needs vertex_parametrization "offset": bounded vertices on or near a '
            "coordinate plane cannot move off it, and remeshing puts vertices there",
        )  # fmt: skip
    for index, scene_mesh in enumerate(scene.meshes):
        problem = closed_manifold_problem(scene_mesh.mesh.faces, scene_mesh.mesh.num_vertices)
        if problem is not None:
            raise InputError(
                scene.source, f"meshes[{index}]",
                f"optimize.remesh needs closed manifold meshes, and this one is not: {problem}",
            )  # fmt: skip


def _check_texturable(scene: Scene, parameters: tuple[str, ...], settings: OptimizeSettings, has_rgb: bool) -> None:
    """Raise unless a free ``"texture"`` can be fit: one mesh with texture coordinates, a
    texture to start from (its own, or ``optimize.texture_resolution``), color targets, no
    lights, no free colors and no remeshing (which would drop the texture coordinates)."""
    if not has_rgb:
        raise InputError(TARGETS_SOURCE, "", '"texture" is a free parameter but no target has color')
    if len(scene.meshes) != 1 or scene.meshes[0].mesh.face_uvs is None:
        raise InputError(
            scene.source, "meshes",
            '"texture" is a free parameter: the scene needs one mesh, from an OBJ file with texture coordinates '
            "(vt) and a material library (mtllib)",
        )  # fmt: skip
    if scene.meshes[0].texture is None and settings.texture_resolution is None:
        raise InputError(
            scene.source, "optimize", '"texture" is a free parameter but the mesh has none: give texture_resolution'
        )
    if "colors" in parameters:
        raise InputError(scene.source, "optimize.parameters", 'both "colors" and "texture" are free: a textured mesh has no colors')
    if settings.remesh is not None:
        raise InputError(scene.source, "optimize.remesh", "remeshing would drop the texture coordinates")
    if scene.lights is not None:
        raise InputError(scene.source, "lights", "lights do not shade textured meshes")


def start_texture(scene: Scene, settings: OptimizeSettings) -> Scene:
    """``scene`` with its mesh drawn with the texture a free ``"texture"`` starts from: gray
    (0.5) at ``settings.texture_resolution`` ``(width, height)`` when given (wrapping as the
    mesh's own texture does, or around), else its own; ``scene`` itself otherwise."""
    if "texture" not in settings.parameters or settings.texture_resolution is None:
        return scene
    scene_mesh = scene.meshes[0]
    width, height = settings.texture_resolution
    wrap = scene_mesh.texture.wrap if scene_mesh.texture is not None else True
    gray = Texture(torch.full((height, width, 3), 0.5), wrap)
    return replace(scene, meshes=(replace(scene_mesh, texture=gray),))


def _warn_of_missing_silhouettes(targets: Targets) -> None:
    """One warning naming the first target without a silhouette, why, and how many more."""
    missing = [(name, why) for name, why in zip(targets.names, targets.no_silhouette) if why]
    if not missing:
        return
    (name, why), more = missing[0], len(missing) - 1
    others = f" (and {more} more target{'s' if more > 1 else ''})" if more else ""
    logger.warning(
        "%s: no silhouette: %s%s; with free vertices, color alone shapes the mesh poorly: "
        "set render.background to the image's background color, or give RGBA or grayscale",
        name, why, others,
    )  # fmt: skip


def _default_loss(parameters: tuple[str, ...], has_rgb: bool, has_silhouette: bool) -> dict:
    loss = dict.fromkeys(LOSS_TERMS, 0.0)
    if has_rgb:
        loss["rgb_l2"] = 1.0
    geometry = any(name in GEOMETRY_PARAMETERS for name in parameters)
    if has_silhouette and (geometry or not has_rgb):
        loss["silhouette_iou"] = 1.0
    if "vertices" in parameters:
        loss.update(DEFAULT_REGULARIZERS if has_rgb else DEFAULT_SILHOUETTE_REGULARIZERS)
        if has_rgb:
            loss["edge_length"] = DEFAULT_RGB_EDGE_LENGTH
    return loss


def ranks_problem(settings: OptimizeSettings, cameras: int, ranks: int) -> str | None:
    """Why ``ranks`` processes cannot share the views of an iteration (each renders one or
    more), or ``None`` when they can."""
    fit = cameras - len(held_out_views(settings.holdout, cameras))
    views = min(settings.views_per_step or fit, fit)
    if ranks <= views:
        return None
    return (
        f"{ranks} ranks for {views} views per iteration: each rank renders whole views, so at "
        f"most {views} processes can share them"
    )


def sigma_at(settings: OptimizeSettings, scene: Scene, iteration: int) -> float:
    """``render.sigma`` of ``iteration`` (0-based; ``settings.iterations`` means after the run):
    geometric from the schedule's start to its end over the iterations, else the scene's."""
    if settings.sigma_schedule is None:
        return scene.render.sigma
    start, end = settings.sigma_schedule
    progress = min(iteration / max(settings.iterations - 1, 1), 1.0)
    return start * (end / start) ** progress


def remesh_length(settings: OptimizeSettings, done: int) -> float | None:
    """The target edge length of the remesh due once ``done`` iterations are done, ``None``
    when none is: one every ``remesh.every`` iterations up to ``remesh.until`` of them (not
    after the last), the length geometric from ``edge_length``'s start at the first to its end
    at the last."""
    schedule = settings.remesh
    if schedule is None or done % schedule.every or done >= settings.iterations:
        return None
    last = int(schedule.until * settings.iterations) // schedule.every * schedule.every
    last = min(last, (settings.iterations - 1) // schedule.every * schedule.every)
    if done > last:
        return None
    start, end = schedule.edge_length
    progress = (done - schedule.every) / max(last - schedule.every, 1)
    return start * (end / start) ** progress


def lr_at(settings: OptimizeSettings, iteration: int) -> float:
    """Adam's learning rate at ``iteration``: constant, or cosine from ``lr`` towards 0."""
    if settings.lr_schedule == "cosine":
        return settings.lr * 0.5 * (1 + math.cos(math.pi * iteration / settings.iterations))
    return settings.lr


# ---------------------------------------------------------------------------------------------
# Parameters


class Parameters(torch.nn.Module):
    """The free parameters of one optimization, and the scene quantities they give.

    Built from the scene's world-space triangle soup (:func:`~microdr.render.scene_faces`);
    every quantity that is not free comes from the scene unchanged. All tensors share ``dtype``
    and ``device``. :meth:`remesh` remakes ``scene``'s meshes (in world space), ``start`` and
    ``topology``, and the per-vertex and per-face parameters with them.
    """

    #: The entry of ``optimize.parameters`` that each attribute serves, to name it in messages.
    FREE = {
        "displacement": "vertices", "center": "vertices", "translation": "translation",
        "log_scale": "scale", "color_logits": "colors", "ambient": "light", "directions": "light",
        "intensities": "light", "eye_offsets": "camera", "texture_logits": "texture",
    }  # fmt: skip

    def __init__(
        self, scene: Scene, settings: OptimizeSettings, *, dtype=torch.float32, device=None
    ):
        super().__init__()
        self.scene = scene
        self.names = settings.parameters
        self.bounded = settings.vertex_parametrization == "bounded"
        self._start_at(scene_faces(scene, dtype=dtype, device=device))
        self.centroid = self.start.vertices.mean(dim=0)
        like = self.start.vertices
        if "vertices" in self.names:
            if self.bounded:
                _check_inside_box(scene, self.start.vertices)
                self.center = torch.nn.Parameter(like.new_zeros(3))
            self.displacement = torch.nn.Parameter(torch.zeros_like(like))
        if "translation" in self.names:
            self.translation = torch.nn.Parameter(like.new_zeros(3))
        if "scale" in self.names:
            self.log_scale = torch.nn.Parameter(like.new_zeros(3))
        if "colors" in self.names:
            self.color_logits = torch.nn.ParameterList(
                torch.logit(m.colors.to(like).clamp(COLOR_MARGIN, 1 - COLOR_MARGIN))
                for m in scene.meshes
            )
        if "light" in self.names:
            lights = LightTensors.of(scene.lights, dtype=dtype, device=device)
            self.ambient = torch.nn.Parameter(_inverse_softplus(lights.ambient))
            self.directions = torch.nn.Parameter(lights.directions)
            self.intensities = torch.nn.Parameter(_inverse_softplus(lights.intensities))
        if "camera" in self.names:
            self.eye_offsets = torch.nn.Parameter(like.new_zeros(len(scene.cameras), 3))
        if "texture" in self.names:  # the scene's start texture (start_texture), as logits
            image = self.start.texture.image.clamp(COLOR_MARGIN, 1 - COLOR_MARGIN)
            self.texture_logits = torch.nn.Parameter(torch.logit(image))

    def _start_at(self, start: FaceSoup) -> None:
        """Set the start mesh, and the :class:`~microdr.optimize.losses.MeshTopology` of its faces."""
        self.start = start
        self.topology = MeshTopology.of(start.faces, len(start.vertices))

    def label(self, name: str) -> str:
        """A name from ``named_parameters()`` as messages show it, e.g. ``scale (log_scale)``."""
        return f"{self.FREE[name.split('.')[0]]} ({name})"

    @torch.no_grad()
    def non_finite(self) -> tuple[str, str] | None:
        """The first parameter, else the mesh, that holds a NaN or an infinity, as
        :func:`_first_non_finite` names it; ``None`` when all are finite. The mesh is checked too:
        a finite log scale can still overflow its ``exp``."""
        named = [(self.label(name), value) for name, value in self.named_parameters()]
        return _first_non_finite([*named, ("the mesh", self.vertices())])

    def deformed(self) -> torch.Tensor:
        """World-space vertices of all meshes ``(V, 3)`` with the free vertices applied, before
        the scale and the translation."""
        vertices = self.start.vertices
        if "vertices" in self.names:
            if self.bounded:
                vertices = _bounded(vertices, self.displacement, self.center)
            else:
                vertices = vertices + self.displacement
        return vertices

    def vertices(self) -> torch.Tensor:
        """World-space vertices of all meshes ``(V, 3)``."""
        vertices = self.deformed()
        if "scale" in self.names:
            vertices = self.centroid + (vertices - self.centroid) * self.log_scale.exp()
        if "translation" in self.names:
            vertices = vertices + self.translation
        return vertices

    def colors(self) -> list[torch.Tensor]:
        """Each mesh's albedo, ``(V_i, 3)`` or ``(F_i, 3)`` as its ``color_mode`` says."""
        if "colors" in self.names:
            return [torch.sigmoid(logits) for logits in self.color_logits]
        return [m.colors.to(self.start.vertices) for m in self.scene.meshes]

    def albedo(self) -> torch.Tensor:
        """Per-corner albedo of all faces ``(F, 3, 3)``."""
        if "colors" not in self.names:
            return self.start.albedo
        return torch.cat(
            [
                mesh_albedo(replace(scene_mesh, colors=colors))
                for scene_mesh, colors in zip(self.scene.meshes, self.colors())
            ]
        )

    def texture(self) -> Texture | None:
        """The texture the mesh is drawn with (the run's dtype and device), or ``None``."""
        if "texture" not in self.names:
            return self.start.texture
        return replace(self.start.texture, image=torch.sigmoid(self.texture_logits))

    def lights(self) -> Lights | LightTensors | None:
        if "light" not in self.names:
            return self.scene.lights
        softplus = torch.nn.functional.softplus
        return LightTensors(softplus(self.ambient), self.directions, softplus(self.intensities))

    def poses(self) -> list[CameraTensors] | None:
        """Per-camera poses, or ``None`` when the cameras are not free."""
        if "camera" not in self.names:
            return None
        like = self.start.vertices
        poses = []
        for camera, offset in zip(self.scene.cameras, self.eye_offsets):
            pose = CameraTensors.of(camera, dtype=like.dtype, device=like.device)
            poses.append(replace(pose, eye=pose.eye + offset))
        return poses

    @torch.no_grad()
    def solved_scene(self, sigma: float) -> Scene:
        """The scene as the parameters now make it, rendered with ``sigma``: each mesh in world
        space (identity transform) with its colors, the lights and the cameras' eyes; float32
        CPU tensors and Python floats, like a loaded scene."""
        vertices = self.vertices().float().cpu()
        meshes, first = [], 0
        for scene_mesh, colors in zip(self.scene.meshes, self.colors()):
            count = scene_mesh.mesh.num_vertices
            colors = colors.float().cpu()
            texture = self.texture() if scene_mesh.texture is not None else None  # the only mesh
            if texture is not None:
                texture = replace(texture, image=texture.image.float().cpu())
            # A textured mesh's colors are its texture's.
            vertex_colors = colors if scene_mesh.color_mode == "vertex" and texture is None else None
            mesh = Mesh(vertices[first : first + count], scene_mesh.mesh.faces, vertex_colors,
                        scene_mesh.mesh.face_uvs, texture)
            meshes.append(replace(scene_mesh, mesh=mesh, transform=Transform(), colors=colors, texture=texture))
            first += count
        cameras = self.scene.cameras
        if "camera" in self.names:
            cameras = tuple(
                replace(camera, eye=tuple(pose.eye.tolist()))
                for camera, pose in zip(cameras, self.poses())
            )
        lights = self.lights()
        if isinstance(lights, LightTensors):
            lights = Lights(
                ambient=lights.ambient.item(),
                directional=tuple(
                    DirectionalLight(
                        tuple(torch.nn.functional.normalize(d, dim=0).tolist()), i.item()
                    )
                    for d, i in zip(lights.directions, lights.intensities)
                ),
            )
        render = replace(self.scene.render, sigma=sigma)
        return replace(
            self.scene, render=render, meshes=tuple(meshes), cameras=cameras, lights=lights
        )

    @torch.no_grad()
    def remesh(self, edge_length: float) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Bake the free vertices into the start mesh, remesh each mesh toward ``edge_length``
        (:func:`microdr.optimize.remesh.remesh`, one pass) and start the displacement over from 0 there.
        Colors, fixed or free, per vertex or per face, follow the new vertices (averaged as they
        were made) and faces (each from the face it was cut from).

        Returns, for each name of ``named_parameters()`` whose values were remade, how to carry
        a tensor shaped like its old value over to the new one (for Adam's moments).
        """
        deformed, results, first, first_face = self.deformed(), [], 0, 0
        for scene_mesh in self.scene.meshes:
            count, face_count = scene_mesh.mesh.num_vertices, scene_mesh.mesh.num_faces
            faces = self.start.faces[first_face : first_face + face_count] - first
            results.append(remesh(deformed[first : first + count], faces, edge_length))
            first, first_face = first + count, first_face + face_count
        counts = [scene_mesh.mesh.num_vertices for scene_mesh in self.scene.meshes]
        color_carriers = [
            _colors_carrier(scene_mesh.color_mode, result)
            for scene_mesh, result in zip(self.scene.meshes, results)
        ]
        # The colors kept, not reset: they stay what they were where the surface was.
        logits = [carry(l.data) for l, carry in zip(self.color_logits, color_carriers)] \
            if "colors" in self.names else []  # fmt: skip
        self.load_meshes([
            {"vertices": result.vertices, "faces": result.faces, "colors": carry(m.colors)}
            for result, carry, m in zip(results, color_carriers, self.scene.meshes)
        ])  # fmt: skip

        def carry_vertices(values: torch.Tensor) -> torch.Tensor:
            parts = values.split(counts)
            return torch.cat([result.carry(part) for result, part in zip(results, parts)])

        carried = {"displacement": carry_vertices}
        for index, values in enumerate(logits):
            self.color_logits[index].data = values
            carried[f"color_logits.{index}"] = color_carriers[index]
        return carried

    def meshes(self) -> list[dict[str, torch.Tensor]]:
        """The start mesh, per mesh: its world-space ``vertices`` (the run's dtype), ``faces``
        and fixed ``colors``; what a checkpoint of a remeshing run holds (:meth:`load_meshes`)."""
        vertices = self.start.vertices.split([m.mesh.num_vertices for m in self.scene.meshes])
        return [
            {"vertices": v, "faces": m.mesh.faces, "colors": m.colors}
            for v, m in zip(vertices, self.scene.meshes)
        ]

    def load_meshes(self, meshes: list[dict[str, torch.Tensor]]) -> None:
        """Start from ``meshes`` (as :meth:`meshes` gives them), world space: the scene's meshes
        and the start mesh are remade, the displacement is 0 there, and the free colors are
        resized to them (their values are for the caller to set)."""
        self.scene = replace(self.scene, meshes=tuple(
            replace(scene_mesh, mesh=Mesh(mesh["vertices"].float().cpu(), mesh["faces"].cpu()),
                    transform=Transform(), colors=mesh["colors"].float().cpu())
            for scene_mesh, mesh in zip(self.scene.meshes, meshes)
        ))  # fmt: skip
        like = self.start.vertices
        vertices = torch.cat([mesh["vertices"] for mesh in meshes]).to(like)
        self._start_at(replace(scene_faces(self.scene, dtype=like.dtype, device=like.device),
                               vertices=vertices))  # fmt: skip
        self.displacement.data = torch.zeros_like(vertices)
        if "colors" in self.names:
            for logits, scene_mesh in zip(self.color_logits, self.scene.meshes):
                logits.data = logits.new_zeros(scene_mesh.colors.shape)


def _colors_carrier(color_mode: str, result: Remeshed) -> Callable[[torch.Tensor], torch.Tensor]:
    """How per-vertex (``color_mode`` ``"vertex"``) or per-face values follow ``result``."""
    if color_mode == "vertex":
        return result.carry
    return lambda values: values[result.face_map.to(values.device)]


def _bounded(start: torch.Tensor, displacement: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """SoftRas's bounded vertices: each coordinate keeps its sign and stays inside ``(-1, 1)``;
    then ``[0, 1]`` maps to ``[c, 1]`` and ``[-1, 0]`` to ``[-1, c]`` with ``c = tanh(center)``."""
    moved = torch.sigmoid(torch.logit(start.abs()) + displacement) * torch.sign(start)
    c = torch.tanh(center)
    return torch.relu(moved) * (1 - c) - torch.relu(-moved) * (1 + c) + c


def _check_inside_box(scene: Scene, vertices: torch.Tensor) -> None:
    """Raise unless every world-space vertex ``(V, 3)`` of the scene is inside ``(-1, 1)^3``."""
    outside = (vertices.abs() >= 1).any(dim=1).nonzero()
    if len(outside) == 0:
        return
    first = int(outside[0])
    ends = torch.tensor([m.mesh.num_vertices for m in scene.meshes]).cumsum(0)
    mesh_index = int(torch.searchsorted(ends, first, right=True))
    index = first - (int(ends[mesh_index - 1]) if mesh_index else 0)
    position = ", ".join(f"{x:g}" for x in vertices[first].tolist())
    raise InputError(
        scene.source,
        f"meshes[{mesh_index}]",
        f"vertex {index} is at ({position}) in the world, outside the open box (-1, 1)^3 that "
        'vertex_parametrization "bounded" needs (scale the mesh down with transform.scale)',
    )


def _first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """The first ``(name, tensor)`` that holds a NaN or an infinity: its name and how many of its
    values do (``"3 of 126 values"``); ``None`` when all are finite."""
    for name, tensor in named:
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            return name, f"{count} of {tensor.numel()} values"
    return None


def _inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    """``x`` with ``softplus(x) = value``, for values clamped to >= 1e-4 (0 has no finite one)."""
    value = value.clamp(min=1e-4)
    return value + torch.log(-torch.expm1(-value))


# ---------------------------------------------------------------------------------------------
# The loop


class Optimization:
    """Adam on a scene's free parameters against one target per camera, one iteration at a time.

    scene: the start. targets: :class:`~microdr.io.targets.Targets` of the scene's image size, one
    per camera. settings: default the scene's ``optimize`` section; what it leaves out is chosen
    by :func:`resolve_settings`; its ``holdout`` names the cameras whose targets never enter the
    loss (:attr:`held_out`), the others are fit (:attr:`fit`). seed: seeds the random choice of
    views (``views_per_step``, among the fit views).
    backend: default the scene's ``render.backend``. loss_fn: replaces the weighted terms of
    ``settings.loss`` (see the module). dtype, device: of every tensor of the run; the device
    defaults to the GPU when the backend is ``cuda`` (or ``auto`` and CUDA works), else the CPU.

    All state that changes (parameters, Adam's moments, the random generator, the iteration and
    the history) changes together at the end of an iteration, with Ctrl-C held off meanwhile, so
    an interrupted run is always at the end of its last finished iteration.
    """

    def __init__(
        self,
        scene: Scene,
        targets: Targets,
        settings: OptimizeSettings | None = None,
        *,
        seed: int = 0,
        backend: str | None = None,
        loss_fn: LossFunction | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if len(targets.images) != len(scene.cameras):
            raise ValueError(f"{len(targets.images)} targets for {len(scene.cameras)} cameras")
        if targets.size != (scene.render.width, scene.render.height):
            size = (scene.render.width, scene.render.height)
            raise ValueError(f"targets are {targets.size}, the scene renders {size}")
        self.targets = targets
        self.settings = resolve_settings(scene, targets, settings)
        self.scene = scene = start_texture(scene, self.settings)
        self.seed = seed
        backend = backend or scene.render.backend
        self.device = preferred_device(backend) if device is None else torch.device(device)
        self.dtype = dtype
        self.backend = resolve_backend(backend, self.device)
        self.loss_fn = loss_fn
        with self._cores():
            self.parameters = Parameters(scene, self.settings, dtype=dtype, device=self.device)
        self.target_images = targets.images.to(dtype=dtype, device=self.device)
        self.has_rgb = targets.has_rgb.to(self.device)
        self.has_silhouette = targets.has_silhouette.to(self.device)
        self.optimizer = Adam(
            self.parameters.parameters(), lr=self.settings.lr, betas=self.settings.betas
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.frame_every = max(1, math.ceil(self.settings.iterations / GIF_FRAMES))
        self.measure_every = max(1, math.ceil(self.settings.iterations / MEASURES))
        self.held_out = held_out_views(self.settings.holdout, len(scene.cameras))
        self.fit = tuple(i for i in range(len(scene.cameras)) if i not in self.held_out)
        self.iteration = 0
        self.seconds = 0.0
        self.history = History()
        #: This process's rank among the run's (:mod:`microdr.optimize.distributed`), and the seconds it
        #: spent on its iterations (since it started) without waiting for the others.
        self.ranks = distributed.current()
        self.work_seconds = 0.0
        self._check_ranks()

    def _check_ranks(self) -> None:
        """Raise unless each rank has a view of every iteration and the loss can be split."""
        size = self.ranks.size
        if size == 1:
            return
        if self.loss_fn is not None:
            raise MicroDRError(
                f"a custom loss_fn sees all of an iteration's views at once: it runs on one "
                f"process, not {size}"
            )
        problem = ranks_problem(self.settings, len(self.scene.cameras), size)
        if problem is not None:
            raise InputError("torch.distributed", "", problem)

    # --- iterating --------------------------------------------------------------------------

    def steps(self) -> Iterator[Step]:
        """Run the remaining iterations, yielding each when it has finished."""
        while self.iteration < self.settings.iterations:
            yield self.step()

    def step(self) -> Step:
        """Run one iteration: render, loss, backward, Adam update.

        Raises :class:`NonFiniteError`, leaving the run as it was before the iteration, when the
        loss or a gradient holds a NaN or an infinity, or the update would put one into a
        parameter or the mesh.
        """
        if self.iteration >= self.settings.iterations:
            raise RuntimeError(f"all {self.settings.iterations} iterations are done")
        with self._cores():
            return self._iterate()

    @contextlib.contextmanager
    def _cores(self) -> Iterator[None]:
        """For the CPU kernels, the cores (see :func:`microdr.raster.cpu.kernels_own_the_cores`),
        and torch's own operations on one thread: then their sums do not depend on the thread
        count, and a run on one process gives the same bits as on several with fewer threads
        each. Everything a run computes (its start parameters, its iterations, a resumed state,
        its result) runs so: on two threads, MKL's vector functions behind ``torch.logit`` and
        ``torch.sigmoid`` gave some elements of a 126-element tensor a value one ulp off in about
        one process of 13, and the run's every later bit with them. Other backends run as they
        are."""
        if self.backend != "cpu":
            yield
            return
        with kernels_own_the_cores():
            torch.set_num_threads(1)
            yield

    def _iterate(self) -> Step:
        """The body of :meth:`step`."""
        started = time.perf_counter()
        iteration = self.iteration
        generator_state = self.generator.get_state()
        try:
            views = self._draw_views()
            mine = views[self.ranks.share(len(views))]
            sigma = sigma_at(self.settings, self.scene, iteration)
            self.optimizer.zero_grad()
            vertices = self.parameters.vertices()
            pieces = _Pieces(self, vertices, views, mine, sigma)
            try:
                waited = distributed.in_view_order(pieces.buffer, pieces.add, self.ranks)
            except RuntimeError as error:  # torch.distributed's, from a rank gone or hung
                raise PeerLost(iteration, error) from None
            total, terms, metrics = pieces.outcome()
            pieces.backward()
            self._check_loss_and_gradients(iteration, total, terms)
            images = pieces.images.detach()
            first = self.ranks.first
            frame = self._frame(images if self._loss_sees_colors else None, mine, sigma) \
                if first and iteration % self.frame_every == 0 else None  # fmt: skip
            fit, held_out = (
                self._measure(vertices.detach(), sigma)
                if first and self._measures(iteration)
                else (None, None)
            )
        except BaseException:
            # Nothing of this iteration stays: the next attempt draws the same views.
            self.generator.set_state(generator_state)
            raise
        lr = lr_at(self.settings, iteration)
        with _interrupts_held():
            self.optimizer.lr = lr
            self._update(iteration, generator_state)
            elapsed = time.perf_counter() - started
            self.seconds += elapsed
            self.work_seconds += elapsed - waited
            step = Step(
                iteration=iteration,
                views=tuple(views.tolist()),
                loss=total.item(),
                terms={name: float(term) for name, term in terms.items()},
                iou=None if fit is None else fit.mean_iou,
                psnr=metrics.mean_psnr,
                lr=lr,
                sigma=sigma,
                seconds=self.seconds,
                images=images,
                soft_iou=metrics.mean_soft_iou,
                held_out_iou=None if held_out is None else held_out.mean_iou,
                held_out_psnr=None if held_out is None else held_out.mean_psnr,
            )
            self.history.rows.append(step.row())
            if frame is not None:
                self.history.frames.append(frame)
                self.history.frame_iterations.append(iteration)
            self.iteration += 1
            edge_length = remesh_length(self.settings, self.iteration)
            if edge_length is not None:
                self._remesh(edge_length)
        return step

    def _remesh(self, edge_length: float) -> None:
        """Remesh toward ``edge_length`` (:meth:`Parameters.remesh`); Adam's moments of the
        remade parameters follow their values (a new vertex's are its parents' mean)."""
        carried = self.parameters.remesh(edge_length)
        for index, (name, _) in enumerate(self.parameters.named_parameters()):
            state = self.optimizer.state.get(index)
            if name in carried and state is not None:
                state["m"], state["v"] = carried[name](state["m"]), carried[name](state["v"])

    def _check_loss_and_gradients(
        self, iteration: int, total: torch.Tensor, terms: dict[str, torch.Tensor]
    ) -> None:
        """Raise :class:`NonFiniteError` if the loss or a parameter's gradient is not finite.

        The gradients are checked even when the loss is finite: a finite loss can have a NaN
        gradient (``sqrt`` at 0; the IoU loss of an all-NaN silhouette, which is 0).
        """
        if not torch.isfinite(total):
            bad = [f"{name} {term.item():g}" for name, term in terms.items() if not term.isfinite()]
            # With one term, it is the loss: naming it again says nothing.
            listed = f"; {', '.join(bad)}" if bad and len(terms) > 1 else ""
            raise NonFiniteError(iteration, "the loss", f"{total.item():g}{listed}")
        found = _first_non_finite(
            (f"the gradient of {self.parameters.label(name)}", value.grad)
            for name, value in self.parameters.named_parameters()
            if value.grad is not None
        )
        if found is not None:
            raise NonFiniteError(iteration, *found)

    def _update(self, iteration: int, generator_state: torch.Tensor) -> None:
        """Adam's step; undone, with the iteration's draw of views, and :class:`NonFiniteError`
        raised, if it puts a NaN or an infinity into a parameter or the mesh (a huge learning
        rate does that with finite gradients)."""
        before = copy.deepcopy((self.parameters.state_dict(), self.optimizer.state_dict()))
        self.optimizer.step()
        found = self.parameters.non_finite()
        if found is None:
            return
        self.parameters.load_state_dict(before[0])
        self.optimizer.load_state_dict(before[1])
        self.generator.set_state(generator_state)
        name, detail = found
        raise NonFiniteError(iteration, f"{name} after its update", detail)

    def _measures(self, iteration: int) -> bool:
        """Whether ``iteration`` measures the hard metrics: the first, every
        :attr:`measure_every`-th counted from 1 (so that the progress, logged every so many
        iterations, shows fresh values), and the last."""
        done = iteration + 1
        return iteration == 0 or done % self.measure_every == 0 or done == self.settings.iterations

    def _draw_views(self) -> torch.Tensor:
        """The cameras of this iteration ``(B,)`` int64, increasing, on the run's device: fit
        views alone."""
        fit = torch.tensor(self.fit, dtype=torch.int64)
        chosen = self.settings.views_per_step
        if chosen is not None and chosen < len(fit):
            fit = fit[torch.randperm(len(fit), generator=self.generator)[:chosen].sort().values]
        return fit.to(self.device)

    @torch.no_grad()
    def _measure(self, vertices: torch.Tensor, sigma: float) -> tuple[Metrics, Metrics | None]:
        """The hard IoU of the fit views, and the hard IoU and the PSNR (of a render with
        ``sigma``) of the held-out views (``None`` when none is), of ``vertices`` ``(V, 3)``."""
        covered = hard_silhouettes(
            vertices[self.parameters.start.faces], self.scene.cameras, self.scene.render,
            poses=self.parameters.poses(), backend=self.backend,
        )  # fmt: skip
        fit = self._metrics(self.fit, covered, None)
        if not self.held_out:
            return fit, None
        held_out = torch.tensor(self.held_out, device=self.device)
        images = self._render(vertices, held_out, sigma) if self.has_rgb[held_out].any() else None
        return fit, self._metrics(self.held_out, covered, images)

    def _metrics(
        self, views: tuple[int, ...], covered: torch.Tensor, images: torch.Tensor | None
    ) -> Metrics:
        """:class:`Metrics` of cameras ``views`` from the hard silhouettes of every camera
        ``covered`` ``(N, H, W)`` and, if given, the soft renders of ``views`` ``(B, 4, H, W)``."""
        index = torch.tensor(views, device=covered.device)
        return Metrics.of(
            views, covered[index], images, self.target_images[index].to(covered.device),
            self.has_rgb[index].to(covered.device), self.has_silhouette[index].to(covered.device),
        )  # fmt: skip

    @property
    def _loss_sees_colors(self) -> bool:
        """Whether the iterations must render colors: a target has color, or a custom loss may
        look at them. Silhouettes alone cost the kernels about half as much."""
        return self.loss_fn is not None or bool(self.has_rgb.any())

    def _render(self, vertices: torch.Tensor, views: torch.Tensor, sigma: float) -> torch.Tensor:
        """RGBA ``(B, 4, H, W)`` of cameras ``views`` with the current parameters."""
        poses = self.parameters.poses()
        indices = views.tolist()
        return render_faces(
            vertices[self.parameters.start.faces],
            self.parameters.albedo(),
            [self.scene.cameras[i] for i in indices],
            replace(self.scene.render, sigma=sigma),
            self.parameters.lights(),
            poses=None if poses is None else [poses[i] for i in indices],
            backend=self.backend,
            texture=self.parameters.texture(),
        )

    @torch.no_grad()
    def _frame(self, images: torch.Tensor | None, views: torch.Tensor, sigma: float) -> torch.Tensor:
        """Cameras 0 to ``GIF_VIEWS - 1`` (those there are) for the progress animation: 8-bit
        RGBA ``(K, H, W, 4)``, CPU; from this iteration's ``images`` of ``views`` when it drew
        them all (and they have colors: not None), else rendered."""
        shown = torch.arange(min(GIF_VIEWS, len(self.scene.cameras)), device=views.device)
        # Views are increasing: cameras 0 to K - 1, when drawn, come first.
        if images is None or len(views) < len(shown) or (views[: len(shown)] != shown).any():
            images = self._render(self.parameters.vertices(), shown, sigma)
        return torch.from_numpy(to_uint8(images[: len(shown)]))

    # --- the outcome ------------------------------------------------------------------------

    @torch.no_grad()
    def result(self, interrupted: bool = False, stopped: str | None = None) -> Result:
        """The optimized scene, its renders of every camera with the final sigma, how well they
        match the targets, and the same for the start; ``interrupted`` and ``stopped`` say how
        the run ended (see :class:`Result`)."""
        with self._cores():
            return self._result(interrupted, stopped)

    def _result(self, interrupted: bool, stopped: str | None) -> Result:
        """The body of :meth:`result`."""
        sigma = sigma_at(self.settings, self.scene, self.settings.iterations)
        render = replace(self.scene.render, sigma=sigma)
        everything = torch.arange(len(self.scene.cameras), device=self.device)
        images = self._render(self.parameters.vertices(), everything, sigma).float().cpu()
        start = scene_faces(self.scene, dtype=self.dtype, device=self.device)
        start_images = (
            render_faces(
                start.corners,
                start.albedo,
                self.scene.cameras,
                render,
                self.scene.lights,
                backend=self.backend,
                texture=start.texture,
            )
            .float()
            .cpu()
        )
        solved = self.parameters.solved_scene(sigma)
        # The final metrics are those of the meshes as written (float32, and remeshed, if so),
        # seen by their cameras.
        written = scene_faces(solved, dtype=self.dtype, device=self.device)
        final = self._quality(written.corners, solved.cameras, images)
        begun = self._quality(start.corners, self.scene.cameras, start_images)
        return Result(
            scene=solved,
            images=images,
            start_images=start_images,
            metrics=final[0],
            start_metrics=begun[0],
            history=self.history,
            iterations=self.iteration,
            seconds=self.seconds,
            backend=self.backend,
            interrupted=interrupted,
            stopped=stopped,
            held_out=self.held_out,
            held_out_metrics=final[1],
            start_held_out_metrics=begun[1],
        )

    def _quality(
        self, corners: torch.Tensor, cameras: tuple[Camera, ...], images: torch.Tensor
    ) -> tuple[Metrics, Metrics | None]:
        """The :class:`Metrics` of the fit and of the held-out views (``None`` when none is) of
        world-space triangles ``corners`` ``(F, 3, 3)`` seen by ``cameras``, whose soft renders
        are ``images`` ``(N, 4, H, W)`` (CPU)."""
        covered = hard_silhouettes(corners, cameras, self.scene.render, backend=self.backend).cpu()
        fit = self._metrics(self.fit, covered, images[list(self.fit)])
        if not self.held_out:
            return fit, None
        return fit, self._metrics(self.held_out, covered, images[list(self.held_out)])

    # --- checkpoints ------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, str]:
        """What a checkpoint must have been made with to continue this run: everything that
        changes the result, each as a string."""
        settings = {key: json.dumps(value) for key, value in asdict(self.settings).items()}
        return {
            "scene": _scene_digest(self.scene),
            "targets": hashlib.sha256(self.targets.images.numpy().tobytes()).hexdigest(),
            **settings,
            "seed": str(self.seed),
            "backend": self.backend,
            "dtype": str(self.dtype),
            "loss_fn": "custom" if self.loss_fn else "none",
        }

    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this run is (tensors on their device)."""
        return {
            "fingerprint": self.fingerprint(),
            "iteration": self.iteration,
            "seconds": self.seconds,
            "parameters": self.parameters.state_dict(),
            "adam": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": asdict(self.history),
            # Remeshing changes the start mesh and the shapes of the parameters.
            **({"meshes": self.parameters.meshes()} if self.settings.remesh else {}),
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); ``source`` names it in the error
        raised when it was made by a different run, or is no state of a run at all.

        The state may be of a run of another number of iterations, finished or not, as long as it
        has done no more than this one's: this run goes on to its own number. The iterations
        still to run follow the schedules for that number: where they depend on it (a cosine
        learning rate, a sigma schedule), the values jump at the seam, and the result differs
        from that of an uninterrupted run of that many iterations; otherwise it is the same, bit
        for bit (but for the progress animation's frames, taken as often as each part's number
        of iterations said).
        """
        # A checkpoint with a good checksum but other contents was not written by microDR.
        keys = self.state_dict().keys()
        if not (isinstance(state, dict) and keys <= state.keys()) or not isinstance(
            state["fingerprint"], dict
        ):
            raise InputError(source, "", "holds no state of a microdr optimize run")
        for key, value in self.fingerprint().items():
            theirs = state["fingerprint"].get(key)
            if theirs != value and key != "iterations":  # a run may be extended, or cut short
                what = (
                    f"a different {key}"
                    if key in ("scene", "targets")
                    else f"{key} {theirs}, not {value}"
                )
                raise InputError(
                    source,
                    "",
                    f"made by another run ({what}); resume with the same scene, targets, options",
                )
        if state["iteration"] > self.settings.iterations:
            raise InputError(
                source,
                "",
                f"{state['iteration']} iterations are done, more than the "
                f"{self.settings.iterations} to run; resume with --iterations "
                f"{state['iteration']} or more",
            )
        with self._cores():
            if self.settings.remesh is not None:
                self.parameters.load_meshes(state["meshes"])
            self.parameters.load_state_dict(state["parameters"])
        self.optimizer.load_state_dict(state["adam"])
        self.generator.set_state(state["generator"])
        self.iteration = state["iteration"]
        self.seconds = state["seconds"]
        self.history = History(**state["history"])


class _Pieces:
    """One iteration's loss and gradients, as per-view pieces summed in view order (see
    :mod:`microdr.optimize.distributed`): this rank renders its views ``mine`` ``(b,)`` of the iteration's
    ``views`` ``(B,)`` from detached copies, one per view, of the world-space corners, the shaded
    colors and the camera eyes, and backpropagates their loss into those copies (and, on every
    rank alike, the regularizers into the parameters); :meth:`add` adds its views' gradients and
    per-view values to the iteration's :attr:`buffer`; :meth:`outcome` reads the loss and the
    metrics from the total, and :meth:`backward` carries its gradients into the parameters.

    With a custom ``loss_fn`` (one rank only) the loss is one piece of all views, and its
    per-view values are the metrics alone.
    """

    #: The per-view metrics (after the image terms' values) in the buffer's table.
    METRICS = ("soft_iou", "psnr", "psnr_inside")

    def __init__(
        self, run: Optimization, vertices: torch.Tensor, views: torch.Tensor, mine: torch.Tensor,
        sigma: float,
    ):  # fmt: skip
        self.run, self.views, self.mine = run, views, mine
        parameters = run.parameters
        colors = run._loss_sees_colors
        corners = vertices[parameters.start.faces]
        albedo = parameters.albedo()
        texture = parameters.texture() if colors else None
        shaded = shaded_corners(corners, albedo, parameters.lights(), colors, texture is not None)
        poses = parameters.poses()
        self.eyes = None if poses is None else torch.stack([pose.eye for pose in poses])
        count = len(mine)
        # What the backward starts from (the texture image too, when drawn), and this rank's
        # copies of it, one per view.
        self.roots = [corners, shaded] + ([] if texture is None else [texture.image])
        self.copies = [t.detach().expand(count, *t.shape).requires_grad_() for t in self.roots]
        cameras = [run.scene.cameras[i] for i in mine.tolist()]
        own_eyes = None if poses is None else self.eyes[mine].detach().requires_grad_()
        own_poses = None if poses is None else [
            replace(poses[i], eye=eye) for i, eye in zip(mine.tolist(), own_eyes)
        ]  # fmt: skip
        self.own_eyes = own_eyes
        render = replace(run.scene.render, sigma=sigma)
        if texture is None:
            self.images = render_views(
                self.copies[0], self.copies[1], cameras, render, poses=own_poses, backend=run.backend
            )
        else:  # the kernels sum a batch's texel gradients: one view at a time keeps them apart
            self.images = torch.cat([
                render_views(
                    self.copies[0][k : k + 1], self.copies[1][k : k + 1], cameras[k : k + 1], render,
                    poses=None if own_poses is None else own_poses[k : k + 1], backend=run.backend,
                    texture=replace(texture, image=self.copies[2][k]),
                )
                for k in range(count)
            ])  # fmt: skip
        evaluation = Evaluation(
            images=self.images, targets=run.target_images[mine], has_rgb=run.has_rgb[mine],
            has_silhouette=run.has_silhouette[mine], views=mine, vertices=vertices,
            faces=parameters.start.faces, topology=parameters.topology,
            texture=None if texture is None else texture.image,
        )  # fmt: skip
        if run.loss_fn is None:
            self.weights = {name: w for name, w in run.settings.loss.items() if w > 0}
            self.image_terms = [name for name in self.weights if name in VIEW_TERMS]
            mask_rgb = run.settings.mask_rgb
            values = [VIEW_TERMS[name][0](evaluation, mask_rgb) for name in self.image_terms]
            self.mesh_terms = {
                name: TERMS[name](evaluation, mask_rgb)
                for name in self.weights if name not in VIEW_TERMS
            }  # fmt: skip
            # Each view's share of the mean over the iteration's views (of every rank).
            masks = self._masks(views)
            shares = [
                self.weights[name] * masks[k][self.run.ranks.share(len(views))]
                / masks[k].sum().clamp(min=1)
                for k, name in enumerate(self.image_terms)
            ]
            loss = sum((v * w).sum() for v, w in zip(values, shares)) + sum(
                self.weights[name] * term for name, term in self.mesh_terms.items()
            )
        else:
            value = run.loss_fn(evaluation)
            self.mesh_terms = value if isinstance(value, dict) else {"loss_fn": value}
            self.weights = dict.fromkeys(self.mesh_terms, 1.0)
            self.image_terms, values = [], []
            loss = sum(self.mesh_terms.values())
        self.values = [v.detach() for v in values]
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            # The parameters' part of the graph is walked again by :meth:`backward`.
            loss.backward(retain_graph=True)
        self.mesh_terms = {name: term.detach() for name, term in self.mesh_terms.items()}
        metrics = Metrics.of(
            mine.tolist(), None, self.images.detach(), evaluation.targets, evaluation.has_rgb,
            evaluation.has_silhouette,
        )  # fmt: skip
        self.rows = torch.stack(
            [*self.values, *(_nan_for_none(getattr(metrics, m), vertices) for m in self.METRICS)],
            dim=1,
        )  # fmt: skip
        self.buffer = vertices.new_zeros(sum(self._sizes()))

    def _masks(self, views: torch.Tensor) -> list[torch.Tensor]:
        """Each image term's mask of ``views``: whether it has what the term compares."""
        has = {"has_rgb": self.run.has_rgb, "has_silhouette": self.run.has_silhouette}
        return [has[VIEW_TERMS[name][1]][views].to(self.run.dtype) for name in self.image_terms]

    def _sizes(self) -> list[int]:
        """The buffer's blocks: the roots' gradients, the eyes', the table of per-view values."""
        eyes = 0 if self.eyes is None else self.eyes.numel()
        table = len(self.views) * (len(self.image_terms) + len(self.METRICS))
        return [*(root.numel() for root in self.roots), eyes, table]

    def _blocks(self, buffer: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Views of ``buffer``'s blocks, shaped as their tensors: ``(roots, eyes, table)``."""
        *roots, eyes, table = buffer.split(self._sizes())
        width = len(self.image_terms) + len(self.METRICS)
        roots = [block.view(root.shape) for block, root in zip(roots, self.roots)]
        return roots, eyes.view(-1, 3), table.view(len(self.views), width)

    def add(self, buffer: torch.Tensor) -> None:
        """Add this rank's views' gradients to ``buffer``, one view after the other, and write
        their rows of per-view values."""
        roots, eyes, table = self._blocks(buffer)
        first = self.run.ranks.share(len(self.views)).start
        grads = [copy.grad for copy in self.copies]
        for k, camera in enumerate(self.mine.tolist()):
            for block, grad in zip(roots, grads):
                if grad is not None:
                    block += grad[k]
            if self.own_eyes is not None and self.own_eyes.grad is not None:
                eyes[camera] += self.own_eyes.grad[k]
        table[first : first + len(self.mine)] = self.rows

    def outcome(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], Metrics]:
        """The weighted total loss, each term's unweighted value and the :class:`Metrics` (soft
        IoU, PSNR and PSNR inside the silhouette) of all the iteration's views, from the summed buffer."""
        table = self._blocks(self.buffer)[2]
        masks = self._masks(self.views)
        terms = {name: view_mean(table[:, k], masks[k]) for k, name in enumerate(self.image_terms)}
        terms.update(self.mesh_terms)
        weighted = (self.weights[name] * term for name, term in terms.items())
        total = sum(weighted, table.new_zeros(()))
        count = len(self.image_terms)
        per_view = (
            tuple(None if math.isnan(x) else x for x in table[:, count + k].tolist())
            for k in range(len(self.METRICS))
        )
        cameras = tuple(self.views.tolist())
        return total, terms, Metrics(cameras, (None,) * len(cameras), *per_view)

    def backward(self) -> None:
        """Carry the summed gradients of the corners, the shaded colors (the texture), and the
        eyes into the parameters (onto the regularizers' gradients)."""
        roots, eyes, _ = self._blocks(self.buffer)
        pairs = list(zip(self.roots, roots))
        if self.eyes is not None:
            pairs.append((self.eyes, eyes))
        pairs = [(root, grad) for root, grad in pairs if root.requires_grad and root.numel()]
        if pairs:
            torch.autograd.backward(*zip(*pairs))


def _nan_for_none(values: tuple[float | None, ...], like: torch.Tensor) -> torch.Tensor:
    """Per-view values ``(B,)`` of ``like``'s dtype and device, NaN where ``None``."""
    return torch.tensor([math.nan if v is None else v for v in values], dtype=like.dtype,
                        device=like.device)  # fmt: skip


def _scene_digest(scene: Scene) -> str:
    """A hash of everything the start of a run depends on in ``scene``."""
    digest = hashlib.sha256()
    digest.update(repr((scene.render, scene.cameras, scene.lights)).encode())
    for scene_mesh in scene.meshes:
        digest.update(repr((scene_mesh.transform, scene_mesh.color_mode)).encode())
        textured = () if scene_mesh.texture is None else (scene_mesh.mesh.face_uvs, scene_mesh.texture.image)
        for tensor in (scene_mesh.mesh.vertices, scene_mesh.mesh.faces, scene_mesh.colors, *textured):
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


class Interrupted(KeyboardInterrupt):
    """A stop signal (:data:`STOP_SIGNALS`) raised where Ctrl-C raises KeyboardInterrupt, so that
    a run stops at the end of its last finished iteration as it does for Ctrl-C. signal: its
    number."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.signal = number


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While the block runs in the main thread, each of :data:`STOP_SIGNALS` raises
    :class:`Interrupted` there; yields the list of the numbers of those received, in order.

    A signal that the program ignores (``nohup`` ignores SIGHUP) or handles itself stays so. The
    handlers are restored when the block ends.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(number: int, frame) -> None:
        received.append(number)
        raise Interrupted(number)

    previous = {}
    for number in STOP_SIGNALS:
        if signal.getsignal(number) in (signal.SIG_DFL, signal.default_int_handler):
            previous[number] = signal.signal(number, stop)
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def _interrupts_held(*, deliver: bool = True, note: str | None = None) -> Iterator[None]:
    """Hold the stop signals (:data:`STOP_SIGNALS` that Python handles) back until the block has
    run, so that what it changes changes whole; then deliver the first that came to the handler it
    was held from, or, unless ``deliver``, drop them all (the block was the run's end). ``note``
    is logged when the first comes, to say why the process goes on.

    Only the main thread receives signals, so elsewhere there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def hold(number: int, frame) -> None:
        if not caught and note is not None:
            logger.warning(note)
        caught.append((number, frame))

    previous = {}
    for number in STOP_SIGNALS:
        if callable(signal.getsignal(number)):
            previous[number] = signal.signal(number, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught and deliver:
        number, frame = caught[0]
        previous[number](number, frame)


# ---------------------------------------------------------------------------------------------
# A whole run


def optimize(
    scene: Scene,
    targets: Targets,
    settings: OptimizeSettings | None = None,
    *,
    seed: int = 0,
    backend: str | None = None,
    loss_fn: LossFunction | None = None,
    callback: Callable[[Step], None] | None = None,
    on_start: Callable[[Optimization], None] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    outdir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    force: bool = False,
) -> Result | None:
    """Run an :class:`Optimization` to its end and return its :class:`Result`.

    ``on_start(run)`` runs once the run has checked its inputs (and read its checkpoint), before
    its first iteration; ``callback(step)`` runs after each iteration. Ctrl-C (a
    KeyboardInterrupt, also one raised by the callback; under :func:`stop_signals` also SIGTERM
    and SIGHUP) stops the run at the end of its last finished iteration: the result then has
    ``interrupted`` set, instead of the exception propagating. The final render and the writing
    of the files are not interrupted: a stop signal then is dropped (with a note logged), and the
    run ends as it would have.

    With ``outdir``, the run's files (:func:`microdr.optimize.outputs.output_files`) are written there at
    the end, interrupted or not, with a checkpoint (and its journal of the history's rows,
    :class:`microdr.optimize.checkpoint.Journal`); also a checkpoint every ``checkpoint_every``
    iterations (0: none besides the last). ``resume`` continues from ``outdir``'s checkpoint,
    which must come from the same scene, targets and options; the result is the same as that of
    an uninterrupted run.

    A NaN or an infinity (:class:`NonFiniteError`) ends the run at its last good state: the files
    and the checkpoint are written as of then, and the error is raised with ``result`` set.

    The run holds ``outdir``'s lock (:func:`microdr.optimize.outputs.outdir_lock`) from before it reads
    the checkpoint until it has written its files, so a second run into the same folder is
    refused meanwhile; ``force`` takes the lock anyway. Holding it, the run first removes the
    temporary files that killed runs left there (:func:`microdr.io.files.remove_stale_temporaries`).

    Under torch.distributed (:mod:`microdr.optimize.distributed`) every rank calls this alike; rank 0
    alone takes the lock, reads the checkpoint (and sends it to the others), writes the files and
    returns the result, the others return ``None``. A rank gone or silent for the process group's
    timeout ends the run as a NaN does, with :class:`~microdr.optimize.distributed.PeerLost`.
    """
    if resume and outdir is None:
        raise ValueError("resume needs outdir")
    run = Optimization(
        scene, targets, settings, seed=seed, backend=backend, loss_fn=loss_fn, dtype=dtype,
        device=device,
    )  # fmt: skip
    ranks = run.ranks
    outdir = None if outdir is None else Path(outdir)
    writes = outdir is not None and ranks.first
    with contextlib.ExitStack() as held:

        def begin() -> dict | None:
            """Rank 0's start: the outdir checked and locked, the checkpoint read."""
            if not writes:
                return None
            check_outdir(outdir, scene, targets)
            held.enter_context(outdir_lock(outdir, force=force))
            remove_stale_temporaries(outdir)
            if not resume:
                return None
            state = read_checkpoint(outdir / CHECKPOINT)
            run.load_state_dict(state, str(outdir / CHECKPOINT))
            return state

        state = distributed.from_first(begin, ranks)
        if state is not None and not ranks.first:
            run.load_state_dict(state, str(outdir / CHECKPOINT))
        journal = Journal(outdir / CHECKPOINT, run.history.rows) if writes else None
        if on_start is not None:
            on_start(run)
        interrupted, stopped = False, None
        try:
            for step in run.steps():
                due = checkpoint_every and run.iteration % checkpoint_every == 0
                if writes and due:
                    write_files({outdir / CHECKPOINT: journal.encode(run.state_dict())})
                if callback is not None:
                    callback(step)
        except KeyboardInterrupt:
            # A stop that came after the last iteration, while the loop was ending, stops nothing.
            interrupted = run.iteration < run.settings.iterations
        except (NonFiniteError, PeerLost) as error:
            stopped = error
        rank_seconds: tuple[float | None, ...] = (run.work_seconds,) + (None,) * (ranks.size - 1)
        if not isinstance(stopped, PeerLost):
            with contextlib.suppress(RuntimeError):  # a rank gone at the very end
                rank_seconds = tuple(distributed.gather(run.work_seconds, ranks))
        if not ranks.first:  # rank 0 alone measures the result and writes it
            if stopped is not None:
                raise stopped
            return None
        # The files are the run's state: a stop signal now would leave some written and others
        # not, and no checkpoint to resume from. It waits, and the run ends as it was ending.
        note = "finishing the final render" + ("" if outdir is None else f" and {outdir}'s files")
        with _interrupts_held(deliver=False, note=f"{note} before stopping"):
            result = run.result(interrupted, None if stopped is None else str(stopped))
            result = replace(result, rank_seconds=rank_seconds)
            if outdir is not None:
                checkpoint = {CHECKPOINT: journal.encode(run.state_dict())}
                write_outputs(outdir, result, targets, checkpoint)
    if stopped is not None:
        stopped.result = result
        raise stopped
    return result
