"""The optimizer's loss terms and quality metrics.

Image terms compare each rendered view with its target and are averaged over the views that
have what they compare (a silhouette, or color); mesh terms (regularizers) look at the world-space
vertices alone. Each term is unweighted here; ``optimize.loss`` weighs them. The silhouette term
and the regularizers are SoftRas's (Liu et al. 2019, ``soft_renderer/losses.py``), sums over the
mesh as there, so that its published weights (0.03 Laplacian, 0.0003 flatten) carry over.

Tensor contracts: images ``(B, 4, H, W)`` (RGB then silhouette), per-view masks ``(B,)`` bool,
vertices ``(V, 3)``, faces ``(F, 3)`` int64; any float dtype, all on one device. Terms are
scalars, per-view values ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: PSNR of a perfect match: the squared error is floored at 1e-10, i.e. 100 dB.
PSNR_MAX_DB = 100.0
#: Pixels whose silhouette (a target's alpha, a soft render's) is above this count as covered
#: in the IoU metrics.
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class MeshTopology:
    """A triangle mesh's connectivity, as the regularizers need it; computed once.

    edges: ``(E, 2)`` int64, each undirected edge once, ``i < j``.
    degree: ``(V,)`` int64, each vertex's number of neighbours.
    hinges: ``(H, 4)`` int64, for each edge shared by exactly two faces: the edge's two vertices,
        then the third vertex of each face (boundary and non-manifold edges have no hinge).
    """

    edges: torch.Tensor
    degree: torch.Tensor
    hinges: torch.Tensor

    @staticmethod
    def of(faces: torch.Tensor, num_vertices: int) -> "MeshTopology":
        # Each face (a, b, c) has the edges ab, bc, ca with the opposite corners c, a, b.
        directed = faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2)
        opposite = faces[:, [2, 0, 1]].reshape(-1)
        edges, inverse, counts = torch.unique(
            directed.sort(dim=1).values, dim=0, return_inverse=True, return_counts=True
        )
        degree = torch.bincount(edges.reshape(-1), minlength=num_vertices)
        # The face-edges of one edge are adjacent once sorted by edge (a stable sort keeps
        # their order fixed, so the hinges come out the same run after run).
        order = torch.argsort(inverse, stable=True)
        first = torch.cumsum(counts, 0) - counts
        shared = (counts == 2).nonzero().squeeze(1)
        hinges = torch.cat(
            [
                edges[shared],
                opposite[order[first[shared]]][:, None],
                opposite[order[first[shared] + 1]][:, None],
            ],
            dim=1,
        )
        return MeshTopology(edges, degree, hinges)


@dataclass(frozen=True)
class Evaluation:
    """What one iteration rendered: the input of every loss term, and of custom losses.

    images: ``(B, 4, H, W)`` rendered RGB and silhouette of cameras ``views``, differentiable.
    targets: ``(B, 4, H, W)`` their targets; has_rgb, has_silhouette: ``(B,)`` bool.
    views: ``(B,)`` int64 camera indices, increasing.
    vertices: ``(V, 3)`` world-space vertices of all meshes, differentiable; faces: ``(F, 3)``.
    topology: the faces' :class:`MeshTopology`.
    texture: ``(Ht, Wt, 3)`` the texture drawn, differentiable when free; ``None`` without one.
    """

    images: torch.Tensor
    targets: torch.Tensor
    has_rgb: torch.Tensor
    has_silhouette: torch.Tensor
    views: torch.Tensor
    vertices: torch.Tensor
    faces: torch.Tensor
    topology: MeshTopology
    texture: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Image terms, per view


def silhouette_iou_loss(alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SoftRas's negative IoU, ``1 - sum(A T) / sum(A + T - A T)`` per view ``(B,)``, of
    silhouettes ``(B, H, W)``; two empty silhouettes give 0."""
    intersection = (alpha * target).sum(dim=(1, 2))
    union = (alpha + target - alpha * target).sum(dim=(1, 2))
    return torch.where(
        union > 0, 1 - intersection / union.clamp(min=1e-12), torch.zeros_like(union)
    )


def rgb_error(
    rgb: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, power: int
) -> torch.Tensor:
    """Mean ``|I - T|**power`` per view ``(B,)`` over pixels and channels of ``(B, 3, H, W)``,
    weighted by ``mask`` ``(B, 1, H, W)`` if given (an all-zero mask gives 0)."""
    error = (rgb - target).abs() ** power
    if mask is None:
        return error.mean(dim=(1, 2, 3))
    total = (error * mask).sum(dim=(1, 2, 3))
    return total / (3 * mask.sum(dim=(1, 2, 3))).clamp(min=1e-6)


def view_mean(values: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """The mean of per-view ``values`` ``(B,)`` over the ``views`` mask ``(B,)``; 0 when it
    selects none."""
    return (values * views).sum() / views.sum().clamp(min=1)


def _silhouette_views(evaluation: Evaluation, mask_rgb: bool) -> torch.Tensor:
    return silhouette_iou_loss(evaluation.images[:, 3], evaluation.targets[:, 3])


def _rgb_views(power: int) -> Callable[[Evaluation, bool], torch.Tensor]:
    def per_view(evaluation: Evaluation, mask_rgb: bool) -> torch.Tensor:
        mask = None
        if mask_rgb:
            # A view without a silhouette is compared everywhere.
            alpha = evaluation.targets[:, 3:]
            has = evaluation.has_silhouette[:, None, None, None]
            mask = torch.where(has, alpha, torch.ones_like(alpha))
        images, targets = evaluation.images, evaluation.targets
        return rgb_error(images[:, :3], targets[:, :3], mask, power)

    return per_view


#: Each image term: ``values(evaluation, mask_rgb)`` -> ``(B,)``, one value per view, and the
#: name of the :class:`Evaluation` mask of the views it is averaged over (:func:`view_mean`).
#: Split so that views rendered apart (by the ranks of a distributed run) still make one term.
VIEW_TERMS: dict[str, tuple[Callable[[Evaluation, bool], torch.Tensor], str]] = {
    "silhouette_iou": (_silhouette_views, "has_silhouette"),
    "rgb_l1": (_rgb_views(1), "has_rgb"),
    "rgb_l2": (_rgb_views(2), "has_rgb"),
}


def _image_term(name: str) -> Callable[[Evaluation, bool], torch.Tensor]:
    values, mask = VIEW_TERMS[name]
    return lambda evaluation, mask_rgb: view_mean(
        values(evaluation, mask_rgb), getattr(evaluation, mask)
    )


# ---------------------------------------------------------------------------------------------
# Mesh terms


def laplacian_loss(vertices: torch.Tensor, topology: MeshTopology) -> torch.Tensor:
    """SoftRas's LaplacianLoss: ``sum_i |v_i - mean_{j ~ i} v_j|^2`` (uniform weights) over the
    vertices that have neighbours."""
    i, j = topology.edges.unbind(1)
    neighbour_sum = torch.zeros_like(vertices).index_add(0, i, vertices[j])
    neighbour_sum = neighbour_sum.index_add(0, j, vertices[i])
    degree = topology.degree.to(vertices.dtype)[:, None]
    delta = vertices - neighbour_sum / degree.clamp(min=1)
    return torch.where(degree > 0, delta, torch.zeros_like(delta)).pow(2).sum()


def flatten_loss(vertices: torch.Tensor, topology: MeshTopology) -> torch.Tensor:
    """SoftRas's FlattenLoss: ``sum (cos(theta) + 1)^2`` over hinges, ``theta`` the angle between
    the two faces' outer vertices seen from their shared edge (perpendicular to it): pi, so 0
    loss, where the faces are coplanar."""
    v0, v1, outer_a, outer_b = (vertices[topology.hinges[:, k]] for k in range(4))
    edge = v1 - v0
    edge_length2 = (edge * edge).sum(-1, keepdim=True)

    def across(outer: torch.Tensor) -> torch.Tensor:
        """The outer vertex's offset from the edge's line, perpendicular to the edge."""
        offset = outer - v0
        along = (offset * edge).sum(-1, keepdim=True) / edge_length2.clamp(min=1e-12)
        return offset - edge * along

    a, b = across(outer_a), across(outer_b)
    # The small constants keep degenerate hinges (zero-length edge or offset) finite, as in SoftRas.
    length_a = ((a * a).sum(-1) + 1e-12).sqrt()
    length_b = ((b * b).sum(-1) + 1e-12).sqrt()
    cos = (a * b).sum(-1) / (length_a * length_b)
    return (cos + 1).pow(2).sum()


def edge_length_loss(vertices: torch.Tensor, topology: MeshTopology) -> torch.Tensor:
    """The mean squared edge length (PyTorch3D's ``mesh_edge_loss`` with target length 0)."""
    i, j = topology.edges.unbind(1)
    return (vertices[i] - vertices[j]).pow(2).sum(-1).mean()


def texture_smoothness(texture: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of neighbouring texels of ``(Ht, Wt, C)``, across and down
    (0 for a texture of one texel): a quadratic smoothness prior, which fills texels that no view
    sees from their neighbours."""
    across = (texture[:, 1:] - texture[:, :-1]).pow(2)
    down = (texture[1:] - texture[:-1]).pow(2)
    return (across.sum() + down.sum()) / max(1, across.numel() + down.numel())


def _texture_term(evaluation: Evaluation, mask_rgb: bool) -> torch.Tensor:
    texture = evaluation.texture
    return texture_smoothness(texture) if texture is not None else evaluation.vertices.new_zeros(())


def _mesh_term(loss: Callable[[torch.Tensor, MeshTopology], torch.Tensor]):
    return lambda evaluation, mask_rgb: loss(evaluation.vertices, evaluation.topology)


#: Each term of ``optimize.loss``: ``term(evaluation, mask_rgb)`` -> scalar, unweighted.
TERMS: dict[str, Callable[[Evaluation, bool], torch.Tensor]] = {
    **{name: _image_term(name) for name in VIEW_TERMS},
    "laplacian": _mesh_term(laplacian_loss),
    "flatten": _mesh_term(flatten_loss),
    "edge_length": _mesh_term(edge_length_loss),
    "texture_smoothness": _texture_term,
}


def loss_terms(
    evaluation: Evaluation, weights: dict[str, float], *, mask_rgb: bool = False
) -> dict[str, torch.Tensor]:
    """The unweighted value of each term whose weight is > 0 (keys of :data:`TERMS`); with
    ``mask_rgb`` the RGB terms compare only where the target's silhouette is."""
    return {name: TERMS[name](evaluation, mask_rgb) for name, w in weights.items() if w > 0}


# ---------------------------------------------------------------------------------------------
# Metrics (not differentiable)


@dataclass(frozen=True)
class Metrics:
    """How well a mesh matches the targets of some cameras, per view (``None`` where the target
    has no silhouette / no color):

    - ``iou``: the hard silhouette IoU (:func:`mask_iou`): the pixels whose center a drawn face
      covers (:func:`microdr.render.hard_silhouettes`, MODEL.md's silhouette in the limit
      ``sigma -> 0``) against the target's alpha > 0.5.
    - ``soft_iou``: :func:`silhouette_iou` of the soft render (its alpha > 0.5, which spreads
      about ``sqrt(sigma)`` past the outline) against the target's alpha > 0.5.
    - ``psnr``: :func:`psnr` (dB) of the soft render's RGB, clamped to ``[0, 1]``, over all
      pixels and the 3 channels.
    - ``psnr_inside``: the same over the pixels inside the target's silhouette (alpha > 0.5)
      alone (``None`` where the target has no silhouette or color, or it is empty): how well
      the object's own colors match, which the background does not dilute.

    cameras: the camera index of each view.
    """

    cameras: tuple[int, ...]
    iou: tuple[float | None, ...]
    soft_iou: tuple[float | None, ...]
    psnr: tuple[float | None, ...]
    psnr_inside: tuple[float | None, ...]

    @staticmethod
    def of(
        cameras: Sequence[int],
        covered: torch.Tensor | None,
        images: torch.Tensor | None,
        targets: torch.Tensor,
        has_rgb: torch.Tensor,
        has_silhouette: torch.Tensor,
    ) -> "Metrics":
        """Metrics of cameras ``cameras``: their hard silhouettes ``covered`` ``(B, H, W)`` bool
        and soft renders ``images`` ``(B, 4, H, W)`` against targets ``(B, 4, H, W)`` with their
        ``(B,)`` masks. Without ``covered``, ``iou`` is ``None``; without ``images``,
        ``soft_iou`` and ``psnr`` are."""
        alpha = targets[:, 3]
        hard = None if covered is None else mask_iou(covered, alpha > IOU_THRESHOLD)
        soft = None if images is None else silhouette_iou(images[:, 3], alpha)
        decibels = None if images is None else psnr(images[:, :3], targets[:, :3])
        inside = alpha > IOU_THRESHOLD
        inside_decibels = None if images is None else psnr(images[:, :3], targets[:, :3], inside)
        return Metrics(
            cameras=tuple(int(c) for c in cameras),
            iou=_where(hard, has_silhouette),
            soft_iou=_where(soft, has_silhouette),
            psnr=_where(decibels, has_rgb),
            psnr_inside=_where(inside_decibels, has_rgb & has_silhouette & inside.flatten(1).any(dim=1).to(has_rgb.device)),
        )

    @property
    def mean_iou(self) -> float | None:
        return _mean(self.iou)

    @property
    def mean_soft_iou(self) -> float | None:
        return _mean(self.soft_iou)

    @property
    def mean_psnr(self) -> float | None:
        return _mean(self.psnr)

    @property
    def mean_psnr_inside(self) -> float | None:
        return _mean(self.psnr_inside)


def _where(values: torch.Tensor | None, given: torch.Tensor) -> tuple[float | None, ...]:
    """Per-view ``values`` ``(B,)`` where ``given`` ``(B,)`` bool, else ``None``; all ``None``
    without values."""
    if values is None:
        return (None,) * len(given)
    return tuple(value if flag else None for value, flag in zip(values.tolist(), given.tolist()))


def _mean(values: tuple[float | None, ...]) -> float | None:
    """The mean of the values that are not ``None``; ``None`` if all are."""
    given = [v for v in values if v is not None]
    return sum(given) / len(given) if given else None


@torch.no_grad()
def mask_iou(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """IoU per view ``(B,)`` float64 of bool masks ``(B, H, W)``: ``|M & T| / |M | T|``; 1 when
    both are empty."""
    intersection = (mine & theirs).sum(dim=(1, 2)).double()
    union = (mine | theirs).sum(dim=(1, 2)).double()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def silhouette_iou(alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU per view ``(B,)`` of silhouettes ``(B, H, W)`` thresholded at 0.5:
    ``|A > 0.5 & T > 0.5| / |A > 0.5 | T > 0.5|`` (:func:`mask_iou`); 1 when both are empty."""
    return mask_iou(alpha > IOU_THRESHOLD, target > IOU_THRESHOLD).to(alpha.dtype)


@torch.no_grad()
def psnr(rgb: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per view ``(B,)`` of RGB ``(B, 3, H, W)`` against targets in ``[0, 1]``, over
    every pixel or those of ``mask`` ``(B, H, W)`` bool (an empty mask gives the floor); the
    rendering is clamped to ``[0, 1]`` (lit colors can exceed 1) and a perfect match gives
    :data:`PSNR_MAX_DB`."""
    if mask is None:
        mse = (rgb.clamp(0, 1) - target).pow(2).mean(dim=(1, 2, 3))
    else:
        squared = (rgb.clamp(0, 1) - target).pow(2).sum(dim=1) * mask
        mse = squared.sum(dim=(1, 2)) / (3 * mask.sum(dim=(1, 2))).clamp(min=1)
    return -10 * torch.log10(mse.clamp(min=10 ** (-PSNR_MAX_DB / 10)))
