"""Isotropic remeshing of closed triangle meshes toward a target edge length, for the optimizer.

After Botsch and Kobbelt (2004) as Palfinger's *Continuous Remeshing for Inverse Rendering*
(2022) runs it during an optimization: one pass splits the edges longer than ``4/3 L`` at their
midpoints, collapses those shorter than ``4/5 L`` into their midpoints, flips edges toward
valence 6, then moves each vertex part of the way to the mean of its neighbours within its
tangent plane. Every operation runs on an independent set of edges at once (vectorized torch,
on the CPU), in rounds, so a pass on a few thousand faces takes milliseconds.

Tensor contract: vertices ``(V, 3)`` float, faces ``(F, 3)`` int64, counter-clockwise seen from
outside; the mesh must be closed and manifold: every directed edge in exactly one face, with its
reverse in another (:func:`closed_manifold_problem`). The result is too, with the same Euler
characteristic and orientation, and no face of zero area that was not there before. The same
input gives the same output, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: Edges longer than this many target lengths are split, shorter ones collapsed (Botsch and
#: Kobbelt's thresholds: a split leaves halves >= 2/3 L, a collapse no edge > 4/3 L).
SPLIT_ABOVE, COLLAPSE_BELOW = 4 / 3, 4 / 5
#: A collapse or a flip is refused when a face it changes would turn by more than about 60
#: degrees (unit normals' dot product below this): a fold, or a crease cut across.
MIN_NORMAL_DOT = 0.5
#: Rounds of each operation per pass at most (a round does an independent set of edges; a pass
#: on a mesh near its target length does some flips and collapses in every round, and later
#: passes do the rest).
ROUNDS = 4


@dataclass(frozen=True)
class Remeshed:
    """The result of :func:`remesh`.

    vertices: ``(V_new, 3)``; faces: ``(F_new, 3)`` int64.
    vertex_map: sparse COO ``(V_new, V_old)`` float64, each row's weights summing to 1: the
        new vertex ``i`` is where ``sum_j vertex_map[i, j] * old_vertices[j]`` was before the
        tangential smoothing moved it (a kept vertex maps to itself with weight 1, a split's
        or a collapse's midpoint to its two ends with 1/2 each, in composition). Carry
        per-vertex state (Adam's moments, colors) over with :meth:`carry`.
    face_map: ``(F_new,)`` int64: the old face each new face was cut from or is.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_map: torch.Tensor
    face_map: torch.Tensor

    def carry(self, values: torch.Tensor) -> torch.Tensor:
        """Per-vertex ``values`` ``(V_old, ...)`` averaged onto the new vertices
        ``(V_new, ...)`` through :attr:`vertex_map` (same dtype and device)."""
        rows, cols = self.vertex_map.indices()
        weights = self.vertex_map.values().to(values)
        weights = weights.reshape(-1, *([1] * (values.dim() - 1)))
        out = values.new_zeros((self.vertex_map.shape[0], *values.shape[1:]))
        return out.index_add_(0, rows.to(values.device), values[cols.to(values.device)] * weights)


def closed_manifold_problem(faces: torch.Tensor, num_vertices: int) -> str | None:
    """Why ``faces`` ``(F, 3)`` is not a closed, consistently oriented manifold surface, as a
    phrase; ``None`` when it is (every directed edge in one face, its reverse in another)."""
    if len(faces) == 0:
        return "it has no faces"
    if bool((faces[:, 0] == faces[:, 1]).any() | (faces[:, 1] == faces[:, 2]).any()
            | (faces[:, 2] == faces[:, 0]).any()):  # fmt: skip
        return "a face repeats a vertex"
    directed = _directed_keys(faces, num_vertices)
    unique, counts = torch.unique(directed, return_counts=True)
    if bool((counts > 1).any()):
        return "an edge is shared by more than two faces, or two faces disagree on orientation"
    reverse = (directed % num_vertices) * num_vertices + directed // num_vertices
    if not bool(torch.isin(reverse, unique).all()):
        return "it has a boundary (an edge with one face)"
    return None


def remesh(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    edge_length: float,
    *,
    passes: int = 1,
    smoothing: float = 0.5,
) -> Remeshed:
    """``passes`` passes of split, collapse, flip and tangential smoothing toward edges of
    ``edge_length`` (> 0, in the vertices' units). ``smoothing`` in ``[0, 1]``: the fraction of
    the way to its neighbours' mean, in its tangent plane, that each vertex moves per pass.
    Vertices that no face uses are kept, unmoved."""
    if edge_length <= 0:
        raise ValueError(f"edge_length must be > 0, got {edge_length}")
    problem = closed_manifold_problem(faces, len(vertices))
    if problem is not None:
        raise ValueError(f"remesh needs a closed manifold mesh: {problem}")
    mesh = _Working(vertices, faces)
    with _one_thread():
        for _ in range(passes):
            for operation in (_split, _collapse, _flip):
                for _ in range(ROUNDS):
                    if not operation(mesh, edge_length):
                        break
            mesh.vertices = _smooth(mesh.vertices, mesh.faces, smoothing)
    rows, cols, weights = mesh.rows, mesh.cols, mesh.weights
    vertex_map = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), weights, (len(mesh.vertices), len(vertices)),
        is_coalesced=True, check_invariants=False,
    )
    return Remeshed(mesh.vertices, mesh.faces, vertex_map, mesh.face_map)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread while the block runs: a pass is hundreds of operations on a few
    thousand elements, for which waking torch's workers costs more than they save (a pass on
    930 faces, on two busy cores: 47 ms on one thread, 830 ms on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The mesh being remeshed


class _Working:
    """Vertices, faces, and how they derive from the input: the vertex map as rows sorted
    ``(rows, cols, weights)`` over the input's vertices, and each face's input face."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor):
        self.vertices = vertices.clone()
        self.faces = faces.clone()
        count, device = len(vertices), vertices.device
        self.rows = torch.arange(count, device=device)
        self.cols = torch.arange(count, device=device)
        self.weights = torch.ones(count, dtype=torch.float64, device=device)
        self.face_map = torch.arange(len(faces), device=device)
        self.inputs = max(count, 1)

    def edges(self) -> "_Edges":
        return _Edges.of(self.faces, len(self.vertices))

    def remap(self, rows: torch.Tensor, old: torch.Tensor, weights: torch.Tensor) -> None:
        """Compose the vertex map with a step that makes new vertex ``rows[k]`` from the vertex
        ``old[k]`` before it with weight ``weights[k]`` (float64), summed over ``k``."""
        device = rows.device
        # Each step entry (row, old, w) becomes the entries of old's row, weighted by w.
        counts = torch.bincount(self.rows, minlength=len(self.vertices))
        starts = torch.cumsum(counts, 0) - counts
        repeats = counts[old]
        entry = torch.repeat_interleave(starts[old], repeats) + _ranks_within(repeats)
        rows = torch.repeat_interleave(rows, repeats)
        cols = self.cols[entry]
        weights = torch.repeat_interleave(weights, repeats) * self.weights[entry]
        # Sorted by row, duplicates merged (the two ends of a collapse may share input
        # vertices); weights are dyadic, so the sums are exact whatever their order.
        keys, inverse = torch.unique(rows * self.inputs + cols, return_inverse=True)
        self.rows, self.cols = keys // self.inputs, keys % self.inputs
        self.weights = torch.zeros(len(keys), dtype=torch.float64, device=device)
        self.weights.index_add_(0, inverse, weights)


@dataclass(frozen=True)
class _Edges:
    """A closed manifold's undirected edges ``(E,)``, each with its two half-edges: ``a -> b``
    in face ``face0`` with the face's third vertex ``c``, and ``b -> a`` in ``face1`` with
    ``d``; ``slot0``/``slot1`` are the half-edges' corners (0, 1, 2: the half-edge from corner
    ``k`` to ``k + 1``). Edges are in increasing order of ``min * V + max``."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    d: torch.Tensor
    face0: torch.Tensor
    face1: torch.Tensor
    slot0: torch.Tensor
    slot1: torch.Tensor
    keys: torch.Tensor

    @staticmethod
    def of(faces: torch.Tensor, num_vertices: int) -> "_Edges":
        start = faces.reshape(-1)
        end = faces[:, [1, 2, 0]].reshape(-1)
        third = faces[:, [2, 0, 1]].reshape(-1)
        keys = torch.minimum(start, end) * num_vertices + torch.maximum(start, end)
        order = torch.argsort(keys, stable=True)
        first, second = order[0::2], order[1::2]
        return _Edges(
            a=start[first], b=end[first], c=third[first], d=third[second],
            face0=first // 3, face1=second // 3, slot0=first % 3, slot1=second % 3,
            keys=keys[first],
        )  # fmt: skip

    def lengths(self, vertices: torch.Tensor) -> torch.Tensor:
        return (vertices[self.a] - vertices[self.b]).norm(dim=1)


def _directed_keys(faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    return (faces * num_vertices + faces[:, [1, 2, 0]]).reshape(-1)


def _ranks_within(counts: torch.Tensor) -> torch.Tensor:
    """``0, 1, ..., n - 1`` for each ``n`` of ``counts``, concatenated."""
    total = int(counts.sum())
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total, device=counts.device) - torch.repeat_interleave(starts, counts)


def _priority_ranks(score: torch.Tensor) -> torch.Tensor:
    """Each element's rank by ``score``, lowest first, ties by index: distinct integers."""
    ranks = torch.empty_like(score, dtype=torch.int64)
    ranks[torch.argsort(score, stable=True)] = torch.arange(len(score), device=score.device)
    return ranks


def _face_winners(edges: _Edges, chosen: torch.Tensor, score: torch.Tensor, faces: int):
    """Of the edges ``chosen`` (indices), those whose ``score`` (lower first) is the lowest on
    both their faces: no two of them share a face."""
    rank = _priority_ranks(score)
    best = torch.full((faces,), len(rank), dtype=torch.int64, device=rank.device)
    for face in (edges.face0[chosen], edges.face1[chosen]):
        best.scatter_reduce_(0, face, rank, "amin")
    won = (best[edges.face0[chosen]] == rank) & (best[edges.face1[chosen]] == rank)
    return chosen[won]


def _unit_normals(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.linalg.cross(p1 - p0, p2 - p0), dim=-1)


# ---------------------------------------------------------------------------------------------
# The operations: each does one round on an independent set and says whether it changed anything


def _split(mesh: _Working, edge_length: float) -> bool:
    """Split at their midpoints the edges longer than :data:`SPLIT_ABOVE` ``L``, longest
    first, no two in one face: each of an edge's faces becomes two."""
    edges = mesh.edges()
    length = edges.lengths(mesh.vertices)
    chosen = (length > SPLIT_ABOVE * edge_length).nonzero().squeeze(1)
    if len(chosen) == 0:
        return False
    chosen = _face_winners(edges, chosen, -length[chosen], len(mesh.faces))
    count, first_new = len(chosen), len(mesh.vertices)
    middle = torch.arange(first_new, first_new + count, device=chosen.device)
    pairs = torch.stack([edges.a[chosen], edges.b[chosen]], dim=1)
    faces, new_faces, face_map = mesh.faces, [], [mesh.face_map]
    for face, slot in ((edges.face0[chosen], edges.slot0[chosen]),
                       (edges.face1[chosen], edges.slot1[chosen])):  # fmt: skip
        # The face (x, y, z) with the edge x -> y split at m becomes (x, m, z) and (m, y, z).
        y, z = (faces[face, (slot + k) % 3] for k in (1, 2))
        new_faces.append(torch.stack([middle, y, z], dim=1))
        face_map.append(mesh.face_map[face])
        faces = faces.clone()
        faces[face, (slot + 1) % 3] = middle
    mesh.vertices = torch.cat([mesh.vertices, mesh.vertices[pairs].mean(dim=1)])
    mesh.faces = torch.cat([faces, *new_faces])
    mesh.face_map = torch.cat(face_map)
    kept = torch.arange(first_new, device=chosen.device)
    one, half = _weights(first_new, 1.0), _weights(2 * count, 0.5)
    mesh.remap(torch.cat([kept, middle.repeat_interleave(2)]),
               torch.cat([kept, pairs.reshape(-1)]), torch.cat([one, half]))  # fmt: skip
    return True


def _collapse(mesh: _Working, edge_length: float) -> bool:
    """Collapse into their midpoints the edges shorter than :data:`COLLAPSE_BELOW` ``L``,
    shortest first, no two within one edge of each other. Refused where the link condition
    fails (the ends share a neighbour besides the two opposite corners), where a face would
    turn by more than :data:`MIN_NORMAL_DOT` allows, or where an edge would grow longer than
    :data:`SPLIT_ABOVE` ``L``."""
    vertices, faces = mesh.vertices, mesh.faces
    edges = mesh.edges()
    length = edges.lengths(vertices)
    chosen = (length < COLLAPSE_BELOW * edge_length).nonzero().squeeze(1)
    if len(chosen) == 0:
        return False
    chosen = chosen[_link_condition(edges, chosen, len(vertices))]
    chosen = chosen[_collapse_keeps_faces(edges, chosen, vertices, faces, edge_length)]
    if len(chosen) == 0:
        return False
    # Independent: an edge wins when it comes first among the candidates within one edge of its
    # ends. First: the shortest by tenths of L, then in a scrambled order of the edge keys, so
    # that neighbours of alike length do not queue behind each other (most of a round's
    # candidates win where the order follows the smooth field of lengths alone).
    a, b = edges.a[chosen], edges.b[chosen]
    scrambled = (edges.keys[chosen] * 2654435761) % 4294967291
    score = (length[chosen] / edge_length * 10).floor().to(torch.int64) * 4294967291 + scrambled
    rank = _priority_ranks(score)
    big = len(rank)
    near = torch.full((len(vertices),), big, dtype=torch.int64, device=rank.device)
    near.scatter_reduce_(0, a, rank, "amin").scatter_reduce_(0, b, rank, "amin")
    ring = near.clone()
    ring.scatter_reduce_(0, edges.a, near[edges.b], "amin")
    ring.scatter_reduce_(0, edges.b, near[edges.a], "amin")
    won = (ring[a] == rank) & (ring[b] == rank)
    a, b, chosen = a[won], b[won], chosen[won]
    # a moves to the midpoint, b goes; the two faces of the edge go.
    vertices = vertices.clone()
    vertices[a] = (vertices[a] + vertices[b]) / 2
    target = torch.arange(len(vertices), device=a.device)
    target[b] = a
    gone_faces = torch.zeros(len(faces), dtype=torch.bool, device=a.device)
    gone_faces[edges.face0[chosen]] = True
    gone_faces[edges.face1[chosen]] = True
    keep = torch.ones(len(vertices), dtype=torch.bool, device=a.device)
    keep[b] = False
    merged = torch.zeros(len(vertices), dtype=torch.bool, device=a.device)
    merged[a] = True
    index = torch.cumsum(keep, 0) - 1
    mesh.faces = index[target[faces[~gone_faces]]]
    mesh.face_map = mesh.face_map[~gone_faces]
    mesh.vertices = vertices[keep]
    # The step's map: kept vertices as they were, each a the mean of a and b.
    kept = keep.nonzero().squeeze(1)
    mesh.remap(torch.cat([index[kept], index[a]]), torch.cat([kept, b]),
               torch.cat([torch.where(merged[kept], 0.5, 1.0).double(), _weights(len(b), 0.5)]))
    return True


def _weights(count: int, value: float) -> torch.Tensor:
    return torch.full((count,), value, dtype=torch.float64)


def _link_condition(edges: _Edges, chosen: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """For the edges ``chosen``: whether their ends share exactly two neighbours (the opposite
    corners ``c`` and ``d``), the condition for a collapse to keep a manifold a manifold."""
    # Every directed neighbour pair, sorted by vertex: vertex v's neighbours are one run.
    source = torch.cat([edges.a, edges.b])
    neighbour = torch.cat([edges.b, edges.a])
    order = torch.argsort(source * num_vertices + neighbour)
    neighbour = neighbour[order]
    degree = torch.bincount(source, minlength=num_vertices)
    starts = torch.cumsum(degree, 0) - degree
    a, b = edges.a[chosen], edges.b[chosen]
    repeats = degree[a]
    owner = torch.repeat_interleave(torch.arange(len(chosen), device=a.device), repeats)
    around_a = neighbour[torch.repeat_interleave(starts[a], repeats) + _ranks_within(repeats)]
    b_of = b[owner]
    pair = torch.minimum(around_a, b_of) * num_vertices + torch.maximum(around_a, b_of)
    shared = torch.isin(pair, edges.keys) & (around_a != b_of)
    return torch.bincount(owner[shared], minlength=len(chosen)) == 2


def _collapse_keeps_faces(
    edges: _Edges, chosen: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
    edge_length: float,
) -> torch.Tensor:
    """For the edges ``chosen``: whether moving both ends to the midpoint turns no other face
    of theirs by more than :data:`MIN_NORMAL_DOT` allows (nor to zero area), and makes no edge
    longer than :data:`SPLIT_ABOVE` ``L``."""
    corner_vertex = faces.reshape(-1)
    order = torch.argsort(corner_vertex, stable=True)
    valence = torch.bincount(corner_vertex, minlength=len(vertices))
    starts = torch.cumsum(valence, 0) - valence
    a, b = edges.a[chosen], edges.b[chosen]
    middle = (vertices[a] + vertices[b]) / 2
    ok = torch.ones(len(chosen), dtype=torch.bool, device=a.device)
    for end, other_end in ((a, b), (b, a)):
        repeats = valence[end]
        owner = torch.repeat_interleave(torch.arange(len(chosen), device=a.device), repeats)
        corner = order[torch.repeat_interleave(starts[end], repeats) + _ranks_within(repeats)]
        face, slot = corner // 3, corner % 3
        corners = faces[face]
        # The edge's own two faces hold both ends; they go.
        stays = ~(corners == other_end[owner][:, None]).any(dim=1)
        p = vertices[corners]
        moved = p.clone()
        moved[torch.arange(len(face), device=a.device), slot] = middle[owner]
        before = _unit_normals(p[:, 0], p[:, 1], p[:, 2])
        after = _unit_normals(moved[:, 0], moved[:, 1], moved[:, 2])
        turned = (before * after).sum(dim=1) < MIN_NORMAL_DOT
        too_long = ((moved - middle[owner][:, None]).norm(dim=2) > SPLIT_ABOVE * edge_length).any(1)
        bad = stays & (turned | too_long)
        ok &= torch.bincount(owner[bad], minlength=len(chosen)) == 0
    return ok


def _flip(mesh: _Working, edge_length: float) -> bool:
    """Flip edges ``a b`` to ``c d`` (the opposite corners) where that brings the four
    vertices' valences closer to 6 (squared deviation), largest gain first, no two in one face;
    refused where ``c d`` is an edge already, an end would keep fewer than 3 neighbours, or the
    two faces, before or after, meet at a fold (:data:`MIN_NORMAL_DOT`)."""
    vertices, faces = mesh.vertices, mesh.faces
    edges = mesh.edges()
    valence = torch.bincount(torch.cat([edges.a, edges.b]), minlength=len(vertices))
    a, b, c, d = edges.a, edges.b, edges.c, edges.d
    deviation = sum((valence[v] - 6) ** 2 for v in (a, b, c, d))
    after = sum((valence[v] - 6 + s) ** 2 for v, s in ((a, -1), (b, -1), (c, 1), (d, 1)))
    gain = deviation - after
    new_keys = torch.minimum(c, d) * len(vertices) + torch.maximum(c, d)
    pa, pb, pc, pd = (vertices[v] for v in (a, b, c, d))
    old0, old1 = _unit_normals(pa, pb, pc), _unit_normals(pb, pa, pd)
    new0, new1 = _unit_normals(pa, pd, pc), _unit_normals(pd, pb, pc)
    flat = ((old0 * old1).sum(1) > MIN_NORMAL_DOT) & ((new0 * new1).sum(1) > MIN_NORMAL_DOT)
    agree = ((new0 * (old0 + old1)).sum(1) > 0) & ((new1 * (old0 + old1)).sum(1) > 0)
    possible = (gain > 0) & (valence[a] > 3) & (valence[b] > 3) & flat & agree & (c != d)
    possible &= ~torch.isin(new_keys, edges.keys)
    chosen = possible.nonzero().squeeze(1)
    if len(chosen) == 0:
        return False
    chosen = _face_winners(edges, chosen, -gain[chosen].to(torch.float64), len(faces))
    # Two flips that would make the same new edge both stay undone.
    keys, counts = torch.unique(new_keys[chosen], return_counts=True)
    chosen = chosen[torch.isin(new_keys[chosen], keys[counts == 1])]
    if len(chosen) == 0:
        return False
    a, b, c, d = a[chosen], b[chosen], c[chosen], d[chosen]
    faces = faces.clone()
    faces[edges.face0[chosen]] = torch.stack([a, d, c], dim=1)
    faces[edges.face1[chosen]] = torch.stack([d, b, c], dim=1)
    mesh.faces = faces
    return True


def _smooth(vertices: torch.Tensor, faces: torch.Tensor, amount: float) -> torch.Tensor:
    """Each vertex moved ``amount`` of the way to its neighbours' mean, less the move's part
    along its normal (the area-weighted mean of its faces' normals)."""
    if amount == 0:
        return vertices
    edges = _Edges.of(faces, len(vertices))
    ends = torch.cat([edges.a, edges.b])
    others = torch.cat([edges.b, edges.a])
    total = torch.zeros_like(vertices).index_add_(0, ends, vertices[others])
    degree = torch.bincount(ends, minlength=len(vertices)).to(vertices.dtype)[:, None]
    used = degree > 0
    move = torch.where(used, total / degree.clamp(min=1) - vertices, torch.zeros_like(vertices))
    corners = vertices[faces]
    face_normal = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal = torch.zeros_like(vertices)
    for k in range(3):
        normal.index_add_(0, faces[:, k], face_normal)
    normal = torch.nn.functional.normalize(normal, dim=1)
    move = move - (move * normal).sum(dim=1, keepdim=True) * normal
    return vertices + amount * move
