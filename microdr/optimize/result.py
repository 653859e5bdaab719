"""What an optimization run produces: each finished iteration (:class:`Step`), the history of a
run (:class:`History`) and its outcome (:class:`Result`).

Plain records, below both the loop that makes them (:mod:`microdr.optimize.loop`) and the files
written from them (:mod:`microdr.optimize.outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..io.mesh import Mesh
from ..io.scene import Scene
from .losses import Metrics

#: The progress animation shows at most this many cameras, the first ones.
GIF_VIEWS = 4


@dataclass(frozen=True)
class Step:
    """One finished iteration.

    iteration: its 0-based index; it rendered the parameters after ``iteration`` updates and then
        made one more. views: the cameras it rendered. loss: the weighted total; terms: each
        term's unweighted value. soft_iou, psnr: means over its views with a silhouette / color
        (``None`` when there is none) of the soft render it drew (see
        :class:`~microdr.optimize.losses.Metrics`). iou, held_out_iou, held_out_psnr: the means of
        :class:`~microdr.optimize.losses.Metrics` ``iou`` over every fit view and ``iou`` and ``psnr``
        over every held-out view, of the parameters it rendered, at the iterations that measure
        them (the first and about ``microdr.optimize.loop.MEASURES`` more, evenly spaced, the last
        included), else ``None``. lr, sigma: the values it used. seconds: the run's optimization
        time so far, the measuring included. images: ``(B, 4, H, W)`` its renders, detached (on
        several processes, of this rank's views; iou and the held-out metrics on rank 0 alone).
    """

    iteration: int
    views: tuple[int, ...]
    loss: float
    terms: dict[str, float]
    iou: float | None
    psnr: float | None
    lr: float
    sigma: float
    seconds: float
    images: torch.Tensor = field(repr=False)
    soft_iou: float | None = None
    held_out_iou: float | None = None
    held_out_psnr: float | None = None

    def row(self) -> dict[str, float | int | None]:
        """The numbers of one line of ``metrics.csv``."""
        return {
            "iteration": self.iteration,
            "loss": self.loss,
            **self.terms,
            "iou": self.iou,
            "soft_iou": self.soft_iou,
            "psnr": self.psnr,
            "held_out_iou": self.held_out_iou,
            "held_out_psnr": self.held_out_psnr,
            "lr": self.lr,
            "sigma": self.sigma,
            "seconds": self.seconds,
        }


@dataclass
class History:
    """What a run has been through: one :meth:`Step.row` per finished iteration; renders of the
    first cameras (up to :data:`GIF_VIEWS`) at every
    ``microdr.optimize.loop.Optimization.frame_every``-th iteration from 0 (8-bit RGBA
    ``(K, H, W, 4)`` uint8 CPU tensors), and the iteration of each."""

    rows: list[dict[str, float | int | None]] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)
    frame_iterations: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """The outcome of a run.

    scene: the optimized scene (see :meth:`microdr.optimize.loop.Parameters.solved_scene`);
        :attr:`meshes` and :attr:`colors` are its meshes' geometry and albedo.
    images, start_images: ``(N, 4, H, W)`` float32 CPU renders of every camera at the end and at
        the start, both with the final sigma.
    metrics, start_metrics: the quality (:class:`~microdr.optimize.losses.Metrics`) of the fit views, the
        cameras whose targets the loss saw, at the end (the meshes of ``scene``, as written to
        ``mesh.obj``) and at the start. held_out_metrics, start_held_out_metrics: the same of the
        held-out views, ``None`` when none is held out.
    held_out: the cameras whose targets never entered the loss (``optimize.holdout``), increasing.
    history: the run's rows and frames. iterations: how many finished. seconds: optimization
        time (summed over resumed parts). backend: the one that ran. interrupted: stopped early by
        Ctrl-C (KeyboardInterrupt). stopped: the message of the
        :class:`microdr.optimize.loop.NonFiniteError` that ended the run early, else ``None``.
    rank_seconds: with several processes (:mod:`microdr.optimize.distributed`), each rank's seconds of
        its own work in this part of the run (not waiting for the others; ``None`` for a rank
        lost); one entry for one process.
    """

    scene: Scene
    images: torch.Tensor = field(repr=False)
    start_images: torch.Tensor = field(repr=False)
    metrics: Metrics
    start_metrics: Metrics
    history: History = field(repr=False)
    iterations: int
    seconds: float
    backend: str
    interrupted: bool
    stopped: str | None = None
    held_out: tuple[int, ...] = ()
    held_out_metrics: Metrics | None = None
    start_held_out_metrics: Metrics | None = None
    rank_seconds: tuple[float | None, ...] = ()

    @property
    def meshes(self) -> list[Mesh]:
        """The optimized meshes, world space, float32 CPU (per-vertex colors included)."""
        return [scene_mesh.mesh for scene_mesh in self.scene.meshes]

    @property
    def colors(self) -> list[torch.Tensor]:
        """Each mesh's albedo, ``(V_i, 3)`` or ``(F_i, 3)`` float32 CPU as its color mode says."""
        return [scene_mesh.colors for scene_mesh in self.scene.meshes]
